"""Routes of the console (/console): sign-in, then each page rendered from `serving.Console`'s
view models. Pages need a console sign-in (a reviewer or admin key); every POST needs the
sign-in's CSRF token and answers with a 303 back to the page it came from."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from clinicloop.serving.auth import NO_REVIEWER_KEY, KeyRing
from clinicloop.serving.console.serving import AXES, Console, ConsoleError, ConversationQuery
from clinicloop.serving.console.session import COOKIE, Sessions, SignedIn

# HTML pages for people, not part of the API: kept out of the OpenAPI schema that clients and
# `make harden`'s fuzzing read (tests/serving/console fuzz the pages' fields themselves).
router = APIRouter(prefix="/console", include_in_schema=False)
T = TypeVar("T")
_MAX_FORM_FIELDS = 20
_SIGN_IN = "/console/login"


# Autoescaped: nothing from the store or the request is ever rendered as markup.
_TEMPLATES = Environment(loader=FileSystemLoader(Path(__file__).parent / "templates"),
                         autoescape=True, undefined=StrictUndefined, trim_blocks=True,
                         lstrip_blocks=True)

_TEMPLATES.filters["num"] = lambda x, digits=3: "—" if x is None else f"{x:.{digits}f}"
_TEMPLATES.filters["when"] = lambda x: "—" if x is None else f"{x:%Y-%m-%d %H:%M} UTC"


def render(template: str, **context: Any) -> str:
    return _TEMPLATES.get_template(template).render(**context)


class NotSignedIn(Exception):
    """The request has no valid console sign-in: it goes to the sign-in page."""


def _console(request: Request) -> Console:
    return request.app.state.console


def _sessions(request: Request) -> Sessions:
    return request.app.state.console_sessions


def _signed_in(request: Request) -> tuple[SignedIn, str]:
    cookie = request.cookies.get(COOKIE, "")
    who = _sessions(request).read(cookie)
    keys: KeyRing = request.app.state.keys
    if who is None or keys.console_role(who.key_id) != who.role:
        raise NotSignedIn
    return who, cookie


def page(request: Request, template: str, *, status: int = 200, **context: Any) -> HTMLResponse:
    who, cookie = _signed_in(request)
    return HTMLResponse(render(template, who=who, csrf=_sessions(request).csrf(cookie),
                               **context), status_code=status)


async def _form(request: Request, *, signed_in: bool = True
                ) -> tuple[dict[str, str], SignedIn | None]:
    """The posted urlencoded form (the last value of each field), its CSRF token checked."""
    who, cookie = _signed_in(request) if signed_in else (None, "")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise ConsoleError(400, "send the page's form (application/x-www-form-urlencoded)")
    try:
        fields = parse_qs((await request.body()).decode("utf-8"), keep_blank_values=True,
                          max_num_fields=_MAX_FORM_FIELDS, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise ConsoleError(400, "the form is not valid") from None
    form = {name: values[-1] for name, values in fields.items()}
    if signed_in and not _sessions(request).csrf_ok(cookie, form.get("csrf")):
        raise ConsoleError(403, "the form's CSRF token is missing or wrong: reload the page")
    return form, who


async def _blocking(call: Callable[[], T]) -> T:
    return await asyncio.to_thread(call)


def _back_to(conversation_id: str, turn_id: str) -> RedirectResponse:
    return RedirectResponse(f"/console/conversations/{quote(conversation_id, safe='')}"
                            f"#turn-{quote(turn_id, safe='')}", status_code=303)


@router.get("")
async def home() -> RedirectResponse:
    return RedirectResponse("/console/conversations", status_code=303)


def _closed() -> HTMLResponse:
    """The sign-in page of a server with no reviewer or admin key: nobody can sign in."""
    return HTMLResponse(render("login.html.jinja", error=NO_REVIEWER_KEY, form=False),
                        status_code=403)


@router.get("/login")
async def login_page(request: Request) -> HTMLResponse:
    keys: KeyRing = request.app.state.keys
    if not keys.console_keys:
        return _closed()
    return HTMLResponse(render("login.html.jinja", error=None, form=True))


@router.post("/login")
async def login(request: Request) -> Response:
    keys: KeyRing = request.app.state.keys
    if not keys.console_keys:
        return _closed()
    form, _ = await _form(request, signed_in=False)
    who = keys.identify(form.get("key", "").strip())
    if who is None or who.key_id is None:
        return HTMLResponse(render("login.html.jinja", error="invalid key", form=True),
                            status_code=401)
    if who.role not in ("reviewer", "admin"):
        return HTMLResponse(render(
            "login.html.jinja", form=True,
            error=f"this is a {who.role} key: the console needs a reviewer or admin key"),
            status_code=403)
    sessions = _sessions(request)
    response = RedirectResponse("/console/conversations", status_code=303)
    response.set_cookie(COOKIE, sessions.issue(who.key_id, who.role), max_age=int(sessions.ttl_s),
                        path="/console", httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return response


@router.post("/logout")
async def logout(request: Request) -> RedirectResponse:
    await _form(request)
    response = RedirectResponse(_SIGN_IN, status_code=303)
    response.delete_cookie(COOKIE, path="/console", httponly=True, samesite="strict",
                           secure=request.url.scheme == "https")
    return response


@router.get("/conversations")
async def conversations(request: Request) -> HTMLResponse:
    _signed_in(request)
    query = ConversationQuery.parse(request.query_params)
    found = await _blocking(lambda: _console(request).conversations(query))
    return page(request, "conversations.html.jinja", query=query, found=found)


@router.get("/conversations/{conversation_id:path}")
async def conversation(conversation_id: str, request: Request) -> HTMLResponse:
    _signed_in(request)
    view = await _blocking(lambda: _console(request).conversation(conversation_id))
    return page(request, "conversation.html.jinja", view=view, axes=AXES)


async def _write(request: Request, turn_id: str,
                 change: Callable[[Console, dict[str, str], str], str]) -> RedirectResponse:
    """A reviewer's change to `turn_id` from a checked form (`change` returns the turn's
    conversation), then back to that turn on its conversation page."""
    form, who = await _form(request)
    assert who is not None  # a signed-in form
    conversation_id = await _blocking(lambda: change(_console(request), form, who.key_id))
    return _back_to(conversation_id, turn_id)


@router.post("/turns/{turn_id}/labels")
async def label(turn_id: str, request: Request) -> RedirectResponse:
    return await _write(request, turn_id, lambda c, form, who: c.label(turn_id, form, who))


@router.post("/turns/{turn_id}/rubric/{action}")
async def rubric(turn_id: str, action: str, request: Request) -> RedirectResponse:
    if action not in ("add", "edit", "remove"):
        raise ConsoleError(404, "no such rubric action")
    kind: Literal["add", "edit", "remove"] = action  # type: ignore[assignment]  # checked above
    return await _write(request, turn_id,
                        lambda c, form, who: c.edit_rubric(turn_id, kind, form, who))


@router.post("/turns/{turn_id}/notes")
async def note(turn_id: str, request: Request) -> RedirectResponse:
    return await _write(request, turn_id, lambda c, form, who: c.note(turn_id, form, who))


@router.get("/versions")
async def versions(request: Request) -> HTMLResponse:
    _signed_in(request)
    view = await _blocking(_console(request).versions)
    return page(request, "versions.html.jinja", view=view)


@router.get("/runs/{run_id}")
async def run(run_id: str, request: Request) -> HTMLResponse:
    _signed_in(request)
    view = await _blocking(lambda: _console(request).run(run_id))
    return page(request, "run.html.jinja", view=view)


@router.get("/runs/{run_id}/reward_curve.png")
async def reward_curve(run_id: str, request: Request) -> FileResponse:
    _signed_in(request)
    path = await _blocking(lambda: _console(request).reward_curve(run_id))
    return FileResponse(path, media_type="image/png")


@router.get("/calibration")
async def calibration(request: Request) -> HTMLResponse:
    _signed_in(request)
    found = await _blocking(_console(request).calibration)
    return page(request, "calibration.html.jinja", calibrations=found)
