"""The one exception hierarchy. Functions raise these; the HTTP edge maps them to problem+json."""

from __future__ import annotations

from typing import Any

PROBLEM_BASE = "https://dylen.dev/problems/"


class DylenError(Exception):
    """Base of every error the project raises on purpose."""

    status = 500
    type_slug = "internal"
    title = "Internal error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
        log_detail: str | None = None,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.errors = errors
        self.headers = headers or {}
        # What the log says instead of `detail` (hosts, causes): never sent to the caller.
        self.log_detail = log_detail

    @property
    def type_uri(self) -> str:
        return PROBLEM_BASE + self.type_slug

    def to_problem(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": self.type_uri,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.errors:
            body["errors"] = self.errors
        return body


class ConfigError(DylenError):
    """Configuration is wrong; raised at cold start so the instance refuses to serve."""

    type_slug = "configuration"
    title = "Configuration error"


class MalformedRequest(DylenError):
    status = 400
    type_slug = "malformed-request"
    title = "Malformed request"


class Unauthenticated(DylenError):
    status = 401
    type_slug = "unauthenticated"
    title = "Authentication required"

    def __init__(self, detail: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(detail, **kwargs)


class Forbidden(DylenError):
    status = 403
    type_slug = "forbidden"
    title = "Forbidden"


class NotFound(DylenError):
    status = 404
    type_slug = "not-found"
    title = "Not found"


class MethodNotAllowed(DylenError):
    status = 405
    type_slug = "method-not-allowed"
    title = "Method not allowed"

    def __init__(self, allowed: list[str]) -> None:
        super().__init__(f"Allowed: {', '.join(allowed)}", headers={"Allow": ", ".join(allowed)})


class IdempotencyConflict(DylenError):
    status = 409
    type_slug = "idempotency-conflict"
    title = "Idempotency key reused with a different request"


class Conflict(DylenError):
    status = 409
    type_slug = "conflict"
    title = "Conflict"


class Gone(DylenError):
    """It existed and is no more; the caller may know that (its own resource)."""

    status = 410
    type_slug = "gone"
    title = "Gone"


class PayloadTooLarge(DylenError):
    status = 413
    type_slug = "payload-too-large"
    title = "Payload too large"


class UnsupportedMediaType(DylenError):
    status = 415
    type_slug = "unsupported-media-type"
    title = "Unsupported media type"


class ValidationFailed(DylenError):
    status = 422
    type_slug = "validation-failed"
    title = "Invalid request fields"


class LimitExceeded(DylenError):
    """A tier limit refused the request; nothing was written. The problem carries `limit`, `used`
    and `tier` as extension members."""

    status = 429
    type_slug = "limit-exceeded"
    title = "Limit exceeded"

    def __init__(self, detail: str, *, limit: int, used: int, tier: str, retry_after: int) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after)})
        self.limit = limit
        self.used = used
        self.tier = tier

    def to_problem(self) -> dict[str, Any]:
        return {**super().to_problem(), "limit": self.limit, "used": self.used, "tier": self.tier}


class DatabaseUnavailable(DylenError):
    status = 503
    type_slug = "database-unavailable"
    title = "Database unavailable"

    def __init__(self, detail: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("headers", {"Retry-After": "5"})
        super().__init__(detail, **kwargs)


class AuthUnavailable(DylenError):
    """The signing keys that tokens are checked against cannot be had right now: the caller did
    nothing wrong, so not a 401; retry shortly."""

    status = 503
    type_slug = "auth-unavailable"
    title = "Authentication unavailable"

    def __init__(self, detail: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("headers", {"Retry-After": "5"})
        super().__init__(detail, **kwargs)


class PermanentJobError(DylenError):
    """Raised by a handler when retrying cannot help (bad payload, a refused prompt); the job ends
    as `error` with `code`. `message` is for operators (it may quote a provider); users see
    `public_message`, or the safe text the job system keeps for the code."""

    type_slug = "job-permanent-failure"
    title = "Job failed permanently"

    def __init__(self, code: str, message: str, *, public_message: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.public_message = public_message


class RetryLater(DylenError):
    """ "Not now" from a kind or a generator (a provider's 429 with its retry delay, a lane with no
    free slot): the job is rescheduled `after_seconds` from now without using an attempt, up to
    the job's maximum total wait. `reason` is a short code operators read (e.g. `rate_limited`)."""

    type_slug = "retry-later"
    title = "Retry later"

    def __init__(self, after_seconds: float, reason: str) -> None:
        super().__init__(f"Retry in {after_seconds:.1f}s: {reason}")
        self.after_seconds = max(0.0, float(after_seconds))
        self.reason = reason
