"""The clinicians' console under /console: reviewers (and admins) read conversations with the
judge's verdicts, label verdicts, edit rubrics, leave notes, and watch versions, refresh runs and
the judge's calibration. `install_console` wires it into the app."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from clinicloop.backends.registry import Registry
from clinicloop.config import Settings
from clinicloop.serving.console.api_router import NotSignedIn, render, router
from clinicloop.serving.console.serving import Console, ConsoleError
from clinicloop.serving.console.session import Sessions
from clinicloop.store.db import Store


def install_console(app: FastAPI, settings: Settings, store: Store,
                    registry: Registry | None) -> None:
    """Serve the console on `app`, whose `state.keys` is its KeyRing."""
    console = settings.server.console
    app.state.console = Console(store, registry, console, redact=settings.store.redact)
    app.state.console_sessions = Sessions(console.session_secret, console.session_ttl_s)

    async def not_signed_in(_: Request, __: Exception) -> Response:
        return RedirectResponse("/console/login", status_code=303)

    async def failed(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ConsoleError)
        return HTMLResponse(render("error.html.jinja", status=exc.status, message=exc.message),
                            status_code=exc.status)

    app.add_exception_handler(NotSignedIn, not_signed_in)
    app.add_exception_handler(ConsoleError, failed)
    app.include_router(router)
    app.mount("/console/static", StaticFiles(directory=Path(__file__).parent / "static"),
              name="console-static")
