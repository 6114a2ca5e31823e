"""Who is calling: a user (Firebase ID token, or X-Dylen-User in dev) or a task (secret or OIDC)."""

from __future__ import annotations

import hmac
import threading
import time
from typing import Any, Protocol

from common.platform.config import Settings
from common.platform.errors import Forbidden, Unauthenticated

USER_HEADER = "X-Dylen-User"
TASK_SECRET_HEADER = "X-Dylen-Task-Secret"
MAX_UID_LENGTH = 128
CLOCK_SKEW_SECONDS = 10
_CERTS_TTL_SECONDS = 3600


class Headers(Protocol):
    def get(self, key: str) -> str | None: ...


def _bearer(headers: Headers) -> str | None:
    value = headers.get("Authorization")
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("Authorization must be 'Bearer <token>'.")
    return token.strip()


def _valid_uid(uid: str) -> bool:
    return 0 < len(uid) <= MAX_UID_LENGTH and uid.isprintable() and not any(c.isspace() for c in uid)


class _CertCache:
    """Google's signing certificates, fetched once per TTL per URL instead of on every request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, dict[str, str]]] = {}

    def get(self, url: str) -> dict[str, str]:
        now = time.monotonic()
        entry = self._entries.get(url)
        if entry and entry[0] > now:
            return entry[1]
        with self._lock:
            entry = self._entries.get(url)
            if entry and entry[0] > now:
                return entry[1]
            # Lazily: dev auth and task secrets never load requests.
            import requests

            try:
                response = requests.get(url, timeout=5)
                response.raise_for_status()
                certs = response.json()
            except Exception as error:
                raise Unauthenticated(f"Cannot fetch token signing keys: {type(error).__name__}") from error
            self._entries[url] = (now + _CERTS_TTL_SECONDS, certs)
            return certs


_certs = _CertCache()


def _decode(token: str, *, certs_url: str, audience: str | None) -> dict[str, Any]:
    # Lazily: google-auth (and its crypto) loads with the first token, not at cold start.
    from google.auth import exceptions as auth_exceptions
    from google.auth import jwt

    try:
        return dict(
            jwt.decode(
                token,
                certs=_certs.get(certs_url),
                audience=audience,
                clock_skew_in_seconds=CLOCK_SKEW_SECONDS,
            )
        )
    except (ValueError, auth_exceptions.GoogleAuthError) as error:
        # google-auth's messages name the failed check (expired, audience, signature) and no secret.
        raise Unauthenticated(f"Invalid token: {error}") from None


def authenticate_user(headers: Headers, settings: Settings) -> str:
    """The caller's uid, or Unauthenticated (401)."""
    if settings.auth_mode == "dev":
        uid = (headers.get(USER_HEADER) or "").strip()
        if not uid:
            raise Unauthenticated(f"Dev auth: send the {USER_HEADER} header with your user id.")
        if not _valid_uid(uid):
            raise Unauthenticated(
                f"{USER_HEADER} must be 1-{MAX_UID_LENGTH} printable characters without spaces."
            )
        return uid
    token = _bearer(headers)
    if token is None:
        raise Unauthenticated("Send 'Authorization: Bearer <Firebase ID token>'.")
    project = settings.firebase_project_id
    claims = _decode(token, certs_url=settings.firebase_certs_url, audience=project)
    if claims.get("iss") != f"https://securetoken.google.com/{project}":
        raise Unauthenticated("Invalid token: wrong issuer.")
    subject = claims.get("sub")
    if not isinstance(subject, str) or not _valid_uid(subject):
        raise Unauthenticated("Invalid token: no usable subject.")
    return subject


def authenticate_task(headers: Headers, settings: Settings, *, audience: str) -> str:
    """Accept a task from Cloud Tasks / Cloud Scheduler / the local dispatcher, or raise 401/403.

    Returns how the caller authenticated ("secret" or the service-account email).
    """
    secret = headers.get(TASK_SECRET_HEADER)
    if secret is not None:
        if not settings.task_secret:
            raise Forbidden("Task secrets are not accepted by this deployment.")
        if not hmac.compare_digest(secret.encode("utf-8", "surrogateescape"), settings.task_secret.encode()):
            raise Forbidden("Wrong task secret.")
        return "secret"
    token = _bearer(headers)
    if token is None:
        if not settings.task_secret and not settings.tasks_allowed_sas:
            raise Forbidden("Task auth is not configured: set DYLEN_TASK_SECRET or DYLEN_TASKS_INVOKER_SA.")
        raise Unauthenticated("Task requests need X-Dylen-Task-Secret or a Google OIDC token.")
    if not settings.tasks_allowed_sas:
        raise Forbidden("OIDC task tokens are not accepted: no service account is configured.")
    claims = _decode(token, certs_url=settings.google_oidc_certs_url, audience=audience)
    if claims.get("iss") not in ("https://accounts.google.com", "accounts.google.com"):
        raise Unauthenticated("Invalid token: wrong issuer.")
    email = claims.get("email")
    if not claims.get("email_verified") or email not in settings.tasks_allowed_sas:
        raise Forbidden("This service account may not call task endpoints.")
    return str(email)
