"""The maintenance window: the gateway stops using its engine for a while (to retrain on its GPU)
and every generating request gets the window's treatment instead.

`Maintenance.open` starts the window at once (from then on `admit`, which `GenerationRun.open`
calls before admission, treats each new request), waits for the requests already admitted to
finish, then releases the engine (`VersionedEngine.suspend`). The treatments:

- `queue`: the request waits for the window to close, then is admitted as usual; at most
  `queue_max` wait (then 503 `maintenance_queue_full`), each within its request deadline (503
  `timeout`); a client that hangs up leaves the queue (`HangUpWatch` lets it see that).
- `fallback`: served by an OpenAI-compatible upstream (`fallback_url`) opened with the window and
  closed after it, through its own admission, so that its traffic never holds up the drain; its
  turns are logged as any other, with model version `fallback:<its model>`.
- `refuse`: 503 `maintenance` with `retry-after` counting down to the expected end.

A window not renewed within its lease closes by itself (the lease watcher the app's lifespan
runs), so a refresh job that died cannot leave the gateway in maintenance. Closing resumes the
engine (a failed resume is recorded and the window closes anyway) and lets the queue go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fastapi.responses import JSONResponse
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Receive, Scope, Send

from clinicloop.backends.openai_upstream import OpenAIUpstreamEngine
from clinicloop.config import EngineSettings, MaintenanceSettings
from clinicloop.serving.admin.protocol import (
    ClosedBy,
    EngineState,
    MaintenanceOpen,
    MaintenanceRenew,
    MaintenanceState,
    Treatment,
    WindowCounts,
    WindowStatus,
    WindowSummary,
)
from clinicloop.serving.admission import Admission
from clinicloop.serving.errors import OpenAIError, error_response
from clinicloop.serving.metrics import Metrics
from clinicloop.serving.protocol import new_id
from clinicloop.serving.versions import VersionedEngine

log = logging.getLogger(__name__)

#: A fallback should be up before its window opens: this is how long it gets to answer.
FALLBACK_CONNECT_S = 5.0
HISTORY = 20
_LEASE_CHECK_S = 1.0
_DRAIN_POLL_S = 0.05
#: What each request's treatment is counted as: the metric's label -> the window's count.
_COUNTED = {"queued": "queued", "fallback": "fallback", "refused": "refused",
            "queue_full": "queue_full", "queue_timeout": "queue_timeouts"}

# The `receive` of the request this task serves (set by `HangUpWatch`): per request, not state.
_RECEIVE: ContextVar[Receive | None] = ContextVar("clinicloop_receive", default=None)


class HangUpWatch:
    """ASGI middleware that leaves each request's `receive` where a request waiting in the
    maintenance queue can watch it for the client hanging up (nothing else reads it then)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = _RECEIVE.set(receive if scope["type"] == "http" else None)
        try:
            await self.app(scope, receive, send)
        finally:
            _RECEIVE.reset(token)


async def _hung_up() -> None:
    """Returns once this request's client has gone (never, outside a request)."""
    receive = _RECEIVE.get()
    if receive is None:
        await asyncio.Event().wait()
        return
    while (await receive())["type"] != "http.disconnect":
        pass  # the body was read before the request was treated: nothing else comes


@dataclass
class Fallback:
    """What serves requests during a `fallback` window."""

    engine: OpenAIUpstreamEngine
    admission: Admission


@dataclass
class _Window:
    id: str
    treatment: Treatment
    reason: str | None
    opened_at: float
    expected_end: float
    lease_s: float
    lease_deadline: float  # time.monotonic()
    fallback: Fallback | None
    engine: EngineState = "serving"
    released: EngineState | None = None
    counts: WindowCounts = field(default_factory=WindowCounts)
    drain_s: float | None = None
    release_s: float | None = None
    resume_s: float | None = None
    error: str | None = None
    #: Until the drain and the release are done, the lease does not run.
    opening: bool = True
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    def retry_after(self) -> int:
        return max(1, math.ceil(self.expected_end - time.time()))

    def _fields(self) -> dict[str, Any]:
        return {"id": self.id, "treatment": self.treatment, "reason": self.reason,
                "opened_at": self.opened_at, "expected_end": self.expected_end,
                "lease_expires_at": time.time() + self.lease_deadline - time.monotonic(),
                "engine": self.engine, "released": self.released,
                "counts": self.counts.model_copy(),
                "drain_s": self.drain_s, "release_s": self.release_s}

    def status(self) -> WindowStatus:
        return WindowStatus(**self._fields())

    def summary(self, closed_by: ClosedBy) -> WindowSummary:
        return WindowSummary(**self._fields(), closed_at=time.time(), closed_by=closed_by,
                             resume_s=self.resume_s, error=self.error)


def _until(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Maintenance:
    """The gateway's window: at most one open, the last `HISTORY` closed ones kept."""

    def __init__(self, settings: MaintenanceSettings, *, admission: Admission,
                 versions: VersionedEngine | None, metrics: Metrics,
                 model: Callable[[], str], request_timeout_s: float, max_waiting: int) -> None:
        """`admission`: the engine's (drained before the release); `versions`: what is
        released (None: an engine the app was given, which nothing here releases); `model`:
        the served name, which the metrics are labelled with."""
        self.settings = settings
        self.admission = admission
        self.versions = versions
        self.request_timeout_s = request_timeout_s
        self.max_waiting = max_waiting
        self.window: _Window | None = None
        self.history: deque[WindowSummary] = deque(maxlen=HISTORY)
        #: Requests waiting in the queue now.
        self.queue_waiting = 0
        # One change (open's release, resume, close) at a time; the drain runs outside it, so
        # a close can cut a drain short.
        self._changing = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self._fallbacks_closing: set[asyncio.Task[None]] = set()
        #: Totals over the app's life: requests by what they got (`_COUNTED`'s labels).
        self.requests: Counter[str] = Counter({label: 0 for label in _COUNTED})
        self.windows_opened = 0
        metrics.registry.register(_Totals(self, model))

    @property
    def engine_released(self) -> bool:
        return self.window is not None and self.window.engine != "serving"

    @property
    def engine_failure(self) -> str | None:
        """Why the engine is not serving after the last window, if that window closed with it
        still released (its resume failed)."""
        last = self.history[-1] if self.history and self.window is None else None
        return last.error if last is not None and last.engine != "serving" else None

    # -- lifecycle (the app's lifespan) -------------------------------------------------------

    def start(self) -> None:
        self._watcher = asyncio.create_task(self._watch_lease(), name="maintenance-lease")

    async def shutdown(self) -> None:
        """Stop the lease watcher and close an open window without resuming the engine (it is
        closing too): the queued requests go on, to the error a closing engine gives."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self.window is not None:
            await self._close(self.window, "shutdown", resume=False)
        await asyncio.gather(*self._fallbacks_closing)

    async def _watch_lease(self) -> None:
        while True:
            wait = _LEASE_CHECK_S
            window = self.window
            if window is not None and not window.opening:
                left = window.lease_deadline - time.monotonic()
                if left <= 0:
                    log.warning("maintenance window %s not renewed within %.0f s: closing it",
                                window.id, window.lease_s)
                    try:
                        await self._close(window, "lease_expired")
                    except Exception as exc:  # the watcher must outlive anything: retried
                        log.error("closing maintenance window %s failed: %s", window.id,
                                  type(exc).__name__)
                    continue
                wait = min(wait, left)
            await asyncio.sleep(wait)

    # -- the admin API ------------------------------------------------------------------------

    def state(self) -> MaintenanceState:
        return MaintenanceState(window=None if self.window is None else self.window.status(),
                                history=list(self.history))

    def _current(self) -> _Window:
        if self.window is None:
            raise OpenAIError(404, "no maintenance window is open", code="no_maintenance")
        return self.window

    async def open(self, body: MaintenanceOpen) -> WindowStatus:
        """Open a window now, drain the requests admitted before it, release the engine."""
        treatment = body.treatment or self.settings.treatment
        lease_s = body.lease_s or self.settings.lease_s
        async with self._changing:
            if self.window is not None:
                raise OpenAIError(409, f"maintenance window {self.window.id} is open",
                                  code="maintenance_open")
            fallback = await self._start_fallback() if treatment == "fallback" else None
            opened = time.time()
            window = self.window = _Window(
                id=new_id("mw"), treatment=treatment, reason=body.reason, opened_at=opened,
                expected_end=opened + body.expected_s, lease_s=lease_s,
                lease_deadline=time.monotonic() + lease_s, fallback=fallback)
            self.windows_opened += 1
        log.info("maintenance window %s open (%s, expected %.0f s): %s", window.id, treatment,
                 body.expected_s, body.reason or "no reason given")
        drained = time.monotonic()
        while self.admission.running or self.admission.waiting:
            if self.window is not window:
                raise OpenAIError(409, f"maintenance window {window.id} was closed while "
                                  "requests in flight finished", code="maintenance_closed")
            if time.monotonic() - drained > self.settings.drain_timeout_s:
                await self._close(window, "drain_timeout", resume=False,
                                  error="requests in flight did not finish within "
                                        f"{self.settings.drain_timeout_s:g} s")
                raise OpenAIError(409, f"requests in flight did not finish within "
                                  f"server.maintenance.drain_timeout_s "
                                  f"({self.settings.drain_timeout_s:g} s): the window is "
                                  "closed, nothing was released", code="drain_timeout")
            await asyncio.sleep(_DRAIN_POLL_S)
        window.drain_s = time.monotonic() - drained
        async with self._changing:
            if self.window is not window:
                raise OpenAIError(409, f"maintenance window {window.id} was closed while "
                                  "it opened", code="maintenance_closed")
            if body.release_engine:
                await self._release(window)
            window.opening = False
            window.lease_deadline = time.monotonic() + window.lease_s
            return window.status()

    async def renew(self, body: MaintenanceRenew) -> WindowStatus:
        window = self._current()
        if body.lease_s is not None:
            window.lease_s = body.lease_s
        if body.expected_s is not None:
            window.expected_end = time.time() + body.expected_s
        window.lease_deadline = time.monotonic() + window.lease_s
        return window.status()

    async def resume(self) -> WindowStatus:
        """Serve again (the refresh evaluates its candidate); the window stays open."""
        window = self._current()
        async with self._changing:
            if self.window is not window:
                raise OpenAIError(404, "no maintenance window is open", code="no_maintenance")
            if not await self._resume(window):
                raise OpenAIError(503, f"the engine did not resume: {window.error}",
                                  code="resume_failed")
            return window.status()

    async def close(self) -> WindowSummary:
        summary = await self._close(self._current(), "admin")
        if summary is None:  # closed by something else meanwhile
            raise OpenAIError(404, "no maintenance window is open", code="no_maintenance")
        return summary

    def stats(self) -> dict[str, Any]:
        window = self.window
        return {"open": window is not None, "engine_released": self.engine_released,
                "window": None if window is None else window.id,
                "queue_waiting": self.queue_waiting, "windows": self.windows_opened,
                "requests": dict(self.requests)}

    # -- engine and fallback ------------------------------------------------------------------

    async def _start_fallback(self) -> Fallback:
        s = self.settings
        if not s.fallback_url:
            raise OpenAIError(400, "the fallback treatment needs "
                              "server.maintenance.fallback_url", code="fallback_not_configured",
                              param="treatment")
        engine = OpenAIUpstreamEngine(EngineSettings(
            kind="openai", upstream_url=s.fallback_url, upstream_api_key=s.fallback_api_key,
            upstream_model=s.fallback_model, upstream_startup_timeout_s=FALLBACK_CONNECT_S,
            upstream_timeout_s=self.request_timeout_s))
        try:
            await engine.start()  # closes what it opened if it fails
        except Exception as exc:
            raise OpenAIError(503, f"the fallback at {s.fallback_url} does not answer "
                              f"({type(exc).__name__}: {exc}); no window was opened",
                              code="fallback_unavailable") from None
        # What the fallback's turns are logged as (the `model_version` of their records).
        engine.model_version = f"fallback:{engine.upstream_model}"
        return Fallback(engine, Admission(engine.max_concurrency, self.max_waiting))

    def _close_fallback(self, fallback: Fallback) -> None:
        """Close the fallback once the requests it is serving are done (within the drain
        timeout), in the background: closing the window does not wait for them."""

        async def when_idle() -> None:
            deadline = time.monotonic() + self.settings.drain_timeout_s
            while ((fallback.admission.running or fallback.admission.waiting)
                   and time.monotonic() < deadline):
                await asyncio.sleep(_DRAIN_POLL_S)
            await fallback.engine.close()

        task = asyncio.create_task(when_idle(), name="maintenance-fallback-close")
        self._fallbacks_closing.add(task)
        task.add_done_callback(self._fallbacks_closing.discard)

    async def _release(self, window: _Window) -> None:
        """Under the change lock. A release that fails closes the window (engine resumed)."""
        if self.versions is None:
            # An engine the app was given: nothing here can free it.
            window.engine = window.released = "kept"
            return
        started = time.monotonic()
        try:
            window.engine = window.released = await self.versions.suspend()
        except Exception as exc:
            window.error = f"release failed: {type(exc).__name__}: {exc}"
            log.error("maintenance window %s: %s", window.id, window.error)
            window.engine = self.versions.released or "serving"
            await self._finish(window, "release_failed", resume=True)
            raise OpenAIError(503, f"the engine was not released ({window.error}); the "
                              "window is closed", code="release_failed") from None
        finally:
            window.release_s = time.monotonic() - started
        log.info("maintenance window %s: engine released (%s) in %.1f s", window.id,
                 window.engine, window.release_s)

    async def _resume(self, window: _Window) -> bool:
        """Under the change lock: serve again if released; False (recorded) if that failed."""
        if window.engine == "serving" or self.versions is None:
            window.engine = "serving"
            return True
        started = time.monotonic()
        try:
            await self.versions.resume()
            window.engine = "serving"
            return True
        except Exception as exc:
            window.error = f"resume failed: {type(exc).__name__}: {exc}"
            log.error("maintenance window %s: %s", window.id, window.error)
            window.engine = self.versions.released or "serving"
            return False
        finally:
            window.resume_s = time.monotonic() - started

    async def _close(self, window: _Window, by: ClosedBy, *, resume: bool = True,
                     error: str | None = None) -> WindowSummary | None:
        async with self._changing:
            if self.window is not window:
                return None
            if error is not None:
                window.error = error
            return await self._finish(window, by, resume=resume)

    async def _finish(self, window: _Window, by: ClosedBy, *, resume: bool) -> WindowSummary:
        """Under the change lock: resume the engine, close the window, let the queue go on."""
        if resume:
            await self._resume(window)
        self.window = None
        summary = window.summary(by)
        self.history.append(summary)
        window.closed.set()
        if window.fallback is not None:
            self._close_fallback(window.fallback)
        log.info("maintenance window %s closed (%s): %s", window.id, by,
                 summary.counts.model_dump())
        return summary

    # -- requests -----------------------------------------------------------------------------

    def _count(self, window: _Window, label: str) -> None:
        self.requests[label] += 1
        name = _COUNTED[label]
        setattr(window.counts, name, getattr(window.counts, name) + 1)

    def _unavailable(self, window: _Window, message: str, code: str) -> OpenAIError:
        return OpenAIError(503, message, code=code,
                           headers={"retry-after": str(window.retry_after())})

    def refusal(self, window: _Window) -> OpenAIError:
        return self._unavailable(
            window, f"the server is in a maintenance window until about "
            f"{_until(window.expected_end)}; retry after {window.retry_after()} s",
            "maintenance")

    async def admit(self, deadline: float) -> Fallback | None:
        """The window's treatment of a new request (`deadline`: its `time.perf_counter()`
        deadline): return None to admit it as usual (no window, or the queue it waited in
        has gone), or the `Fallback` that serves it; raise the 503 it is answered with. No
        await happens without a window, so no request slips past a window opening between
        this call and admission."""
        while (window := self.window) is not None:
            if window.treatment == "refuse":
                self._count(window, "refused")
                raise self.refusal(window)
            if window.treatment == "fallback":
                assert window.fallback is not None
                self._count(window, "fallback")
                return window.fallback
            await self._queue(window, deadline)
        return None

    async def _queue(self, window: _Window, deadline: float) -> None:
        if self.queue_waiting >= self.settings.queue_max:
            self._count(window, "queue_full")
            raise self._unavailable(
                window, f"the maintenance queue is full ({self.settings.queue_max} requests "
                f"wait for the window to close, expected about {_until(window.expected_end)})",
                "maintenance_queue_full")
        self._count(window, "queued")
        self.queue_waiting += 1
        try:
            ended = await _first(window.closed.wait(), _hung_up(),
                                 timeout=deadline - time.perf_counter())
        finally:
            self.queue_waiting -= 1
        if ended is None:
            self._count(window, "queue_timeout")
            raise OpenAIError(503, "request deadline exceeded while queued for the maintenance "
                              "window", code="timeout")
        if ended == 1:
            # Nobody reads this; it ends the request without a traceback.
            raise OpenAIError(499, "the client closed the request", code="client_closed")

    def health(self) -> JSONResponse | None:
        """/health's answer during a window (None: no window): 503 for `refuse`, else 200."""
        window = self.window
        if window is None:
            return None
        if window.treatment == "refuse":
            error = self.refusal(window)
            return error_response(503, str(error), code=error.code, headers=error.headers)
        return JSONResponse({"status": "maintenance", "treatment": window.treatment,
                             "engine": window.engine, "window": window.id,
                             "expected_end": window.expected_end})


class _Totals(Collector):
    """`clinicloop:maintenance_requests_total{treatment}` and `..._windows_total`, read at
    scrape time."""

    def __init__(self, maintenance: Maintenance, model: Callable[[], str]) -> None:
        self._m = maintenance
        self._model = model

    def collect(self) -> Iterable[CounterMetricFamily]:
        model = self._model()
        requests = CounterMetricFamily(
            "clinicloop:maintenance_requests", "Requests that arrived during a maintenance "
            "window, by what they got.", labels=["model_name", "treatment"])
        for label, total in self._m.requests.items():
            requests.add_metric([model, label], total)
        yield requests
        windows = CounterMetricFamily("clinicloop:maintenance_windows",
                                      "Maintenance windows opened.", labels=["model_name"])
        windows.add_metric([model], self._m.windows_opened)
        yield windows


async def _first(*waits: Coroutine[Any, Any, Any], timeout: float) -> int | None:
    """The index of the first of `waits` to finish within `timeout` (None: none did); the
    others are cancelled."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        done, _ = await asyncio.wait(tasks, timeout=max(0.0, timeout),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return next((i for i, task in enumerate(tasks) if task in done), None)
