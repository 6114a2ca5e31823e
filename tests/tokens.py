"""A token issuer for tests: RSA keys, RS256 JWTs, and their x509 certificates served on loopback;
and unsigned JWTs like the Firebase Auth emulator's.

Google's signing-key endpoints cannot be reached here, so tests are their own issuer; the functions
read the certificates from DYLEN_FIREBASE_CERTS_URL / DYLEN_GOOGLE_OIDC_CERTS_URL (test-only knobs).
"""

from __future__ import annotations

import base64
import datetime as dt
import http.server
import json
import threading
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth import crypt, jwt


@dataclass
class KeyPair:
    kid: str
    private_pem: bytes
    cert_pem: str
    _signers: dict[str | None, crypt.RSASigner] = field(default_factory=dict)

    @classmethod
    def generate(cls, kid: str) -> KeyPair:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dylen-test-issuer")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256())
        )
        private_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cls(kid, private_pem, cert.public_bytes(serialization.Encoding.PEM).decode())

    def sign(
        self, claims: dict[str, Any], *, kid: str | None = None, with_kid: bool = True, alg: str = "RS256"
    ) -> str:
        """An RS256 signature; `alg` only labels the header (a token claiming another algorithm),
        `with_kid=False` leaves the key id out of it."""
        key_id = (kid or self.kid) if with_kid else None
        if key_id not in self._signers:  # loading a private key is slow (it is validated): once per kid
            self._signers[key_id] = crypt.RSASigner.from_string(self.private_pem, key_id=key_id)
        return jwt.encode(self._signers[key_id], claims, header={"alg": alg}).decode()


def unsigned(claims: dict[str, Any]) -> str:
    """An unsigned JWT (alg "none", empty signature), as the Firebase Auth emulator issues its ID
    tokens (firebase-tools signs them with jsonwebtoken's algorithm "none")."""
    header = {"alg": "none", "typ": "JWT"}
    return (
        ".".join(
            base64.urlsafe_b64encode(json.dumps(part).encode()).decode().rstrip("=")
            for part in (header, claims)
        )
        + "."
    )


class CertServer(http.server.ThreadingHTTPServer):
    """Serves `{kid: pem}` like Google's x509 endpoints, on a loopback port."""

    def __init__(self, certs: dict[str, str]) -> None:
        body = json.dumps(certs).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{path}"
