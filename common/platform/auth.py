"""Who is calling: a user (Firebase ID token, or X-Dylen-User in dev) or a task (secret or OIDC)."""

from __future__ import annotations

import hmac
import math
import threading
import time
from typing import Any, Protocol

from common.platform.config import Settings
from common.platform.errors import AuthUnavailable, DylenError, Forbidden, Unauthenticated

USER_HEADER = "X-Dylen-User"
OPERATOR_HEADER = "X-Dylen-Operator"
DEV_OPERATOR = "dev-operator@localhost"
GOOGLE_ISSUERS = ("https://accounts.google.com", "accounts.google.com")
TASK_SECRET_HEADER = "X-Dylen-Task-Secret"
MAX_UID_LENGTH = 128
CLOCK_SKEW_SECONDS = 10
# One connect (and one read) may take this long; requests waiting on that fetch wait no longer.
FETCH_TIMEOUT_SECONDS = 3.0
FAILURE_TTL_SECONDS = 5.0  # how long a failed key fetch is remembered (and Retry-After)
DEFAULT_KEYS_TTL_SECONDS = 300  # when the key response carries no max-age
MAX_KEYS_TTL_SECONDS = 24 * 3600


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


class _KeyCache:
    """Google's signing certificates per URL: kept as long as the response's `Cache-Control: max-age`
    says, one fetch in flight per URL, and a failed fetch remembered for FAILURE_TTL_SECONDS.

    Hand-written because google-auth has no cache of its own: its docs suggest wrapping a requests
    session in CacheControl, which honours max-age but neither single-flights a fetch nor remembers
    a failure, so a hanging key URL would still queue every request thread behind its own fetch.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, tuple[float, dict[str, str]]] = {}  # url -> (fresh until, keys)
        self._failed: dict[str, tuple[float, str]] = {}  # url -> (remembered until, why)
        self._inflight: dict[str, threading.Event] = {}
        self._session: Any = None

    def get(self, url: str) -> dict[str, str]:
        deadline = time.monotonic() + FETCH_TIMEOUT_SECONDS
        while True:
            with self._lock:
                now = time.monotonic()
                entry = self._keys.get(url)
                if entry and entry[0] > now:
                    return entry[1]
                failure = self._failed.get(url)
                if failure and failure[0] > now:
                    raise self._unavailable(failure[1], failure[0] - now)
                pending = self._inflight.get(url)
                if pending is None:
                    pending = self._inflight[url] = threading.Event()
                    fetcher = True
                else:
                    fetcher = False
            if fetcher:
                return self._fetch(url, pending)
            # Another thread is fetching: wait for it, never longer than one fetch may take.
            if not pending.wait(max(0.0, deadline - time.monotonic())):
                raise self._unavailable("the fetch in flight has not finished", FAILURE_TTL_SECONDS)

    def _fetch(self, url: str, done: threading.Event) -> dict[str, str]:
        try:
            keys, ttl = self._download(url)
        except Exception as error:
            why = type(error).__name__
            with self._lock:
                self._failed[url] = (time.monotonic() + FAILURE_TTL_SECONDS, why)
            raise self._unavailable(why, FAILURE_TTL_SECONDS) from error
        else:
            with self._lock:
                self._keys[url] = (time.monotonic() + ttl, keys)
                self._failed.pop(url, None)
            return keys
        finally:
            with self._lock:
                self._inflight.pop(url, None)
            done.set()

    def _download(self, url: str) -> tuple[dict[str, str], float]:
        # Lazily: dev auth and task secrets never load requests.
        import requests
        from werkzeug.datastructures import ResponseCacheControl
        from werkzeug.http import parse_cache_control_header

        if self._session is None:
            self._session = requests.Session()
        response = self._session.get(url, timeout=(FETCH_TIMEOUT_SECONDS, FETCH_TIMEOUT_SECONDS))
        response.raise_for_status()
        keys = response.json()
        if not (
            isinstance(keys, dict)
            and keys
            and all(isinstance(k, str) and isinstance(v, str) for k, v in keys.items())
        ):
            raise ValueError("the key set is not an object of PEM strings")
        control = parse_cache_control_header(response.headers.get("Cache-Control"), cls=ResponseCacheControl)
        max_age = control.max_age if isinstance(control.max_age, int) else DEFAULT_KEYS_TTL_SECONDS
        return keys, float(min(max(max_age, 0), MAX_KEYS_TTL_SECONDS))

    @staticmethod
    def _unavailable(why: str, retry_after: float) -> AuthUnavailable:
        return AuthUnavailable(
            f"The token signing keys cannot be fetched ({why}); retry shortly.",
            headers={"Retry-After": str(max(1, math.ceil(retry_after)))},
        )


_certs = _KeyCache()

_NUMERIC_CLAIMS = ("exp", "iat", "nbf", "auth_time")
_TEXT_CLAIMS = ("aud", "iss", "sub", "email")


def _check_claim_types(token: str) -> None:
    """Claims of the wrong JSON type are refused before google-auth compares them (a string `exp`
    makes it raise TypeError; a NaN `exp` would never expire)."""
    # Lazily: google-auth (and its crypto) loads with the first token, not at cold start.
    from google.auth import jwt

    claims = jwt.decode(token, verify=False)  # the payload only; verified right after
    for name in ("exp", "iat"):
        if name not in claims:
            raise Unauthenticated(f"Invalid token: no {name} claim.")
    for name in _NUMERIC_CLAIMS:
        value = claims.get(name)
        if name in claims and (
            isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
        ):
            raise Unauthenticated(f"Invalid token: claim {name} must be a number.")
    for name in _TEXT_CLAIMS:
        if name in claims and not isinstance(claims[name], str):
            raise Unauthenticated(f"Invalid token: claim {name} must be a string.")
    if "email_verified" in claims and not isinstance(claims["email_verified"], bool):
        raise Unauthenticated("Invalid token: claim email_verified must be a boolean.")


def _check_header(token: str, *, unsigned_hint: str) -> None:
    """Google signs Firebase ID tokens and its OIDC tokens RS256 with a `kid` naming the key; any
    other header can never verify, so it is refused before the keys are fetched (a key fetch that
    fails would answer 503, telling the caller to retry a token that will never pass)."""
    # Lazily: google-auth (and its crypto) loads with the first token, not at cold start.
    from google.auth import jwt

    header = jwt.decode_header(token)  # the header only; the signature is verified later
    alg = header.get("alg")
    if alg == "none":
        raise Unauthenticated(
            f"Invalid token: it is unsigned (alg 'none'); only RS256 is accepted{unsigned_hint}."
        )
    if alg != "RS256":
        shown = repr(alg) if isinstance(alg, str) and len(alg) <= 20 and alg.isprintable() else "another"
        raise Unauthenticated(f"Invalid token: algorithm {shown}; only RS256 is accepted.")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise Unauthenticated("Invalid token: its header names no signing key (kid).")


def _decode(
    token: str, *, certs_url: str, audience: str | list[str] | None, unsigned_hint: str = ""
) -> dict[str, Any]:
    # Lazily: google-auth (and its crypto) loads with the first token, not at cold start.
    from google.auth import exceptions as auth_exceptions
    from google.auth import jwt

    try:
        _check_header(token, unsigned_hint=unsigned_hint)
        _check_claim_types(token)
        claims = jwt.decode(
            token,
            certs=_certs.get(certs_url),
            audience=audience,
            clock_skew_in_seconds=CLOCK_SKEW_SECONDS,
        )
        return dict(claims)
    except DylenError:
        raise
    except (ValueError, auth_exceptions.GoogleAuthError) as error:
        # google-auth's messages name the failed check (expired, audience, signature) and no secret.
        raise Unauthenticated(f"Invalid token: {error}") from None
    except (TypeError, KeyError, AttributeError, OverflowError) as error:
        # A token shape the checks above missed: still the caller's token that is bad, never a 500.
        raise Unauthenticated(f"Invalid token: {type(error).__name__}") from None


def _emulator_claims(token: str, *, audience: str | None) -> dict[str, Any]:
    """A Firebase Auth emulator's ID token: unsigned (alg "none"), so only its claims are checked,
    as the Firebase Admin SDK does when FIREBASE_AUTH_EMULATOR_HOST is set. Local use only: config
    refuses the variable wherever real Cloud Tasks is configured."""
    # Lazily: google-auth loads with the first token, not at cold start.
    from google.auth import jwt

    _check_claim_types(token)
    try:
        claims = dict(jwt.decode(token, verify=False))
    except ValueError as error:
        raise Unauthenticated(f"Invalid token: {error}") from None
    now = time.time()
    if claims.get("aud") != audience:
        raise Unauthenticated("Invalid token: wrong audience.")
    if not isinstance(claims.get("exp"), (int, float)) or claims["exp"] < now - CLOCK_SKEW_SECONDS:
        raise Unauthenticated("Invalid token: expired.")
    if isinstance(claims.get("iat"), (int, float)) and claims["iat"] > now + CLOCK_SKEW_SECONDS:
        raise Unauthenticated("Invalid token: issued in the future.")
    return claims


# Said when an unsigned token meets a function not configured for the emulator: the likely mix-up.
_EMULATOR_HINT = " (the Firebase Auth emulator's, only where FIREBASE_AUTH_EMULATOR_HOST is set)"


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
    if settings.firebase_auth_emulator_host:
        claims = _emulator_claims(token, audience=project)
    else:
        claims = _decode(
            token,
            certs_url=settings.firebase_certs_url,
            audience=project,
            unsigned_hint=_EMULATOR_HINT,
        )
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
    if claims.get("iss") not in GOOGLE_ISSUERS:
        raise Unauthenticated("Invalid token: wrong issuer.")
    email = claims.get("email")
    # Only the JSON boolean true: a string "false" is truthy.
    if claims.get("email_verified") is not True or email not in settings.tasks_allowed_sas:
        raise Forbidden("This service account may not call task endpoints.")
    return str(email)


def _is_user_token(token: str) -> bool:
    """A Firebase ID token by its (unverified) issuer: read only to answer 403 instead of 401."""
    # Lazily: google-auth (and its crypto) loads with the first token, not at cold start.
    from google.auth import jwt

    try:
        issuer = jwt.decode(token, verify=False).get("iss")
    except (ValueError, TypeError, KeyError, AttributeError):
        return False
    return isinstance(issuer, str) and issuer.startswith("https://securetoken.google.com/")


def authenticate_operator(headers: Headers, settings: Settings) -> str:
    """The operator's e-mail (lower case), or Unauthenticated (401) / Forbidden (403).

    Production: the Google ID token Cloud Run's IAM check let through (it passes Authorization on),
    verified again here against Google's keys and DYLEN_DASHBOARD_AUDIENCE, its verified e-mail on
    DYLEN_DASHBOARD_OPERATORS. Dev auth (refused at start-up with real Cloud Tasks, like the users'):
    X-Dylen-Operator names the operator, default DEV_OPERATOR; a dev user is still no operator.
    """
    if settings.auth_mode == "dev":
        if headers.get(USER_HEADER) and not headers.get(OPERATOR_HEADER):
            raise Forbidden("Users cannot open the operator dashboard.")
        email = (headers.get(OPERATOR_HEADER) or DEV_OPERATOR).strip().lower()
        if not email.isprintable() or " " in email or len(email) > 254:
            raise Unauthenticated(f"{OPERATOR_HEADER} must be an e-mail address.")
        return email
    token = _bearer(headers)
    if token is None:
        raise Unauthenticated(
            "Send 'Authorization: Bearer <Google ID token>' (gcloud run services proxy does)."
        )
    if _is_user_token(token):
        authenticate_user(headers, settings)  # a bad user token is still a 401
        raise Forbidden("Users cannot open the operator dashboard.")
    claims = _decode(
        token, certs_url=settings.google_oidc_certs_url, audience=list(settings.dashboard_audiences)
    )
    if claims.get("iss") not in GOOGLE_ISSUERS:
        raise Unauthenticated("Invalid token: wrong issuer.")
    claimed = claims.get("email")
    if claims.get("email_verified") is not True or not isinstance(claimed, str):
        raise Forbidden("The token carries no verified e-mail address.")
    if not settings.dashboard_operators:
        raise Forbidden("No operators are configured: set DYLEN_DASHBOARD_OPERATORS.")
    if claimed.lower() not in settings.dashboard_operators:
        raise Forbidden(f"{claimed} is not on DYLEN_DASHBOARD_OPERATORS.")
    return claimed.lower()
