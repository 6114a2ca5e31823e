"""The operator dashboard, server side: a real `dashboard` process in production auth mode over the
test database, every page and action, who is refused (401 / 403), CSRF, escaping and headers.

Google's ID-token endpoints cannot be reached here, so the test is its own issuer (tests/tokens.py):
it signs the operators' Google ID tokens and the users' Firebase tokens and serves the certificates
on loopback; everything after the key fetch is the production path.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa

from tests.factories import job_row, make_failed_fanout, make_failed_job, make_job, make_lesson, make_user
from tests.support import FunctionServer, base_env, session
from tests.tokens import CertServer, KeyPair

PROJECT = "dylen-test"
AUDIENCE = "https://dashboard.example.test"
OPERATOR = "Ops@Example.test"  # on the list in another case: e-mails compare case-insensitively
HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}


class Tokens:
    def __init__(self, key: KeyPair) -> None:
        self.key = key

    def google(self, email: str = OPERATOR, **overrides: Any) -> str:
        now = int(time.time())
        claims = {
            "iss": "https://accounts.google.com",
            "aud": AUDIENCE,
            "sub": "operator-1",
            "email": email,
            "email_verified": True,
            "iat": now - 60,
            "exp": now + 3600,
            **overrides,
        }
        return self.key.sign(claims)

    def firebase(self, uid: str) -> str:
        now = int(time.time())
        claims = {
            "iss": f"https://securetoken.google.com/{PROJECT}",
            "aud": PROJECT,
            "sub": uid,
            "auth_time": now - 60,
            "iat": now - 60,
            "exp": now + 3600,
        }
        return self.key.sign(claims)


@pytest.fixture(scope="module")
def tokens() -> Iterator[tuple[Tokens, CertServer]]:
    key = KeyPair.generate("dash-key")
    certs = CertServer({key.kid: key.cert_pem})
    yield Tokens(key), certs
    certs.shutdown()


@pytest.fixture(scope="module")
def dashboard(database_url: str, logs_dir: Path, tokens: tuple[Tokens, CertServer]) -> Iterator[str]:
    _, certs = tokens
    env = base_env(
        database_url,
        DYLEN_AUTH_MODE="firebase",
        DYLEN_FIREBASE_PROJECT_ID=PROJECT,
        DYLEN_FIREBASE_CERTS_URL=certs.url("firebase"),
        DYLEN_GOOGLE_OIDC_CERTS_URL=certs.url("oidc"),
        DYLEN_DASHBOARD_OPERATORS="someone@example.test, ops@example.test",
        DYLEN_DASHBOARD_AUDIENCE=AUDIENCE,
        DYLEN_JOBS_AUTO_PROCESS="false",
    )
    server = FunctionServer("dashboard", env, logs_dir).start()
    yield server.url
    server.stop()


@pytest.fixture
def op(dashboard: str, tokens: tuple[Tokens, CertServer]) -> requests.Session:
    """A browser-like session of an operator on the list."""
    http = session()
    http.headers.update(HTML, Authorization=f"Bearer {tokens[0].google()}")
    return http


def _csrf(page: requests.Response) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
    assert found, page.text[:2000]
    return found.group(1)


def _failed_job(db: sa.Engine, user: str, code: str = "generator_failed") -> str:
    with db.begin() as conn:
        return make_failed_job(conn, user_id=user, code=code)


# --- who gets in -----------------------------------------------------------------------------------


def test_no_credentials_is_401_with_an_html_page_for_browsers(dashboard: str) -> None:
    page = session().get(dashboard + "/", headers=HTML, timeout=10)
    assert page.status_code == 401 and page.headers["WWW-Authenticate"] == "Bearer"
    assert page.headers["Content-Type"].startswith("text/html") and "Google ID token" in page.text
    api = session().get(dashboard + "/jobs", timeout=10)  # not a browser: problem+json
    assert api.status_code == 401 and api.headers["Content-Type"] == "application/problem+json"
    dev = session().get(dashboard + "/", headers={"X-Dylen-Operator": OPERATOR}, timeout=10)
    assert dev.status_code == 401  # the dev header means nothing in production mode


def test_a_user_token_is_403(dashboard: str, tokens: tuple[Tokens, CertServer]) -> None:
    token = tokens[0].firebase("some-user")
    answer = session().get(dashboard + "/", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert answer.status_code == 403 and "Users cannot" in answer.json()["detail"]


@pytest.mark.parametrize(
    ("claims", "status", "hint"),
    [
        ({"email": "intruder@example.test"}, 403, "not on DYLEN_DASHBOARD_OPERATORS"),
        ({"email_verified": False}, 403, "verified"),
        ({"aud": "https://elsewhere.example.test"}, 401, "audience"),
        ({"iss": "https://evil.example.test"}, 401, "issuer"),
        ({"exp": int(time.time()) - 30, "iat": int(time.time()) - 3600}, 401, "expired"),
    ],
)
def test_only_a_verified_listed_google_account_gets_in(
    dashboard: str, tokens: tuple[Tokens, CertServer], claims: dict[str, Any], status: int, hint: str
) -> None:
    token = tokens[0].google(**claims)
    answer = session().get(dashboard + "/", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert answer.status_code == status, answer.text
    assert hint.lower() in answer.json()["detail"].lower()


def test_every_page_answers_with_security_headers(op: requests.Session, dashboard: str) -> None:
    for path in (
        "/",
        "/queue",
        "/jobs",
        "/failures",
        "/usage",
        "/models",
        "/users",
        "/jobs?status=error&older_than=1s",
    ):
        page = op.get(dashboard + path, timeout=10)
        assert page.status_code == 200, (path, page.text[:500])
        assert page.headers["Content-Type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["Content-Security-Policy"]
        assert "<script>" not in page.text and "style=" not in page.text  # the CSP allows neither inline
        assert page.headers["X-Frame-Options"] == "DENY" and page.headers["Cache-Control"] == "no-store"
        assert "ops@example.test" in page.text
    assert (
        op.get(dashboard + "/assets/dashboard.js", timeout=10)
        .headers["Content-Type"]
        .startswith("text/javascript")
    )
    missing = op.get(dashboard + "/nowhere", timeout=10)
    assert missing.status_code == 404 and "Overview" in missing.text  # an HTML page with a way back


# --- pages -----------------------------------------------------------------------------------------


def _cell(page: str, kind: str, status: str) -> int:
    found = re.search(rf'href="jobs\?kind={re.escape(kind)}&amp;status={status}">([\d,]+)<', page)
    return int(found.group(1).replace(",", "")) if found else 0


def test_overview_counts_the_seeded_jobs(op: requests.Session, dashboard: str, db: sa.Engine) -> None:
    kind = f"test.kind-{uuid.uuid4().hex[:6]}"
    with db.begin() as conn:
        for status in ("queued", "running", "done", "done", "error", "canceled"):
            job_id = make_job(conn, user_id=None, job_kind=kind, status=status)
            if status in ("done", "error", "canceled"):
                conn.execute(sa.text("UPDATE jobs SET completed_at = now() WHERE id = :id"), {"id": job_id})
        # Done long ago: counted through the stored total once the mark has moved past it.
        old = make_job(conn, user_id=None, job_kind=kind, status="done")
        conn.execute(
            sa.text(
                "UPDATE jobs SET created_at = now() - interval '3 days', completed_at = now() - interval '3 days' "
                "WHERE id = :id"
            ),
            {"id": old},
        )
        conn.execute(sa.text("UPDATE job_done_mark SET through = now() - interval '5 days'"))
    page = op.get(dashboard + "/", timeout=10)
    assert page.status_code == 200
    assert 'data-live="overview.json"' in page.text and "<svg" in page.text and "<polyline" in page.text
    all_time, last_day = page.text.split("<h2>All time</h2>")[1], page.text.split("<h2>All time</h2>")[0]
    expected = {"queued": 1, "running": 1, "done": 3, "error": 1, "canceled": 1}
    assert {s: _cell(all_time, kind, s) for s in expected} == expected
    assert _cell(last_day, kind, "done") == 2  # the old one is not in the last 24 h
    with db.connect() as conn:  # the mark moved to an hour ago, the old job into the total
        through = conn.execute(sa.text("SELECT now() - through FROM job_done_mark")).scalar_one()
        assert 3500 < through.total_seconds() < 3700
    again = op.get(dashboard + "/", timeout=10).text.split("<h2>All time</h2>")[1]
    assert _cell(again, kind, "done") == 3  # the same after the move: nothing counted twice


def test_jobs_page_filters_pages_and_searches(op: requests.Session, dashboard: str, db: sa.Engine) -> None:
    user = f"pager-{uuid.uuid4().hex[:8]}"
    with db.begin() as conn:
        make_user(conn, user)
        ids = [make_job(conn, user_id=user, status="done") for _ in range(55)]
    first = op.get(dashboard + "/jobs", params={"user": user}, timeout=10)
    assert first.status_code == 200 and first.text.count('href="job?id=') == 50
    next_url = re.search(r'id="next" href="([^"]+)"', first.text)
    assert next_url
    second = op.get(dashboard + "/" + next_url.group(1).replace("&amp;", "&"), timeout=10)
    listed = set(re.findall(r'href="job\?id=([0-9a-f-]+)"', first.text + second.text))
    assert listed == set(ids) and 'id="next"' not in second.text
    by_id = op.get(dashboard + "/jobs", params={"q": ids[0]}, allow_redirects=False, timeout=10)
    assert by_id.status_code == 303 and by_id.headers["Location"] == f"job?id={ids[0]}"
    by_user = op.get(dashboard + "/jobs", params={"q": user}, allow_redirects=False, timeout=10)
    assert by_user.headers["Location"] == f"jobs?user={user}"
    bad = op.get(dashboard + "/jobs", params={"older_than": "soon"}, timeout=10)
    assert bad.status_code == 422 and "Malformed duration" in bad.text
    assert op.get(dashboard + "/jobs", params={"cursor": "nope"}, timeout=10).status_code == 422


def test_job_page_shows_timeline_request_error_and_lesson(
    op: requests.Session, dashboard: str, db: sa.Engine
) -> None:
    user = f"detail-{uuid.uuid4().hex[:8]}"
    job_id = _failed_job(db, user)
    page = op.get(dashboard + "/job", params={"id": job_id}, timeout=10)
    assert page.status_code == 200
    for text in ("created", "dispatched", "3 of 3", "Tides", "the model said no", "generator_failed"):
        assert text in page.text, text
    assert 'id="retry"' in page.text and 'id="cancel"' not in page.text
    with db.begin() as conn:
        lesson_id = make_lesson(conn, user_id=user, topic="Volcanoes")
        lesson_job = conn.execute(
            sa.text("SELECT job_id FROM lessons WHERE id = :id"), {"id": lesson_id}
        ).scalar_one()
    with_lesson = op.get(dashboard + "/job", params={"id": str(lesson_job)}, timeout=10)
    assert lesson_id in with_lesson.text and "Volcanoes" in with_lesson.text
    assert op.get(dashboard + "/job", params={"id": str(uuid.uuid4())}, timeout=10).status_code == 404
    assert op.get(dashboard + "/job", params={"id": "x"}, timeout=10).status_code == 422


def test_job_page_lists_a_fanned_out_lessons_sections(
    op: requests.Session, dashboard: str, db: sa.Engine
) -> None:
    # Given a lesson job waiting on two sections (one done, one queued)
    user = f"fan-{uuid.uuid4().hex[:8]}"
    with db.begin() as conn:
        parent = make_job(conn, user_id=make_user(conn, user), status="running")
        sections = [
            make_job(conn, user_id=user, job_kind="lesson.section", status=status)
            for status in ("done", "queued")
        ]
        for index, section in enumerate(sections):
            conn.execute(
                sa.text("UPDATE jobs SET parent_id = :p, section_index = :i WHERE id = :id"),
                {"p": parent, "i": index, "id": section},
            )
    # Then its page lists both sections, and the jobs list shows only the parent
    page = op.get(dashboard + "/job", params={"id": parent}, timeout=10)
    assert page.status_code == 200
    assert all(section in page.text for section in sections)
    listed = op.get(dashboard + "/jobs", params={"user": user}, timeout=10).text
    assert parent in listed and not any(section in listed for section in sections)


def test_model_calls_on_the_job_page_and_lanes_days_and_users_on_the_models_page(
    op: requests.Session, dashboard: str, db: sa.Engine
) -> None:
    # Given a lesson job whose plan was repaired and whose section 0 hit a 429, on a paused lane
    user = f"calls-{uuid.uuid4().hex[:8]}"
    model = f"model-{uuid.uuid4().hex[:8]}"
    with db.begin() as conn:
        job_id = make_job(conn, user_id=make_user(conn, user), status="running")
        for purpose, index, outcome, tokens in (
            ("plan", None, "invalid", (100, 50)),
            ("repair", None, "ok", (150, 60)),
            ("section", 0, "rate_limited", (None, None)),
        ):
            conn.execute(
                sa.text(
                    "INSERT INTO model_calls (model, job_id, section_index, attempt, user_id, purpose, "
                    "prompt_version, started_at, lease_expires_at, ended_at, latency_ms, input_tokens, "
                    "output_tokens, outcome) VALUES (:m, :j, :i, 1, :u, :p, 'plan@1+abc', now(), now(), "
                    "now(), 900, :in, :out, :o)"
                ),
                {
                    "m": model,
                    "j": job_id,
                    "i": index,
                    "u": user,
                    "p": purpose,
                    "in": tokens[0],
                    "out": tokens[1],
                    "o": outcome,
                },
            )
        conn.execute(
            sa.text("INSERT INTO model_lanes (model, paused_until) VALUES (:m, now() + interval '1 hour')"),
            {"m": model},
        )
    # Then the job page lists the calls and the usage
    page = op.get(dashboard + "/job", params={"id": job_id}, timeout=10).text
    assert "3 calls, 250 input + 110 output tokens" in page
    for text in ("repair", "rate_limited", "section 0", "plan@1+abc", "900 ms"):
        assert text in page, text
    # And the models page shows the lane (paused), today's totals for the model and the user
    models = op.get(dashboard + "/models", timeout=10)
    assert models.status_code == 200
    row = re.search(rf"<tr><td>{model}</td>.*?</tr>", models.text, re.S)
    assert row and "UTC" in row.group(0) and '<td class="n">3</td>' in row.group(0)  # paused; 3 this window
    assert re.search(
        rf"<td>{model}</td><td class=\"n\">3</td><td class=\"n\">250</td><td class=\"n\">110</td>",
        models.text,
    )
    assert re.search(rf">{user}</a></td><td class=\"n\">3</td><td class=\"n\">250</td>", models.text)


def test_hostile_text_is_escaped(op: requests.Session, dashboard: str, db: sa.Engine) -> None:
    user = f"<script>alert({uuid.uuid4().hex[:4]})</script>"
    with db.begin() as conn:
        job_id = make_failed_job(
            conn, user_id=user, code='<img src=x onerror="alert(1)">', topic="<script>alert(2)</script>"
        )
        # finished, so that no rescue in the same test run ever picks up a job of no kind
        odd = make_job(
            conn, user_id=None, job_kind=f"<img src=x onerror=alert(3)>{uuid.uuid4().hex[:4]}", status="done"
        )
        conn.execute(sa.text("UPDATE jobs SET completed_at = now() WHERE id = :id"), {"id": odd})
    pages = (
        ("/job", {"id": job_id}),
        ("/failures", {}),
        ("/users", {"q": user}),
        ("/jobs", {"user": user}),
        ("/queue", {}),
        ("/", {}),
    )
    for path, params in pages:
        page = op.get(dashboard + path, params=params, timeout=10)
        assert page.status_code == 200
        assert "<script>alert" not in page.text and "<img src=x" not in page.text, path
        assert "&lt;script&gt;alert" in page.text or "&lt;img src=x" in page.text, path
    # the live regions are the same escaped HTML
    for path, params in (("/job.json", {"id": job_id}), ("/jobs.json", {"user": user}), ("/queue.json", {})):
        regions = " ".join(op.get(dashboard + path, params=params, timeout=10).json()["regions"].values())
        assert "<script>alert" not in regions and "<img src=x" not in regions, path
        assert "&lt;script&gt;alert" in regions or "&lt;img src=x" in regions, path


# --- actions ---------------------------------------------------------------------------------------


def test_retry_and_cancel_from_the_job_page(op: requests.Session, dashboard: str, db: sa.Engine) -> None:
    job_id = _failed_job(db, f"retry-{uuid.uuid4().hex[:8]}")
    page = op.get(dashboard + "/job", params={"id": job_id}, timeout=10)
    retried = op.post(
        dashboard + "/retry", data={"csrf": _csrf(page), "id": job_id}, allow_redirects=False, timeout=10
    )
    assert retried.status_code == 303 and retried.headers["Location"] == f"job?id={job_id}&notice=retried"
    with db.connect() as conn:
        row = job_row(conn, job_id)
    assert row["status"] == "queued" and row["max_attempts"] == 3 + 5  # ops.retry_job: the CLI's rule
    shown = op.get(dashboard + "/" + retried.headers["Location"], timeout=10)
    assert "Retried: the job is queued again." in shown.text and 'id="cancel"' in shown.text
    again = op.post(dashboard + "/retry", data={"csrf": _csrf(page), "id": job_id}, timeout=10)
    assert again.status_code == 409 and "only error or canceled" in again.text
    canceled = op.post(dashboard + "/cancel", data={"csrf": _csrf(shown), "id": job_id}, timeout=10)
    assert canceled.status_code == 200 and "Canceled." in canceled.text  # followed the 303
    with db.connect() as conn:
        assert job_row(conn, job_id)["status"] == "canceled"


def test_bulk_retry_of_a_failure_group_asks_first(
    op: requests.Session, dashboard: str, db: sa.Engine
) -> None:
    code = f"flaky_{uuid.uuid4().hex[:6]}"
    ids = {_failed_job(db, f"bulk-{uuid.uuid4().hex[:8]}", code=code) for _ in range(3)}
    other = _failed_job(db, f"bulk-{uuid.uuid4().hex[:8]}", code=code + "_other")
    failures = op.get(dashboard + "/failures", timeout=10)
    assert f"failures?code={code}" in failures.text and "Retry all 3" in failures.text
    confirm = op.get(dashboard + "/retry-group", params={"code": code}, timeout=10)
    assert confirm.status_code == 200 and "Retry 3 job(s)" in confirm.text
    with db.connect() as conn:
        assert {job_row(conn, i)["status"] for i in ids} == {"error"}  # asking changed nothing
    listed = re.findall(r'name="id" value="([0-9a-f-]+)"', confirm.text)
    done = op.post(dashboard + "/retry-group", data={"csrf": _csrf(confirm), "id": listed}, timeout=10)
    assert done.status_code == 200 and "Retried 3 of 3" in done.text
    with db.connect() as conn:
        assert {job_row(conn, i)["status"] for i in ids} == {"queued"}
        assert job_row(conn, other)["status"] == "error"


def test_set_tier(op: requests.Session, dashboard: str, db: sa.Engine) -> None:
    user = f"tier-{uuid.uuid4().hex[:8]}"
    with db.begin() as conn:
        make_user(conn, user)
        make_lesson(conn, user_id=user)
        make_lesson(conn, user_id=user, archived_at=None)
        make_lesson(conn, user_id=user, archived_at=datetime.now(UTC))
    page = op.get(dashboard + "/users", params={"q": user}, timeout=10)
    assert page.status_code == 200
    row = page.text.split(f'href="jobs?user={user}"')[1]
    assert re.findall(r'class="n">(\d+)<', row)[:2] == ["2", "1"]  # visible, archived
    # today's lesson jobs (the three lessons' jobs, done) and the active ones, against the quotas
    assert [used for used, _ in re.findall(r'class="n">(\d+)/([\d,]+)<', row)] == ["3", "0"]
    changed = op.post(
        dashboard + "/set-tier", data={"csrf": _csrf(page), "user": user, "tier": "pro"}, timeout=10
    )
    assert changed.status_code == 200 and "Tier updated." in changed.text
    with db.connect() as conn:
        tier = conn.execute(sa.text("SELECT tier FROM users WHERE id = :u"), {"u": user}).scalar_one()
    assert tier == "pro"
    bad = op.post(
        dashboard + "/set-tier", data={"csrf": _csrf(page), "user": user, "tier": "gold"}, timeout=10
    )
    assert bad.status_code == 422 and "Unknown tier" in bad.text
    nul = op.post(
        dashboard + "/set-tier", data={"csrf": _csrf(page), "user": "a\x00", "tier": "pro"}, timeout=10
    )
    assert nul.status_code == 422 and "NUL" in nul.text


def test_csrf_is_refused(
    op: requests.Session, dashboard: str, db: sa.Engine, tokens: tuple[Tokens, CertServer]
) -> None:
    job_id = _failed_job(db, f"csrf-{uuid.uuid4().hex[:8]}")
    token = _csrf(op.get(dashboard + "/job", params={"id": job_id}, timeout=10))
    other = session()
    other.headers.update(HTML, Authorization=f"Bearer {tokens[0].google('someone@example.test')}")
    cases = {
        "no token": (op, {"id": job_id}, {}),
        "garbled": (op, {"id": job_id, "csrf": "0" * 64}, {}),
        "another operator's": (other, {"id": job_id, "csrf": token}, {}),
        "cross-site": (op, {"id": job_id, "csrf": token}, {"Sec-Fetch-Site": "cross-site"}),
    }
    for case, (http, form, headers) in cases.items():
        answer = http.post(
            dashboard + "/retry", data=form, headers=headers, allow_redirects=False, timeout=10
        )
        assert answer.status_code == 403, (case, answer.text[:300])
    with db.connect() as conn:
        assert job_row(conn, job_id)["status"] == "error"
    ok = op.post(
        dashboard + "/retry",
        data={"id": job_id, "csrf": token},
        headers={"Sec-Fetch-Site": "same-origin"},
        allow_redirects=False,
        timeout=10,
    )
    assert ok.status_code == 303  # the control: the same form with its token goes through


def test_methods_other_than_get_and_post_are_405(op: requests.Session, dashboard: str) -> None:
    answer = op.request("PATCH", dashboard + "/", timeout=10)
    assert answer.status_code == 405 and answer.headers["Allow"] == "GET, HEAD, POST"


def test_a_bad_operator_list_fails_the_cold_start_naming_the_variable() -> None:
    import os

    from common.platform.config import load_settings
    from common.platform.errors import ConfigError

    env = {"DYLEN_ENV_FILE": os.devnull, "DYLEN_AUTH_MODE": "dev"}
    with pytest.raises(ConfigError, match="DYLEN_DASHBOARD_OPERATORS"):
        load_settings({**env, "DYLEN_DASHBOARD_OPERATORS": "ops@example.test, not-an-email"})
    ok = load_settings({**env, "DYLEN_DASHBOARD_OPERATORS": " A@Example.test,b@example.test "})
    assert ok.dashboard_operators == ("a@example.test", "b@example.test")


# --- what a new operator met (issue 25): each failed before its fix ---------------------------------


def test_assets_need_no_credentials_so_error_pages_are_styled(dashboard: str) -> None:
    page = session().get(dashboard + "/jobs", headers=HTML, timeout=10)
    assert page.status_code == 401 and 'href="assets/dashboard.css"' in page.text
    css = session().get(dashboard + "/assets/dashboard.css", timeout=10)
    assert css.status_code == 200 and css.headers["Content-Type"].startswith("text/css")
    assert "nav" in css.text and css.headers["X-Content-Type-Options"] == "nosniff"
    assert session().get(dashboard + "/assets/secret.txt", timeout=10).status_code == 404
    assert session().get(dashboard + "/assets/../jobs", timeout=10).status_code in (401, 404)


def test_a_section_kind_filter_lists_the_sections(
    op: requests.Session, dashboard: str, db: sa.Engine
) -> None:
    user = f"sect-{uuid.uuid4().hex[:8]}"
    with db.begin() as conn:
        parent, sections = make_failed_fanout(conn, user_id=user)
    overview = op.get(dashboard + "/", timeout=10).text
    assert 'href="jobs?kind=lesson.section&amp;status=done"' in overview
    listed = op.get(dashboard + "/jobs", params={"kind": "lesson.section", "user": user}, timeout=10).text
    assert all(s in listed for s in sections) and "No jobs match" not in listed
    plain = op.get(dashboard + "/jobs", params={"user": user}, timeout=10).text
    assert parent in plain and not any(s in plain for s in sections)  # rolled up under their lesson


def test_a_failed_lesson_is_one_failure_group_whose_retry_takes_it(
    op: requests.Session, dashboard: str, db: sa.Engine
) -> None:
    code, section_code = f"lessonfail_{uuid.uuid4().hex[:6]}", f"sectionfail_{uuid.uuid4().hex[:6]}"
    with db.begin() as conn:
        parent, _ = make_failed_fanout(
            conn, user_id=f"grp-{uuid.uuid4().hex[:8]}", code=code, section_code=section_code
        )
    failures = op.get(dashboard + "/failures", timeout=10).text
    assert f"failures?code={code}" in failures and section_code not in failures
    assert f"retry-group?code={code}" in failures.split(f"failures?code={code}")[1].split("</tr>")[0]
    confirm = op.get(dashboard + "/retry-group", params={"code": code}, timeout=10).text
    assert "Retry 1 job(s)" in confirm and f'name="id" value="{parent}"' in confirm


def _error_tile(op: requests.Session, dashboard: str) -> tuple[int, int]:
    found = re.search(
        r"<small>([\d,]+) error / ([\d,]+) done</small>", op.get(dashboard + "/", timeout=10).text
    )
    assert found
    return int(found.group(1).replace(",", "")), int(found.group(2).replace(",", ""))


def test_sections_do_not_count_in_the_error_rate(op: requests.Session, dashboard: str, db: sa.Engine) -> None:
    before = _error_tile(op, dashboard)
    with db.begin() as conn:  # one failed lesson: one section done, one failed, one canceled
        make_failed_fanout(conn, user_id=f"rate-{uuid.uuid4().hex[:8]}")
    after = _error_tile(op, dashboard)
    assert (after[0] - before[0], after[1] - before[1]) == (1, 0)


def test_a_failed_lessons_page_shows_sections_with_headings_and_no_none(
    op: requests.Session, dashboard: str, db: sa.Engine
) -> None:
    with db.begin() as conn:
        parent, sections = make_failed_fanout(conn, user_id=f"page-{uuid.uuid4().hex[:8]}")
    page = op.get(dashboard + "/job", params={"id": parent}, timeout=10).text
    assert "None" not in page and "section_failed" in page
    table = page.split('id="sections"')[1].split("</table>")[0]
    rows = re.findall(r'<td class="n">(\d)</td>\s*<td>(?:<a [^>]*>)?([A-Za-z]+)', table)
    assert rows == [("0", "Sources"), ("1", "Meanders"), ("2", "Deltas")], table
    section = op.get(dashboard + "/job", params={"id": sections[1]}, timeout=10).text
    attempts = section.split('id="attempts"')[1].split("</table>")[0]
    assert attempts.count("RuntimeError: transient: section 1 model is down") == 3
    with db.begin() as conn:
        lesson_id = make_lesson(conn, user_id=make_user(conn, f"page-{uuid.uuid4().hex[:8]}"))
        done = conn.execute(
            sa.text("SELECT job_id FROM lessons WHERE id = :id"), {"id": lesson_id}
        ).scalar_one()
    shown = op.get(dashboard + "/job", params={"id": str(done)}, timeout=10).text
    assert 'id="error"' not in shown and "null" not in shown


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/jobs", {"user": "a\x00b"}),
        ("/jobs", {"kind": "lesson\x00"}),
        ("/jobs", {"q": "x\x00y"}),
        ("/jobs", {"older_than": "9999999999999999999999d"}),
        ("/failures", {"code": "a\x00"}),
        ("/retry-group", {"code": "a\x00"}),
        ("/users", {"q": "a\x00"}),
    ],
)
def test_operator_input_postgresql_cannot_take_is_a_422(
    op: requests.Session, dashboard: str, path: str, params: dict[str, str]
) -> None:
    answer = op.get(dashboard + path, params=params, timeout=10)
    assert answer.status_code == 422, answer.text[:500]


def test_bulk_cancel_confirms_which_jobs_it_takes_and_reports_the_rest(
    op: requests.Session, dashboard: str, db: sa.Engine
) -> None:
    user = f"bulkcancel-{uuid.uuid4().hex[:8]}"
    with db.begin() as conn:
        make_user(conn, user)
        live = [make_job(conn, user_id=user, status=s) for s in ("queued", "running")]
        done = make_job(conn, user_id=user, status="done")
    listed = op.get(dashboard + "/jobs", params={"user": user}, timeout=10).text
    assert listed.count('name="id" value=') == 3 and 'id="bulk-cancel"' in listed
    confirm = op.get(
        dashboard + "/bulk", params=[("action", "cancel"), *[("id", i) for i in [*live, done]]], timeout=10
    )
    assert confirm.status_code == 200 and "Cancel 2 job(s)?" in confirm.text
    form = confirm.text.split('action="bulk"')[1].split("</form>")[0]
    assert set(re.findall(r'name="id" value="([0-9a-f-]+)"', form)) == set(live)
    assert done in confirm.text.split("Left as they are")[1]
    with db.connect() as conn:  # asking changed nothing
        assert [job_row(conn, i)["status"] for i in live] == ["queued", "running"]
    canceled = op.post(
        dashboard + "/bulk",
        data={"csrf": _csrf(confirm), "action": "cancel", "id": [*live, done]},
        timeout=10,
    )
    assert canceled.status_code == 200 and "Canceled 2 of 3 job(s)" in canceled.text
    assert "already done" in canceled.text  # why the third was left
    with db.connect() as conn:
        assert {job_row(conn, i)["status"] for i in live} == {"canceled"}
    for bad in ({"action": "delete", "id": live[0]}, {"action": "retry"}):
        assert op.get(dashboard + "/bulk", params=bad, timeout=10).status_code == 422
    no_token = op.post(dashboard + "/bulk", data={"action": "cancel", "id": done}, timeout=10)
    assert no_token.status_code == 403


# --- live updates and the queue view --------------------------------------------------------------


def test_a_live_pages_json_twin_renders_its_regions_and_says_when_it_is_final(
    op: requests.Session, dashboard: str, db: sa.Engine
) -> None:
    user = f"live-{uuid.uuid4().hex[:8]}"
    with db.begin() as conn:
        parent = make_job(conn, user_id=make_user(conn, user), status="running")
        conn.execute(
            sa.text("UPDATE jobs SET plan = '{\"sections\": []}', started_at = now() WHERE id = :id"),
            {"id": parent},
        )
        sections = []
        for index, status in enumerate(("done", "queued", "queued")):
            section = make_job(conn, user_id=user, job_kind="lesson.section", status=status)
            conn.execute(
                sa.text("UPDATE jobs SET parent_id = :p, section_index = :i WHERE id = :id"),
                {"p": parent, "i": index, "id": section},
            )
            sections.append(section)
    page = op.get(dashboard + "/job", params={"id": parent}, timeout=10).text
    assert f'data-live="job.json?id={parent}"' in page and 'id="job-head"' in page
    assert (
        "connect-src 'self'"
        in op.get(dashboard + "/job", params={"id": parent}, timeout=10).headers["Content-Security-Policy"]
    )
    live = op.get(dashboard + "/job.json", params={"id": parent}, timeout=10)
    assert live.status_code == 200 and live.headers["Content-Type"] == "application/json"
    body = live.json()
    assert body["status"] == "running" and body["progress"] == {"completed": 1, "total": 3}
    assert body["final"] is False and set(body["regions"]) == {"job-head", "job-body"}
    assert 'value="1" max="3"' in body["regions"]["job-head"]  # the progress bar
    with db.begin() as conn:  # a section finishes: the next poll shows it
        conn.execute(sa.text("UPDATE jobs SET status = 'done' WHERE id = :id"), {"id": sections[1]})
    assert (
        op.get(dashboard + "/job.json", params={"id": parent}, timeout=10).json()["progress"]["completed"]
        == 2
    )
    listed = op.get(dashboard + "/jobs.json", params={"user": user}, timeout=10).json()
    assert [j["id"] for j in listed["jobs"]] == [parent] and listed["jobs"][0]["progress"] == [2, 3]
    assert f'data-id="{parent}"' in listed["regions"]["job-rows"]
    with db.begin() as conn:
        conn.execute(
            sa.text("UPDATE jobs SET status = 'canceled' WHERE id = ANY(:ids)"),
            {"ids": [parent, *sections[2:]]},
        )
    assert op.get(dashboard + "/job.json", params={"id": parent}, timeout=10).json()["final"] is True
    overview = op.get(dashboard + "/overview.json", timeout=10).json()
    assert "error-rate" in overview["regions"]["overview-live"]
    assert session().get(dashboard + "/job.json", params={"id": parent}, timeout=10).status_code == 401


def test_the_queue_view_counts_ready_scheduled_in_flight_and_waiting_by_kind(
    op: requests.Session, dashboard: str, db: sa.Engine
) -> None:
    kind = f"test.queue-{uuid.uuid4().hex[:6]}"
    with db.begin() as conn:
        ready = [make_job(conn, user_id=None, job_kind=kind) for _ in range(3)]
        later = make_job(conn, user_id=None, job_kind=kind)
        flying = make_job(conn, user_id=None, job_kind=kind, status="running", lease_seconds=600)
        waiting = make_job(conn, user_id=None, job_kind=kind, status="running")
        finished = [make_job(conn, user_id=None, job_kind=kind, status=s) for s in ("done", "done", "error")]
        conn.execute(
            sa.text("UPDATE jobs SET run_after = now() + interval '1 hour' WHERE id = :id"), {"id": later}
        )
        conn.execute(
            sa.text("UPDATE jobs SET dispatched_at = now() - interval '90 seconds' WHERE id = :id"),
            {"id": ready[0]},
        )
        conn.execute(
            sa.text(
                "UPDATE jobs SET started_at = created_at + interval '2 seconds', "
                "completed_at = created_at + interval '5 seconds' WHERE id = ANY(:ids)"
            ),
            {"ids": finished},
        )
        # A busy kind finishing 150 jobs in the same minutes, newer: it must not crowd this kind's
        # few out of the percentiles' sample (a sample per bucket alone did, in a full test run).
        conn.execute(
            sa.text(
                "INSERT INTO jobs (id, user_id, job_kind, status, idempotency_key, request_json, attempts, "
                "max_attempts, created_at, started_at, completed_at) "
                "SELECT gen_random_uuid(), NULL, :busy, 'done', 'busy-' || g, '{}', 1, 1, now(), "
                "now() + interval '1 second', now() + interval '6 seconds' FROM generate_series(1, 150) g"
            ),
            {"busy": f"{kind}-busy"},
        )
    assert flying and waiting
    page = op.get(dashboard + "/queue", timeout=10)
    assert page.status_code == 200 and 'data-live="queue.json?window=1h"' in page.text
    row = page.text.split(f">{kind}</a>")[1].split("</tr>")[0]
    cells = re.findall(r'<td class="n">(?:<a [^>]*>)?([^<]*)', row)
    # ready, scheduled (next in 1h), in flight, waiting on sections, oldest ready, jobs, failed,
    # wait p50 / p95, run p50 / p95
    assert cells[:4] == ["3", "1 ", "1", "1"], cells
    assert cells[4].startswith("1m3") and cells[5:7] == ["3", "1"], cells
    assert cells[7:] == ["2.0s / 2.0s", "3.0s / 3.0s"], cells
    assert page.text.count("<svg") == 2 and "jobs finished per minute" in page.text
    for window in ("6h", "24h"):
        assert op.get(dashboard + "/queue", params={"window": window}, timeout=10).status_code == 200
    assert op.get(dashboard + "/queue", params={"window": "7d"}, timeout=10).status_code == 422
    assert kind in op.get(dashboard + "/queue.json", timeout=10).json()["regions"]["queue-live"]
    scheduled = op.get(dashboard + "/job", params={"id": later}, timeout=10).text
    assert re.search(r'id="next-attempt">in 59m\d+s <small>', scheduled), scheduled
    with db.begin() as conn:  # live jobs of no real kind: gone before any rescue in this run sees them
        conn.execute(sa.text("DELETE FROM jobs WHERE job_kind = :k"), {"k": kind})


def test_the_usage_view_ranks_users_by_jobs_and_counts_a_lesson_once(
    op: requests.Session, dashboard: str, db: sa.Engine
) -> None:
    heavy, light = f"heavy-{uuid.uuid4().hex[:8]}", f"light-{uuid.uuid4().hex[:8]}"
    with db.begin() as conn:
        make_failed_fanout(conn, user_id=heavy)  # one failed lesson: 1 job, 3 sections
        make_user(conn, heavy, tier="pro")
        for _ in range(70):  # more than any other test's user creates
            make_job(conn, user_id=heavy, status="done")
        make_job(conn, user_id=make_user(conn, light), status="queued")
    page = op.get(dashboard + "/usage", timeout=10)
    assert page.status_code == 200 and 'data-live="usage.json"' in page.text and "<svg" in page.text
    table = page.text.split('id="top-users"')[1].split("</table>")[0]
    first = table.split("<tbody>")[1].split("</tr>")[0]
    assert f"jobs?user={heavy}" in first and ">pro<" in first
    # jobs, done, failed, canceled, queued or running, sections, today / quota, active / limit
    assert re.findall(r'<td class="n">(?:<a [^>]*>)?([^<]*)', first)[:6] == ["71", "70", "1", "0", "0", "3"]
    assert "/1,000,000" in first
    assert op.get(dashboard + "/usage.json", timeout=10).json()["regions"]["usage-live"].count("<tr>") >= 2
