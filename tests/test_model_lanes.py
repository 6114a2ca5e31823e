"""Provider lanes and the ledger, in-process against real PostgreSQL: the limits hold across
concurrent callers (each its own database session, as instances are), a full lane waits briefly or
says RetryLater with when it frees, a 429 pauses the lane for everyone, a crashed caller's slot
frees itself, and every call is on the ledger with its tokens."""

from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from common.models import lanes, ledger
from common.models.lanes import CallContext, model_call
from common.models.settings import LaneLimits, Price, model_settings
from common.platform.db import connection
from common.platform.errors import ConfigError, RetryLater
from tests.factories import make_job, make_user


def _limit(model: str, spec: str, monkeypatch: pytest.MonkeyPatch, **settings: str) -> None:
    monkeypatch.setenv("DYLEN_MODEL_LIMITS", f"{model}={spec}")
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    model_settings.reset()


def _calls(db: sa.Engine, model: str) -> list[sa.Row]:
    with db.connect() as conn:
        return list(
            conn.execute(sa.text("SELECT * FROM model_calls WHERE model = :m ORDER BY id"), {"m": model})
        )


def test_settings_name_the_variable_of_a_wrong_value() -> None:
    load = model_settings.load
    assert load({"DYLEN_MODEL_LIMITS": "m=rpm:10,tpm:2000; n=concurrency:2"}).limits == {
        "m": LaneLimits(rpm=10, tpm=2000),
        "n": LaneLimits(concurrency=2),
    }
    assert load({"DYLEN_MODEL_PRICES": "m=input:0.3,output:2.5"}).prices == {"m": Price(0.3, 2.5)}
    for env, says in [
        ({"DYLEN_MODEL_LIMITS": "m=rpm:0"}, "rpm must be a whole number >= 1"),
        ({"DYLEN_MODEL_LIMITS": "m=rps:3"}, "expected rpm|tpm|concurrency"),
        ({"DYLEN_MODEL_LIMITS": "m=rpm:1.5"}, "whole number"),
        ({"DYLEN_MODEL_LIMITS": "m rpm:1"}, "expected model="),
        ({"DYLEN_MODEL_PRICES": "m=input:1"}, "give both"),
        ({"DYLEN_MODEL_PRICES": "m=input:-1,output:1"}, ">= 0"),
    ]:
        with pytest.raises(ConfigError, match=next(iter(env))) as raised:
            load(env)
        assert says in raised.value.detail


def test_concurrency_holds_across_sessions_and_a_full_lane_says_retry_later(
    app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"
    _limit(model, "concurrency:3", monkeypatch, DYLEN_MODEL_SLOT_WAIT_SECONDS="10")
    inside = 0
    most = 0
    lock = threading.Lock()

    def one(_: int) -> None:
        nonlocal inside, most
        with model_call(CallContext(), model, purpose="test"):
            with lock:
                inside += 1
                most = max(most, inside)
            time.sleep(0.05)
            with lock:
                inside -= 1

    # 8 callers at once, each its own database session (as instances are), 24 calls in all
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(24)))
    assert most == 3
    # A lane that stays full past the wait bound: RetryLater, nothing taken
    _limit(model, "concurrency:1", monkeypatch, DYLEN_MODEL_SLOT_WAIT_SECONDS="0")
    with (
        model_call(CallContext(), model, purpose="test"),
        pytest.raises(RetryLater) as later,
        model_call(CallContext(), model, purpose="test"),
    ):
        pass
    assert later.value.reason == "lane_concurrency" and 1 <= later.value.after_seconds <= 2


def test_rpm_is_a_sliding_window_a_short_wait_is_waited_a_long_one_is_retry_later(
    app_env: dict[str, str], db: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"
    # A 2 s window (tests only; 60 s in production) taken 1 s longer: calls are counted from
    # their slot, a little before the provider sees them.
    _limit(model, "rpm:3", monkeypatch, DYLEN_MODEL_WINDOW_SECONDS="2", DYLEN_MODEL_SLOT_WAIT_SECONDS="0")
    for _ in range(3):
        with model_call(CallContext(), model, purpose="test"):
            pass
    with pytest.raises(RetryLater) as later, model_call(CallContext(), model, purpose="test"):
        pass
    assert later.value.reason == "lane_rpm"
    assert 2.0 < later.value.after_seconds <= 3.1  # when the oldest of the three leaves the window
    # With room to wait, the same call waits in-process for the window to free, then runs
    _limit(model, "rpm:3", monkeypatch, DYLEN_MODEL_WINDOW_SECONDS="2", DYLEN_MODEL_SLOT_WAIT_SECONDS="5")
    started = time.monotonic()
    with model_call(CallContext(), model, purpose="test"):
        pass
    assert 1.5 < time.monotonic() - started < 3.5
    # The refused take wrote nothing: four calls on the ledger
    starts = [row.started_at for row in _calls(db, model)]
    assert len(starts) == 4 and starts[3] - starts[0] >= timedelta(seconds=3)


def test_tpm_counts_estimates_until_settled(app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"
    _limit(model, "tpm:100", monkeypatch, DYLEN_MODEL_SLOT_WAIT_SECONDS="0")
    with model_call(CallContext(), model, purpose="test", estimated_tokens=60) as first:
        # While the first is in flight its estimate counts: 60 + 60 > 100
        with (
            pytest.raises(RetryLater) as later,
            model_call(CallContext(), model, purpose="test", estimated_tokens=60),
        ):
            pass
        assert later.value.reason == "lane_tpm"
        first.usage(input_tokens=7, output_tokens=3)
    # Settled at 10 real tokens: 10 + 60 fits
    with model_call(CallContext(), model, purpose="test", estimated_tokens=60) as second:
        second.usage(input_tokens=50, output_tokens=10)


def test_a_429_pauses_the_lane_for_every_caller_until_its_retry_delay(
    app_env: dict[str, str], db: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"
    _limit(model, "rpm:1000", monkeypatch, DYLEN_MODEL_SLOT_WAIT_SECONDS="0")
    with pytest.raises(RetryLater) as raised, model_call(CallContext(), model, purpose="test") as call:
        raise call.rate_limited(3.0)
    assert (raised.value.after_seconds, raised.value.reason) == (3.0, "rate_limited")
    # Any other caller (here: another session) now finds the lane paused until then
    with pytest.raises(RetryLater) as paused, model_call(CallContext(), model, purpose="test"):
        pass
    assert paused.value.reason == "lane_paused" and 2.0 < paused.value.after_seconds <= 3.1
    with connection() as conn:
        state = next(s for s in ledger.lane_states(conn) if s.model == model)
    assert state.paused_until is not None and state.calls_in_window == 1 and state.in_flight == 0
    # A short pause is waited out in-process
    _limit(model, "rpm:1000", monkeypatch, DYLEN_MODEL_SLOT_WAIT_SECONDS="5")
    started = time.monotonic()
    with model_call(CallContext(), model, purpose="test"):
        pass
    assert time.monotonic() - started > 1.5
    assert [(r.outcome, r.error_code) for r in _calls(db, model)] == [
        ("rate_limited", "rate_limited"),
        ("ok", None),
    ]


def test_a_slot_whose_caller_died_frees_itself_when_its_lease_passes_and_reads_lost(
    app_env: dict[str, str], db: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"
    _limit(model, "concurrency:1", monkeypatch, DYLEN_MODEL_SLOT_WAIT_SECONDS="0")
    with db.begin() as conn:
        job_id = make_job(conn, user_id=make_user(conn), status="running")
    # A caller takes the slot and dies before settling (its lease: 1 s)
    context = CallContext(job_id=uuid.UUID(job_id), user_id="u-lost", attempt=1)
    lanes.take_slot(context, model, purpose="plan", prompt_version=None, estimated_tokens=0, lease_seconds=1)
    with pytest.raises(RetryLater), model_call(CallContext(), model, purpose="test"):
        pass
    time.sleep(1.1)
    with model_call(CallContext(), model, purpose="test"):
        pass
    with connection() as conn:
        calls = ledger.job_calls(conn, uuid.UUID(job_id))
    assert [(c.purpose, c.outcome) for c in calls] == [("plan", "lost")]


def test_the_ledger_sums_a_jobs_calls_prices_them_and_keeps_bodies_only_when_asked(
    app_env: dict[str, str], db: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("DYLEN_MODEL_PRICES", f"{model}=input:1,output:10")
    _limit(model, "rpm:100", monkeypatch)
    with db.begin() as conn:
        user = make_user(conn)
        job_id = uuid.UUID(make_job(conn, user_id=user, status="running"))
    context = CallContext(job_id=job_id, user_id=user, attempt=1)
    with model_call(context, model, purpose="plan", prompt_version="plan@1") as call:
        call.usage(input_tokens=1000, output_tokens=100)
        call.bodies(request={"prompt": "secret user text"}, response="reply")
    with (
        pytest.raises(ValueError),
        model_call(
            CallContext(job_id=job_id, section_index=1, user_id=user, attempt=2), model, purpose="section"
        ) as call,
    ):
        call.usage(input_tokens=500, output_tokens=50)
        call.mark("invalid", "reply_not_json")
        raise ValueError("not JSON")
    with pytest.raises(TimeoutError), model_call(context, model, purpose="section"):
        raise TimeoutError
    monkeypatch.setenv("DYLEN_MODEL_CALL_BODIES", "true")
    model_settings.reset()
    with model_call(context, model, purpose="repair") as call:
        call.usage(input_tokens=1, output_tokens=1)
        call.bodies(request={"prompt": "a\x00b"}, response={"text": "ok"})
    rows = _calls(db, model)
    assert [(r.purpose, r.outcome, r.error_code) for r in rows] == [
        ("plan", "ok", None),
        ("section", "invalid", "reply_not_json"),
        ("section", "timeout", "TimeoutError"),
        ("repair", "ok", None),
    ]
    assert [(r.section_index, r.attempt, r.prompt_version) for r in rows][:2] == [
        (None, 1, "plan@1"),
        (1, 2, None),
    ]
    assert [(r.request_body, r.response_body) for r in rows] == [(None, None)] * 3 + [
        ({"prompt": "ab"}, {"text": "ok"})
    ]
    assert all(r.latency_ms is not None and r.ended_at is not None for r in rows)
    with connection() as conn:
        usage = ledger.job_usage(conn, job_id)
        today = ledger.user_usage(conn, user, since=datetime.now(UTC) - timedelta(hours=1))
    assert (usage.calls, usage.input_tokens, usage.output_tokens) == (4, 1501, 151)
    assert usage.cost == pytest.approx((1501 * 1 + 151 * 10) / 1e6)
    assert usage.view() == {"calls": 4, "input_tokens": 1501, "output_tokens": 151}
    assert today == usage


def test_retention_prunes_only_calls_older_than_it(
    app_env: dict[str, str], db: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = f"m-{uuid.uuid4().hex[:8]}"
    _limit(model, "rpm:100", monkeypatch)
    for _ in range(3):
        with model_call(CallContext(), model, purpose="test"):
            pass
    with db.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE model_calls SET started_at = now() - interval '31 days' WHERE id = "
                "(SELECT min(id) FROM model_calls WHERE model = :m)"
            ),
            {"m": model},
        )
    assert ledger.prune() >= 1
    assert len(_calls(db, model)) == 2


def test_jobs_show_and_users_show_print_the_usage_and_the_calls(
    app_env: dict[str, str],
    db: sa.Engine,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from common import cli

    model = f"m-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("DYLEN_MODEL_PRICES", f"{model}=input:1,output:10")
    _limit(model, "rpm:100", monkeypatch)
    with db.begin() as conn:
        user = make_user(conn)
        job_id = make_job(conn, user_id=user, status="running")
    for index, tokens in ((None, (1000, 100)), (0, (2000, 300))):
        context = CallContext(job_id=uuid.UUID(job_id), section_index=index, user_id=user, attempt=1)
        with model_call(context, model, purpose="plan" if index is None else "section") as call:
            call.usage(*tokens)
    assert cli.main(["jobs", "show", job_id]) == 0
    out = capsys.readouterr().out
    assert "usage       2 model calls, 3000 input + 400 output tokens, ~$0.0070" in out
    assert "section 0" in out and model in out
    assert cli.main(["jobs", "show", job_id, "--json"]) == 0
    detail = json.loads(capsys.readouterr().out)
    assert detail["usage"] == {
        "calls": 2,
        "input_tokens": 3000,
        "output_tokens": 400,
        "estimated_cost_usd": 0.007,
    }
    assert [(c["purpose"], c["outcome"]) for c in detail["model_calls"]] == [
        ("plan", "ok"),
        ("section", "ok"),
    ]
    assert cli.main(["users", "show", user]) == 0
    assert "models   2 calls, 3000 input + 400 output tokens, ~$0.0070 today (UTC)" in capsys.readouterr().out
