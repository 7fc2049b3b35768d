"""Console sign-in: the cookie a reviewer (or admin) gets for their key, and the CSRF token of
every form they post.

The cookie holds `key_id|role|expiry|signature`, the signature an HMAC-SHA256 of the rest with the
console's secret (`server.console.session_secret`, or a random one per process): the key itself is
never stored, and a cookie that was altered, forged with another secret or has expired reads as
no sign-in. A form's CSRF token is an HMAC of the cookie, so it is tied to one sign-in and cannot
be made without the secret; both are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Literal

COOKIE = "clinicloop_console"
ConsoleRole = Literal["reviewer", "admin"]


@dataclass(frozen=True)
class SignedIn:
    key_id: str
    role: ConsoleRole
    expires_at: float  # epoch seconds


class Sessions:
    def __init__(self, secret: str | None, ttl_s: float) -> None:
        self._secret = (secret or secrets.token_hex(32)).encode()
        self.ttl_s = ttl_s

    def _sign(self, purpose: str, text: str) -> str:
        return hmac.new(self._secret, f"{purpose}\x1f{text}".encode(), hashlib.sha256).hexdigest()

    def issue(self, key_id: str, role: ConsoleRole, *, now: float | None = None) -> str:
        """The cookie value of a sign-in that lasts `ttl_s` from `now`."""
        expiry = int((time.time() if now is None else now) + self.ttl_s)
        body = f"{key_id}|{role}|{expiry}"
        return f"{body}|{self._sign('session', body)}"

    def read(self, cookie: str | None, *, now: float | None = None) -> SignedIn | None:
        """The sign-in `cookie` proves, or None (missing, malformed, altered or expired)."""
        if not cookie or cookie.count("|") != 3:
            return None
        body, _, signature = cookie.rpartition("|")
        if not hmac.compare_digest(signature.encode(), self._sign("session", body).encode()):
            return None
        key_id, role, expiry = body.split("|")
        if role not in ("reviewer", "admin") or not expiry.isdigit():
            return None
        if int(expiry) <= (time.time() if now is None else now):
            return None
        return SignedIn(key_id, role, float(expiry))  # type: ignore[arg-type]  # checked above

    def csrf(self, cookie: str) -> str:
        return self._sign("csrf", cookie)

    def csrf_ok(self, cookie: str, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token.encode(),
                                                         self.csrf(cookie).encode())
