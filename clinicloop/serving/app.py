"""The app factory: wires settings into engine, log writer, keys, limits and routes.

`create_app(settings)` returns a FastAPI app whose lifespan starts the log writer, then loads the
engine in the background (so /health answers 503 while a model loads), and on shutdown drains the
writer after the engine stops. Nothing is global: each app owns its engine, writer and metrics.
The model is served through the versioned engine (`versions.py`), whose registry and admin routes
let a new version be swapped in while serving, and which a maintenance window (`maintenance.py`)
releases while the GPU retrains.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clinicloop.backends.base import Engine
from clinicloop.backends.registry import open_registry
from clinicloop.config import Settings
from clinicloop.serving.admin.api_router import router as admin_router
from clinicloop.serving.admin.maintenance_router import router as maintenance_router
from clinicloop.serving.admission import Admission
from clinicloop.serving.auth import KeyCheck, KeyRing
from clinicloop.serving.chat_completion.api_router import router as chat_router
from clinicloop.serving.chat_completion.serving import ChatCompletionHandler
from clinicloop.serving.completion.api_router import router as completion_router
from clinicloop.serving.completion.serving import CompletionHandler
from clinicloop.serving.console import install_console
from clinicloop.serving.errors import ContainErrors, error_response, install_error_handlers
from clinicloop.serving.feedback.api_router import router as feedback_router
from clinicloop.serving.feedback.serving import FeedbackHandler
from clinicloop.serving.generation import Services
from clinicloop.serving.maintenance import HangUpWatch, Maintenance
from clinicloop.serving.metrics import Metrics, kv_cache_usage
from clinicloop.serving.models.api_router import router as models_router
from clinicloop.serving.protocol import body_problem
from clinicloop.serving.responses.api_router import router as responses_router
from clinicloop.serving.responses.serving import ResponsesHandler
from clinicloop.serving.tokenize.api_router import router as tokenize_router
from clinicloop.serving.tokenize.serving import TokenizeHandler
from clinicloop.serving.versions import VersionedEngine
from clinicloop.store.db import Store
from clinicloop.store.writer import LogWriter, SpoolInUse

log = logging.getLogger(__name__)


class RequestBody:
    """Reads each request's whole body before the app sees it: over `limit` bytes (declared or,
    for a chunked body, counted) is a 413, and a body that is not strict JSON text
    (`body_problem`) a 400; the app then gets the body as it came."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = error_response(413, f"request body is larger than {self.limit} bytes",
                                 code="request_too_large")
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            return await too_big(scope, receive, send)
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before it finished sending
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await too_big(scope, receive, send)
        # The console's forms are urlencoded, not JSON: it validates them itself.
        console = scope["path"].startswith("/console/")
        problem = body_problem(bytes(body)) if body and not console else None
        if problem is not None:
            return await error_response(400, problem, code="invalid_body")(scope, receive, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # later calls wait for the client's disconnect
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)


def _open_store(settings: Settings) -> Store:
    # `ack` durability: a committed turn survives power loss too (synchronous=FULL).
    synchronous = "FULL" if settings.store.durability == "ack" else "NORMAL"
    return Store(settings.store.url, sqlite_synchronous=synchronous)


def create_app(settings: Settings, *, engine: Engine | None = None, writer: Any = None,
               on_load_failure: Callable[[str], None] | None = None) -> FastAPI:
    """`on_load_failure(message)`: called with one line when the engine fails to start (after
    its failed start stopped whatever it launched) or the log writer cannot (its spool is another
    process's); `serve` passes one that shuts the server down and exits non-zero. Without it an
    engine failure leaves the app up answering 503."""
    versions: VersionedEngine | None = None
    if engine is None:
        # Models are served as registry versions, so they can be swapped while serving.
        engine = versions = VersionedEngine(
            settings, open_registry(settings.registry, settings.store.url))
    # One store: the log writer writes it, the Responses API reads stored responses from it.
    store = _open_store(settings)
    writer = writer or LogWriter(store, settings.store)
    keys = KeyRing(settings.server.api_keys, settings.server.admin_keys,
                   settings.server.service_keys, settings.server.reviewer_keys)
    keys.check_open_allowed(settings.server.host)
    metrics = Metrics()
    admission = Admission(settings.server.max_running or engine.max_concurrency,
                          settings.server.max_waiting)
    maintenance = Maintenance(settings.server.maintenance, admission=admission,
                              versions=versions, metrics=metrics,
                              model=lambda: engine.model_name,
                              request_timeout_s=settings.server.request_timeout_s,
                              max_waiting=settings.server.max_waiting)
    services = Services(engine=engine, admission=admission, metrics=metrics, writer=writer,
                        request_timeout_s=settings.server.request_timeout_s,
                        maintenance=maintenance)
    load_error: list[str] = []

    async def load() -> None:
        try:
            await engine.start()
            log.info("engine ready: %s (%s)", engine.model_name, engine.model_version)
        except Exception as exc:
            load_error.append(f"{type(exc).__name__}: {exc}")
            log.error("engine failed to load: %s", load_error[0])
            if on_load_failure is not None:
                on_load_failure(f"the engine could not start: {load_error[0]}")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if keys.open:
            log.warning("no API keys configured: serving without authentication on %s",
                        settings.server.host)
        try:
            await writer.start()
        except SpoolInUse as exc:  # two replicas on one spool would replay each other's records
            if on_load_failure is not None:
                on_load_failure(f"the log writer could not start: {exc}")
            raise
        loading = asyncio.create_task(load())
        maintenance.start()
        try:
            yield
        finally:
            await loading
            await maintenance.shutdown()
            await engine.close()
            await writer.close()

    app = FastAPI(title="clinicloop", version="0.1.0", lifespan=lifespan)
    app.state.keys = keys
    app.state.services = services
    app.state.versions = versions
    app.state.maintenance = maintenance
    app.state.chat = ChatCompletionHandler(services, settings.server.max_top_logprobs)
    app.state.completion = CompletionHandler(services, settings.server.max_top_logprobs)
    app.state.tokenize = TokenizeHandler(engine)
    app.state.responses = ResponsesHandler(services, store)
    app.state.feedback = FeedbackHandler(store, redact=settings.store.redact)
    install_error_handlers(app)
    # Added innermost first: the key is checked before a body byte is read, and an exception
    # escaping any of it stops at ContainErrors.
    app.add_middleware(HangUpWatch)
    app.add_middleware(RequestBody, limit=settings.server.max_body_bytes)
    app.add_middleware(KeyCheck, keys=keys)
    app.add_middleware(ContainErrors)
    app.include_router(chat_router)
    app.include_router(completion_router)
    app.include_router(models_router)
    app.include_router(tokenize_router)
    app.include_router(responses_router)
    app.include_router(feedback_router)
    app.include_router(admin_router)
    app.include_router(maintenance_router)
    install_console(app, settings, store, versions.registry if versions is not None else None)

    metrics.watch(lambda: {
        "vllm:num_requests_running": ("Requests generating.", admission.running),
        "vllm:num_requests_waiting": ("Requests waiting for a slot.", admission.waiting),
        "vllm:kv_cache_usage_perc": ("KV-cache usage. 1 means 100 percent usage.",
                                     kv_cache_usage(engine.kv_cells())),
        "clinicloop:log_queue_depth": ("Log records waiting to be written.", writer.queue_depth),
        "clinicloop:log_store_up": ("1 while the conversation store accepts writes.",
                                    float(writer.store_up)),
        "clinicloop:log_records_inserted": ("Log records written to the store.", writer.inserted),
        "clinicloop:log_records_spooled": ("Log records spooled while the store was down.",
                                           writer.spooled),
        "clinicloop:log_records_replayed": ("Spooled log records later written to the store.",
                                            writer.replayed),
        "clinicloop:log_records_dead_lettered": ("Log records that cannot be stored, set aside "
                                                 "in the dead-letter file.", writer.dead_lettered),
        "clinicloop:log_records_dropped": ("Log records lost (spool or dead-letter file failed, "
                                           "or submitted after shutdown).", writer.dropped),
        "clinicloop:log_acks_waiting": ("Responses waiting for their log record to be on disk.",
                                        writer.acks_waiting),
        "clinicloop:log_ack_timeouts": ("Responses sent before their log record was on disk "
                                        "(store.ack_timeout_s passed).", writer.ack_timeouts),
        "clinicloop:maintenance_open": ("1 while a maintenance window is open.",
                                        float(maintenance.window is not None)),
        "clinicloop:maintenance_engine_released": ("1 while a maintenance window has released "
                                                   "the engine.",
                                                   float(maintenance.engine_released)),
    }, lambda: engine.model_name)
    metrics.watch_counters(engine.stats, lambda: engine.model_name)

    @app.get("/health")
    async def health() -> JSONResponse:
        if (during_window := maintenance.health()) is not None:
            return during_window
        if engine.healthy():
            return JSONResponse({"status": "ok", "model": engine.model_name})
        failure = load_error[0] if load_error else maintenance.engine_failure
        state = "loading" if failure is None else "failed: " + failure
        return error_response(503, f"engine not ready ({state})", code="engine_unavailable")

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/admin/v1/stats")
    async def admin_stats(request: Request) -> dict[str, Any]:
        keys.caller(request, admin=True)
        return {
            "model": engine.model_name, "model_version": engine.model_version,
            "running": admission.running, "waiting": admission.waiting,
            "log": {"store_up": writer.store_up, "queue_depth": writer.queue_depth,
                    "inserted": writer.inserted, "spooled": writer.spooled,
                    "replayed": writer.replayed, "dead_lettered": writer.dead_lettered,
                    "dropped": writer.dropped, "acks_waiting": writer.acks_waiting,
                    "ack_timeouts": writer.ack_timeouts},
            "maintenance": maintenance.stats(),
        }

    return app
