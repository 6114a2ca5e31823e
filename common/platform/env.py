"""Reading the environment: `.env` files, typed reads that name the variable, and the settings
sections each package declares (composed once at cold start)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

from common.platform.errors import ConfigError


def read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; `#` comments, optional `export ` and surrounding quotes. No interpolation."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ConfigError(f"{path}:{number}: expected KEY=VALUE, got {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def environment(env: Mapping[str, str] | None = None, *, dotenv: Path | None = None) -> dict[str, str]:
    """`env` (default: os.environ) with the `.env` file filling unset variables."""
    source = dict(os.environ if env is None else env)
    # DYLEN_ENV_FILE lets tests and tools point away from a developer's .env (e.g. /dev/null).
    dotenv_path = dotenv or Path(source.get("DYLEN_ENV_FILE") or Path.cwd() / ".env")
    for key, value in read_dotenv(dotenv_path).items():
        source.setdefault(key, value)
    return source


class Reader:
    """Typed reads of one environment; every wrong value is a ConfigError naming the variable."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def text(self, name: str, default: str | None = None) -> str | None:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return default
        return value.strip()

    def boolean(self, name: str, default: bool) -> bool:
        value = self.text(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {value!r}")

    def integer(self, name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        value = self.text(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
        if number < minimum or (maximum is not None and number > maximum):
            bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise ConfigError(f"{name} must be {bounds}, got {number}")
        return number

    def number(self, name: str, default: float, *, minimum: float) -> float:
        value = self.text(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
        if number < minimum:
            raise ConfigError(f"{name} must be >= {minimum}, got {number}")
        return number

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(name, default)
        assert value is not None
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return value

    def url(self, name: str, default: str | None = None) -> str | None:
        value = self.text(name, default)
        if value is not None and not value.startswith(("http://", "https://")):
            raise ConfigError(f"{name} must be an http(s) URL, got {value!r}")
        if value is not None and not (value.isascii() and value.isprintable() and " " not in value):
            # Sent as is in Location headers and task URLs: give the punycode / percent-encoded form.
            raise ConfigError(
                f"{name} must be ASCII without spaces (punycode host, percent-encoded path), got {value!r}"
            )
        return value.rstrip("/") if value and value.count("/") > 2 else value


T = TypeVar("T")
_SECTIONS: list[Section[Any]] = []


class Section(Generic[T]):
    """One package's own settings (the job system's, the tiers', the lessons'), read from the same
    environment as the platform's, once per process. Declared at module level of the package that
    owns them; `cold_start()` loads every declared one, so a wrong value fails the cold start with
    the one line naming the variable, like the platform's."""

    def __init__(self, load: Callable[[Reader], T]) -> None:
        self._load = load
        self._value: T | None = None
        self._lock = threading.Lock()
        _SECTIONS.append(self)

    def __call__(self) -> T:
        value = self._value
        if value is None:
            with self._lock:
                if self._value is None:
                    self._value = self._load(Reader(environment()))
                value = self._value
        return value

    def load(self, env: Mapping[str, str] | None = None, *, dotenv: Path | None = None) -> T:
        """Read afresh from `env` (tests), without touching the process's cached value."""
        return self._load(Reader(environment(env, dotenv=dotenv)))

    def reset(self) -> None:
        with self._lock:
            self._value = None


def reset_sections() -> None:
    for section in list(_SECTIONS):
        section.reset()


def load_sections() -> None:
    """Load every declared section now (cold start): the first wrong value raises ConfigError."""
    for section in list(_SECTIONS):
        section()
