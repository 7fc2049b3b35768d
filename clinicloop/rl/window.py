"""The refresh's side of a maintenance window on the serving gateway (`rl refresh --window`).

Retraining on the card that serves means the gateway must first stop using it. The job asks the
running gateway, over its admin API (`/admin/v1/maintenance`, never by import), to open a window:
new requests get the window's treatment (queued, sent to a fallback, or refused with
`retry-after`), requests in flight finish, and the engine is released (vLLM asleep, or stopped).
A heartbeat thread renews the window's lease while the job trains; the engine is resumed before
the candidate is evaluated through it; the window is closed after the swap. Every way the job can
end closes the window: a step that raises closes it on the way out, and a job that is killed
stops renewing, so the gateway closes it by itself when the lease runs out, with the old version
serving.
"""

from __future__ import annotations

import threading
from typing import Any, Literal

import httpx
from pydantic import BaseModel, Field


class WindowError(RuntimeError):
    """The gateway refused a window call, or closed the window under the job."""


class WindowOptions(BaseModel):
    """How `rl refresh --window` asks for its window; stored with nothing (a resumed run opens a
    new window with the options given then)."""

    treatment: Literal["queue", "fallback", "refuse"] | None = Field(
        None, description="What clients get during the window (default: the gateway's "
        "`server.maintenance.treatment`).")
    expected_s: float = Field(
        3600.0, gt=0, description="How long the window is expected to last: a refused "
        "request's `retry-after` counts down to its end.")
    lease_s: float = Field(
        120.0, gt=0, description="The gateway closes the window by itself if the job has not "
        "renewed it for this long (the job renews every quarter of it).")


class MaintenanceWindow:
    """One window: `open`, `resume`, `close`. `summary` is what the gateway answered when it
    closed (counts of queued, fallback and refused requests, times), or what it recorded when
    the lease closed it."""

    def __init__(self, server_url: str, admin_key: str | None, options: WindowOptions,
                 reason: str, *, release_engine: bool = True) -> None:
        base = server_url.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        # Opening waits for requests in flight to drain and for the engine to be released.
        self._http = httpx.Client(base_url=f"{base}/admin/v1", headers=headers,
                                  timeout=httpx.Timeout(1800.0, connect=10.0))
        self.options = options
        self.reason = reason
        self.release_engine = release_engine
        self.status: dict[str, Any] | None = None
        self.summary: dict[str, Any] | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def open(self) -> None:
        """Open the window; returns once requests in flight are done and the engine released."""
        body: dict[str, Any] = {"expected_s": self.options.expected_s,
                                "lease_s": self.options.lease_s,
                                "release_engine": self.release_engine,
                                "reason": self.reason[:200]}
        if self.options.treatment is not None:
            body["treatment"] = self.options.treatment
        try:
            self.status = _ok(self._http.post("/maintenance", json=body))
        except BaseException:
            self._http.close()
            raise
        self._heartbeat = threading.Thread(target=self._renew, name="window-heartbeat",
                                           daemon=True)
        self._heartbeat.start()

    def _renew(self) -> None:
        every = self.options.lease_s / 4
        while not self._stop.wait(every):
            try:
                response = self._http.post("/maintenance/renew",
                                           json={"lease_s": self.options.lease_s})
            except httpx.HTTPError:
                continue  # the lease has room for a few missed beats
            if response.status_code == 404:
                self._lost = "the gateway closed the window (its lease ran out)"
                return
            if response.status_code < 400:
                self.status = response.json()

    def check(self) -> None:
        """`WindowError` if the gateway closed the window under the job."""
        if self._lost is not None:
            raise WindowError(self._lost)

    def resume(self) -> None:
        """The engine serves again (the candidate is evaluated through it); the window stays
        open until the swap is done."""
        self.check()
        self.status = _ok(self._http.post("/maintenance/resume"))

    def close(self, failing: bool = False) -> None:
        """Close the window (the gateway resumes the engine if it is still released). `failing`:
        the job is failing already, so a close that fails too is left to the lease."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=30)  # no renewal after the close
        try:
            response = self._http.delete("/maintenance")
            if response.status_code == 404:  # closed by its lease: the gateway kept the record
                self.summary = self._closed_by_lease()
            else:
                self.summary = _ok(response)
        except Exception:
            if not failing:
                raise
        finally:
            self._http.close()

    def _closed_by_lease(self) -> dict[str, Any] | None:
        opened = (self.status or {}).get("id")
        history = _ok(self._http.get("/maintenance")).get("history", [])
        return next((w for w in history if w.get("id") == opened), None)


def _ok(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise WindowError(f"maintenance window: {response.request.method} "
                           f"{response.request.url.path}: {response.status_code} "
                           f"{response.text}")
    return response.json()
