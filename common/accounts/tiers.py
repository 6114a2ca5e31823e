"""Tiers: the limits a user's creates are held to, the 429s they answer, the usage users see, and
the operators' set-tier."""

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


class TooManyActiveJobs(LimitExceeded):
    """The user already has as many jobs queued or running as the tier allows."""

    type_slug = "too-many-active-jobs"
    title = "Too many active jobs"


class TierAdmission:
    """What a kind whose creates count against the tier (a lesson) hands the job system: the daily
    and active limits to hold a create to, and the 429 a refusal answers."""

    def limits(self) -> Limits:
        settings = tier_settings()
        return Limits(daily=settings.daily_jobs, active=settings.active_jobs)

    def refusal(self, refused: Refused) -> LimitExceeded:
        note_unknown_tier(refused.tier)
        if refused.outcome == "quota-exceeded":
            assert refused.resets_at is not None
            retry_after = max(1, math.ceil((refused.resets_at - refused.now).total_seconds()))
            return QuotaExceeded(
                f"The {refused.tier} tier allows {refused.limit} lesson jobs per UTC day; "
                f"the quota resets at {refused.resets_at.isoformat()}.",
                limit=refused.limit,
                used=refused.used,
                tier=refused.tier,
                retry_after=retry_after,
            )
        return TooManyActiveJobs(
            f"The {refused.tier} tier allows {refused.limit} jobs queued or running at once; "
            "retry when one has finished.",
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
    if tier not in settings.daily_jobs or tier not in settings.active_jobs:
        _unknown_tiers_logged.add(tier)
        logger.warning(
            "A user's tier is missing from DYLEN_TIER_DAILY_JOBS or DYLEN_TIER_ACTIVE_JOBS; "
            "it gets the free tier's limits",
            extra={"tier": tier},
        )


def usage_view(usage: users.Usage) -> dict[str, Any]:
    """`{"tier", "daily": {"limit", "used", "resets_at"}, "active": {"limit", "used"}}` of a
    limited kind (a user with no job yet is on the free tier)."""
    tier = usage.tier or "free"
    note_unknown_tier(tier)
    settings = tier_settings()
    daily, active = settings.daily_jobs, settings.active_jobs
    return {
        "tier": tier,
        "daily": {
            "limit": daily.get(tier, daily["free"]),
            "used": usage.daily_used,
            "resets_at": (usage.day_start + timedelta(days=1)).isoformat(),
        },
        "active": {"limit": active.get(tier, active["free"]), "used": usage.active_used},
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
