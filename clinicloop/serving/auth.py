"""API keys: client keys for the OpenAI routes, admin keys for admin routes.

Keys are held only as SHA-256 hashes and compared in constant time. Configure them as
`sha256:<hex>` (what `clinicloop keys new` prints) or in plain text (hashed at start). With no key
configured the server runs open, which `check_open_allowed` permits on a loopback host only.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass
from typing import Literal

from fastapi import Request

from clinicloop.serving.errors import OpenAIError

Role = Literal["client", "admin"]


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh key and the hash to put in the config."""
    key = "sk-cl-" + secrets.token_urlsafe(32)
    return key, hash_key(key)


def _normalise(entry: str) -> str:
    return entry if entry.startswith("sha256:") else hash_key(entry)


@dataclass(frozen=True)
class Caller:
    role: Role | None  # None: the server is open (no keys configured)
    key_id: str | None  # short fingerprint of the key's hash, safe to log


class KeyRing:
    def __init__(self, client_keys: list[str], admin_keys: list[str]) -> None:
        self._client = [_normalise(k) for k in client_keys]
        self._admin = [_normalise(k) for k in admin_keys]

    @property
    def open(self) -> bool:
        return not self._client and not self._admin

    def check_open_allowed(self, host: str) -> None:
        if self.open and not _is_loopback(host):
            raise SystemExit(
                f"refusing to serve on {host} without API keys: set server.api_keys "
                "(CLINICLOOP_SERVER__API_KEYS) or bind 127.0.0.1"
            )

    def _match(self, hashed: str, candidates: list[str]) -> bool:
        # Compare against every candidate so timing does not reveal which one matched.
        found = False
        for candidate in candidates:
            found |= hmac.compare_digest(hashed, candidate)
        return found

    def identify(self, token: str) -> Caller | None:
        hashed = hash_key(token)
        key_id = hashed[7:19]
        if self._match(hashed, self._admin):
            return Caller("admin", key_id)
        if self._match(hashed, self._client):
            return Caller("client", key_id)
        return None

    def caller(self, request: Request, *, admin: bool = False) -> Caller:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if self.open and not admin:
            return Caller(None, None)
        if scheme.lower() != "bearer" or not token:
            raise OpenAIError(401, "missing API key: send 'Authorization: Bearer <key>'",
                              code="invalid_api_key")
        who = self.identify(token.strip())
        if who is None:
            raise OpenAIError(401, "invalid API key", code="invalid_api_key")
        if admin and who.role != "admin":
            raise OpenAIError(403, "this route needs an admin key", code="forbidden")
        return who


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
