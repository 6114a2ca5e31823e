"""Tiers: the limits a user's creates are held to, the 429s they answer, a user's share of model
calls in flight, the usage users see, and the operators' set-tier and refund."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from common.accounts import users
from common.accounts.settings import tier_settings
from common.jobs.transitions import Limits, Refused
from common.platform.db import transaction
from common.platform.errors import LimitExceeded, NotFound, ValidationFailed
from common.platform.log import logger

# The active limit frees up as soon as one of the user's jobs finishes: seconds, not hours.
ACTIVE_RETRY_AFTER_SECONDS = 5


class QuotaExceeded(LimitExceeded):
    """The daily quota of the user's tier is spent; Retry-After is the next UTC midnight."""

    type_slug = "quota-exceeded"
    title = "Daily quota exceeded"


class TokenBudgetExceeded(LimitExceeded):
    """The user's model calls spent the tier's tokens of the UTC day; Retry-After is the next UTC
    midnight."""

    type_slug = "token-budget-exceeded"
    title = "Daily token budget exceeded"


class TooManyActiveJobs(LimitExceeded):
    """The user already has as many jobs active (queued, running, or a model call still in flight)
    as the tier allows."""

    type_slug = "too-many-active-jobs"
    title = "Too many active jobs"


class TierAdmission:
    """What a kind whose creates count against the tier (a lesson) hands the job system: the daily,
    token and active limits to hold a create to, and the 429 a refusal answers."""

    def limits(self) -> Limits:
        settings = tier_settings()
        return Limits(daily=settings.daily_jobs, active=settings.active_jobs, tokens=settings.daily_tokens)

    def refusal(self, refused: Refused) -> LimitExceeded:
        note_unknown_tier(refused.tier)
        if refused.outcome in ("quota-exceeded", "token-budget-exceeded"):
            assert refused.resets_at is not None
            retry_after = max(1, math.ceil((refused.resets_at - refused.now).total_seconds()))
            if refused.outcome == "token-budget-exceeded":
                return TokenBudgetExceeded(
                    f"The {refused.tier} tier allows {refused.limit} model tokens per UTC day; "
                    f"the budget resets at {refused.resets_at.isoformat()}.",
                    limit=refused.limit,
                    used=refused.used,
                    tier=refused.tier,
                    retry_after=retry_after,
                )
            return QuotaExceeded(
                f"The {refused.tier} tier allows {refused.limit} lesson jobs per UTC day "
                f"(a job counts once anything of it ran); the quota resets at "
                f"{refused.resets_at.isoformat()}.",
                limit=refused.limit,
                used=refused.used,
                tier=refused.tier,
                retry_after=retry_after,
            )
        return TooManyActiveJobs(
            f"The {refused.tier} tier allows {refused.limit} jobs active at once (queued, running, "
            "or a model call still in flight); retry when one has finished.",
            limit=refused.limit,
            used=refused.used,
            tier=refused.tier,
            retry_after=ACTIVE_RETRY_AFTER_SECONDS,
        )


TIER_ADMISSION = TierAdmission()
_unknown_tiers_logged: set[str] = set()


def note_unknown_tier(tier: str | None) -> None:
    """A tier missing from the limit maps gets free's limits; say so once per process and tier."""
    if tier is None or tier in _unknown_tiers_logged:
        return
    settings = tier_settings()
    maps = (settings.daily_jobs, settings.active_jobs, settings.daily_tokens, settings.concurrent_calls)
    if any(tier not in limits for limits in maps):
        _unknown_tiers_logged.add(tier)
        logger.warning(
            "A user's tier is missing from DYLEN_TIER_DAILY_JOBS, DYLEN_TIER_ACTIVE_JOBS, "
            "DYLEN_TIER_DAILY_TOKENS or DYLEN_TIER_CONCURRENT_CALLS; it gets the free tier's limits",
            extra={"tier": tier},
        )


def call_shares() -> dict[str, int]:
    """Per tier, the model calls a user may have in flight at once (any model): what a product
    hands each model call (`CallContext.shares`), for the lane to hold the user to."""
    return tier_settings().concurrent_calls


def usage_view(usage: users.Usage) -> dict[str, Any]:
    """`{"tier", "daily": {"limit", "used", "resets_at"}, "active": {"limit", "used"}, "tokens":
    {"limit", "used"}}` of a limited kind (a user with no job yet is on the free tier)."""
    tier = usage.tier or "free"
    note_unknown_tier(tier)
    settings = tier_settings()
    daily, active, tokens = settings.daily_jobs, settings.active_jobs, settings.daily_tokens
    return {
        "tier": tier,
        "daily": {
            "limit": daily.get(tier, daily["free"]),
            "used": usage.daily_used,
            "resets_at": (usage.day_start + timedelta(days=1)).isoformat(),
        },
        "active": {"limit": active.get(tier, active["free"]), "used": usage.active_used},
        "tokens": {"limit": tokens.get(tier, tokens["free"]), "used": usage.tokens_used},
    }


def history_limit(tier: str) -> int:
    """How many lessons a tier keeps (an unknown tier: free's)."""
    limits = tier_settings().history_limits
    return limits.get(tier, limits["free"])


def set_tier(user_id: str, tier: str) -> int:
    """Set a user's tier, one of DYLEN_TIER_HISTORY_LIMITS; returns that tier's lesson limit."""
    tiers = tier_settings().history_limits
    if tier not in tiers:
        raise ValidationFailed(
            f"Unknown tier {tier!r}; DYLEN_TIER_HISTORY_LIMITS defines: {', '.join(tiers)}."
        )
    with transaction() as conn:
        found = users.set_tier(conn, user_id=user_id, tier=tier)
    if not found:
        raise NotFound(f"No user {user_id!r} (users appear on their first request).")
    return tiers[tier]


def refund(user_id: str, *, job_kind: str, jobs: int, tokens: int) -> users.Grant:
    """Give back today's (UTC) quota when a failure was ours: up to `jobs` of the day's counted jobs
    and `tokens` of its tokens (never more than the day counts); what was given back."""
    if jobs < 0 or tokens < 0:
        raise ValidationFailed("Refund a number of jobs and tokens >= 0.")
    with transaction() as conn:
        granted = users.grant(conn, user_id=user_id, job_kind=job_kind, jobs=jobs, tokens=tokens)
    if granted is None:
        raise NotFound(f"No user {user_id!r} (users appear on their first request).")
    return granted
