"""The model layer's settings: each model's lane limits and prices, the ledger's bodies and
retention, and how long a call may wait in-process for a slot."""

from __future__ import annotations

import re
from dataclasses import dataclass

from common.platform.env import Reader, Section
from common.platform.errors import ConfigError

_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/@-]{0,127}$")


@dataclass(frozen=True)
class LaneLimits:
    """Per model, shared by every instance; None: not limited."""

    rpm: int | None = None  # calls started per window (a minute outside tests)
    tpm: int | None = None  # tokens (input + output) of the calls started per window
    concurrency: int | None = None  # calls in flight at once


@dataclass(frozen=True)
class Price:
    """US dollars per million tokens."""

    input: float
    output: float

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input + output_tokens * self.output) / 1_000_000


@dataclass(frozen=True)
class ModelSettings:
    limits: dict[str, LaneLimits]
    prices: dict[str, Price]
    keep_bodies: bool  # request and response bodies on the ledger (they hold user text)
    retention_days: int  # the daily maintenance deletes call records older than this
    slot_wait_seconds: float  # the longest a call waits in-process for a slot; beyond: RetryLater
    window_seconds: float  # the lanes' window: 60; only tests and benchmarks shorten it


def parse_model_map(raw: str, name: str, keys: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """`model=key:value,key:value; model2=...` -> {model: {key: value}}; ConfigError naming `name`."""
    parsed: dict[str, dict[str, float]] = {}
    for entry in raw.replace("\n", ";").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        model, sep, pairs = entry.partition("=")
        model = model.strip()
        if not sep or not _MODEL.match(model):
            raise ConfigError(f"{name}: expected model=key:value,... entries separated by ';', got {entry!r}")
        if model in parsed:
            raise ConfigError(f"{name}: {model!r} is given twice")
        values: dict[str, float] = {}
        for pair in pairs.split(","):
            key, colon, value = pair.strip().partition(":")
            key = key.strip()
            if not colon or key not in keys:
                raise ConfigError(
                    f"{name}: {model}: expected {'|'.join(keys)}:<number>, got {pair.strip()!r}"
                )
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(f"{name}: {model}: {key} must be a number, got {value.strip()!r}") from None
            if not number >= 0 or number == float("inf"):
                raise ConfigError(f"{name}: {model}: {key} must be >= 0, got {value.strip()!r}")
            values[key] = number
        parsed[model] = values
    return parsed


def _limits(r: Reader) -> dict[str, LaneLimits]:
    name = "DYLEN_MODEL_LIMITS"
    limits = {}
    for model, values in parse_model_map(r.text(name) or "", name, ("rpm", "tpm", "concurrency")).items():
        for key, value in values.items():
            if value != int(value) or value < 1:
                raise ConfigError(f"{name}: {model}: {key} must be a whole number >= 1, got {value:g}")
        ints = {key: int(value) for key, value in values.items()}
        limits[model] = LaneLimits(ints.get("rpm"), ints.get("tpm"), ints.get("concurrency"))
    return limits


def _prices(r: Reader) -> dict[str, Price]:
    name = "DYLEN_MODEL_PRICES"
    prices = {}
    for model, values in parse_model_map(r.text(name) or "", name, ("input", "output")).items():
        if set(values) != {"input", "output"}:
            raise ConfigError(f"{name}: {model}: give both input:<usd> and output:<usd> per million tokens")
        prices[model] = Price(values["input"], values["output"])
    return prices


def _load(r: Reader) -> ModelSettings:
    return ModelSettings(
        limits=_limits(r),
        prices=_prices(r),
        keep_bodies=r.boolean("DYLEN_MODEL_CALL_BODIES", False),
        retention_days=r.integer("DYLEN_MODEL_CALL_RETENTION_DAYS", 30, minimum=1, maximum=3650),
        slot_wait_seconds=r.number("DYLEN_MODEL_SLOT_WAIT_SECONDS", 5.0, minimum=0.0),
        window_seconds=r.number("DYLEN_MODEL_WINDOW_SECONDS", 60.0, minimum=1.0),
    )


model_settings = Section(_load)
