"""The tiers' settings: per tier, how many lessons are kept, the daily and active job limits, the
daily token budget, and the share of model calls a user may have in flight."""

from __future__ import annotations

from dataclasses import dataclass

from common.platform.env import Reader, Section
from common.platform.errors import ConfigError

DEFAULT_HISTORY_LIMITS = "free=3,starter=20,plus=50,pro=80"
DEFAULT_DAILY_JOBS = "free=10,starter=50,plus=200,pro=500"
DEFAULT_ACTIVE_JOBS = "free=2,starter=5,plus=10,pro=20"
DEFAULT_DAILY_TOKENS = "free=200000,starter=1000000,plus=4000000,pro=10000000"
DEFAULT_CONCURRENT_CALLS = "free=2,starter=4,plus=8,pro=16"


def parse_tier_limits(raw: str, name: str) -> dict[str, int]:
    """`tier=number` pairs, comma-separated; 'free' is required (the fallback for unknown tiers)."""
    limits: dict[str, int] = {}
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        tier, sep, number = part.partition("=")
        tier = tier.strip()
        if not sep or not tier:
            raise ConfigError(f"{name}: expected tier=limit pairs, got {part!r}")
        try:
            limit = int(number)
        except ValueError:
            raise ConfigError(f"{name}: limit of {tier!r} must be an integer, got {number!r}") from None
        if limit < 0:
            raise ConfigError(f"{name}: limit of {tier!r} must be >= 0")
        limits[tier] = limit
    if "free" not in limits:
        raise ConfigError(f"{name} must define the 'free' tier (the fallback for unknown tiers)")
    return limits


@dataclass(frozen=True)
class TierSettings:
    history_limits: dict[str, int]  # lessons kept per user (the archive keeps the newest)
    daily_jobs: dict[str, int]  # lesson jobs a user may create per UTC day
    active_jobs: dict[str, int]  # lesson jobs a user may have queued or running at once
    daily_tokens: dict[str, int]  # model tokens a user's calls may spend per UTC day (checked at create)
    concurrent_calls: dict[str, int]  # a user's model calls in flight at once, any model


def _limits(r: Reader, name: str, default: str) -> dict[str, int]:
    return parse_tier_limits(r.text(name) or default, name)


def _load(r: Reader) -> TierSettings:
    return TierSettings(
        history_limits=_limits(r, "DYLEN_TIER_HISTORY_LIMITS", DEFAULT_HISTORY_LIMITS),
        daily_jobs=_limits(r, "DYLEN_TIER_DAILY_JOBS", DEFAULT_DAILY_JOBS),
        active_jobs=_limits(r, "DYLEN_TIER_ACTIVE_JOBS", DEFAULT_ACTIVE_JOBS),
        daily_tokens=_limits(r, "DYLEN_TIER_DAILY_TOKENS", DEFAULT_DAILY_TOKENS),
        concurrent_calls=_shares(r),
    )


def _shares(r: Reader) -> dict[str, int]:
    name = "DYLEN_TIER_CONCURRENT_CALLS"
    shares = _limits(r, name, DEFAULT_CONCURRENT_CALLS)
    for tier, share in shares.items():
        if share < 1:  # a share of 0 would stop every call of the tier's users, for good
            raise ConfigError(f"{name}: the share of {tier!r} must be >= 1")
    return shares


tier_settings = Section(_load)
