"""API keys: client keys for the OpenAI routes, admin keys for admin routes, service keys for the
project's own clients (judge, rubric generator, patient simulator, benchmarks), reviewer keys for
the clinicians' console (/console; admins sign in there too, and a reviewer key opens nothing
else: /v1 and /admin refuse it with a 403).

Keys are held only as SHA-256 hashes and compared in constant time. Configure them as
`sha256:<hex>` (what `clinicloop keys new` prints) or in plain text (hashed at start). With no key
configured the server runs open, which `check_open_allowed` permits on a loopback host only.
`KeyCheck` checks the key of every request before its body is read; with no admin key
configured, admin routes say so rather than ask for a key that cannot exist.

A caller's `origin` is what its turns are logged as: `service` for a service key, or for an admin
key or an open server's caller that sends `X-Clinicloop-Origin: service`; else `client`. A client
key cannot mark its own traffic as service (it would hide it from scoring and training).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from fastapi import Request
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from clinicloop.serving.errors import OpenAIError

Role = Literal["client", "service", "admin", "reviewer"]
Origin = Literal["client", "service"]
ORIGIN_HEADER = "x-clinicloop-origin"
CALLER = "clinicloop.caller"  # the scope key `KeyCheck` leaves the authenticated Caller under
NO_ADMIN_KEY = ("no admin key is configured on this server: set server.admin_keys "
                "(CLINICLOOP_SERVER__ADMIN_KEYS)")
NO_REVIEWER_KEY = ("no reviewer or admin key is configured on this server: set "
                   "server.reviewer_keys (CLINICLOOP_SERVER__REVIEWER_KEYS)")


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh key and the hash to put in the config."""
    key = "sk-cl-" + secrets.token_urlsafe(32)
    return key, hash_key(key)


def _key_id(hashed: str) -> str:
    """A key's short fingerprint (12 hex characters of its hash), safe to log and to store."""
    return hashed[7:19]


def _normalise(entry: str) -> str:
    return entry if entry.startswith("sha256:") else hash_key(entry)


@dataclass(frozen=True)
class Caller:
    role: Role | None  # None: the server is open (no keys configured)
    key_id: str | None  # short fingerprint of the key's hash, safe to log
    origin: Origin = "client"  # what the caller's turns are logged as


class KeyRing:
    def __init__(self, client_keys: list[str], admin_keys: list[str],
                 service_keys: Sequence[str] = (), reviewer_keys: Sequence[str] = ()) -> None:
        self._client = [_normalise(k) for k in client_keys]
        self._admin = [_normalise(k) for k in admin_keys]
        self._service = [_normalise(k) for k in service_keys]
        self._reviewer = [_normalise(k) for k in reviewer_keys]

    @property
    def open(self) -> bool:
        """No key guards /v1. Reviewer keys do not count: they open only the console, which is
        never open (`console_keys`)."""
        return not self._client and not self._admin and not self._service

    @property
    def console_keys(self) -> bool:
        """Whether any key may sign in to the console (a reviewer or an admin key)."""
        return bool(self._reviewer or self._admin)

    def check_open_allowed(self, host: str) -> None:
        if self.open and not _is_loopback(host):
            raise SystemExit(
                f"refusing to serve on {host} without API keys: set server.api_keys "
                "(CLINICLOOP_SERVER__API_KEYS) or bind 127.0.0.1"
            )

    def console_role(self, key_id: str) -> Literal["reviewer", "admin"] | None:
        """The console role of the configured key whose id is `key_id`: a console sign-in ends
        when its key is removed from the config."""
        def configured(hashes: list[str]) -> bool:
            return any(hmac.compare_digest(_key_id(h).encode(), key_id.encode()) for h in hashes)

        if configured(self._admin):
            return "admin"
        if configured(self._reviewer):
            return "reviewer"
        return None

    def _match(self, hashed: str, candidates: list[str]) -> bool:
        # Compare against every candidate so timing does not reveal which one matched.
        found = False
        for candidate in candidates:
            found |= hmac.compare_digest(hashed, candidate)
        return found

    def identify(self, token: str) -> Caller | None:
        hashed = hash_key(token)
        key_id = _key_id(hashed)
        if self._match(hashed, self._admin):
            return Caller("admin", key_id)
        if self._match(hashed, self._service):
            return Caller("service", key_id, "service")
        if self._match(hashed, self._client):
            return Caller("client", key_id)
        if self._match(hashed, self._reviewer):
            return Caller("reviewer", key_id)
        return None

    def caller(self, request: Request, *, admin: bool = False) -> Caller:
        """The caller `KeyCheck` authenticated before the body was read (on a route it does not
        guard: authenticated now)."""
        who: Caller | None = request.scope.get(CALLER)
        return who if who is not None else self.authenticate(request.headers, admin=admin)

    def authenticate(self, headers: Mapping[str, str], *, admin: bool = False) -> Caller:
        if admin and not self._admin:
            raise OpenAIError(403, NO_ADMIN_KEY, code="no_admin_key")
        header = headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if self.open:
            return _marked(Caller(None, None), headers)
        if scheme.lower() != "bearer" or not token:
            raise OpenAIError(401, "missing API key: send 'Authorization: Bearer <key>'",
                              code="invalid_api_key")
        who = self.identify(token.strip())
        if who is None:
            raise OpenAIError(401, "invalid API key", code="invalid_api_key")
        if who.role == "reviewer":
            raise OpenAIError(403, "a reviewer key is for the console (/console) only",
                              code="forbidden")
        if admin and who.role != "admin":
            raise OpenAIError(403, "this route needs an admin key", code="forbidden")
        return _marked(who, headers)


def _marked(who: Caller, headers: Mapping[str, str]) -> Caller:
    """`who`, as a service caller if it may mark itself so (admin, open server) and does."""
    marked = headers.get(ORIGIN_HEADER, "").strip().lower() == "service"
    if marked and who.role in ("admin", None):
        return replace(who, origin="service")
    return who


_ROOT_CLIENT_ROUTES = frozenset({"/tokenize", "/detokenize"})


def _route_class(path: str) -> Literal["client", "admin"] | None:
    """The key a path needs: an admin key under /admin, any key under /v1 (the OpenAI routes)
    and for /tokenize and /detokenize (vLLM serves those at the root); none elsewhere (/health,
    /metrics)."""
    if path == "/admin" or path.startswith("/admin/"):
        return "admin"
    if path == "/v1" or path.startswith("/v1/") or path in _ROOT_CLIENT_ROUTES:
        return "client"
    return None


class KeyCheck:
    """Authenticates each request by its route class before anything else happens to it: a
    request without the key its route needs gets its 401/403 before a byte of its body is read.
    The caller is left in the scope for `KeyRing.caller`."""

    def __init__(self, app: ASGIApp, keys: KeyRing) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        needs = _route_class(scope["path"]) if scope["type"] == "http" else None
        if needs is not None:
            try:
                scope[CALLER] = self.keys.authenticate(Headers(scope=scope),
                                                       admin=needs == "admin")
            except OpenAIError as exc:
                return await exc.response()(scope, receive, send)
        await self.app(scope, receive, send)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
