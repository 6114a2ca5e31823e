"""The dashboard's CSRF tokens: HMAC(secret, operator | window). The secret is a row the migration
writes (`dashboard_secret`), shared by every instance, read once per process."""

from __future__ import annotations

import hashlib
import hmac
import time

import flask

from common.dashboard import queries
from common.platform.db import connection
from common.platform.errors import Forbidden

CSRF_WINDOW_SECONDS = 2 * 3600  # a token is good for its window and the next: 2-4 h
_secret: bytes | None = None


def _key() -> bytes:
    global _secret
    if _secret is None:
        with connection() as conn:
            _secret = queries.dashboard_secret(conn).encode()
    return _secret


def csrf_token(operator: str, *, now: float | None = None) -> str:
    """HMAC(key, operator | window): bound to who asks and when, so a page of one operator (or one
    fetched yesterday) cannot submit for another; no cookie or session is needed."""
    window = int((time.time() if now is None else now) // CSRF_WINDOW_SECONDS)
    return hmac.new(_key(), f"{operator}|{window}".encode(), hashlib.sha256).hexdigest()


def check_csrf(request: flask.Request, operator: str) -> None:
    # Browsers say where a request comes from; another site's form is refused before the token.
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        raise Forbidden("Cross-site request refused.")
    sent = request.form.get("csrf", "")
    now = time.time()
    good = (csrf_token(operator, now=now), csrf_token(operator, now=now - CSRF_WINDOW_SECONDS))
    if not any(hmac.compare_digest(sent.encode("utf-8", "surrogateescape"), g.encode()) for g in good):
        raise Forbidden("Missing or stale form token: reload the page and try again.")
