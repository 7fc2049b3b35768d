"""No request text reaches the server log. A unique marker goes into every field a request has
(messages, stop, headers, chat_template_kwargs, response_format, model, user, the key, the query
string, values that fail validation, bodies that are not JSON) and into upstream failures that
quote the request mid-stream; the marker must never appear in what `clinicloop serve` printed,
on the llama.cpp engine and on the openai engine in front of a failing upstream. Then uvicorn
itself, with the server's log config, around an app that raises: class names only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port, wait_until
from tests.serving import scripted_upstream

MARKER = "Zq7MARKERx4"  # stands in for PHI: a name, a phone number
KEY, ADMIN_KEY = "sk-log-client", "sk-log-admin"
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with scripted_upstream.running() as url:
        yield url


@pytest.fixture(scope="module")
def servers(server_factory, upstream):
    keys = {"CLINICLOOP_SERVER__API_KEYS": f'["{KEY}"]',
            "CLINICLOOP_SERVER__ADMIN_KEYS": f'["{ADMIN_KEY}"]',
            "CLINICLOOP_SERVER__MAX_BODY_BYTES": "65536"}
    return {"llamacpp": server_factory(keys),
            "openai": server_factory({**keys, "CLINICLOOP_ENGINE__KIND": "openai",
                                      "CLINICLOOP_ENGINE__UPSTREAM_URL": upstream})}


def _chat(**fields: Any) -> dict[str, Any]:
    return {"messages": [
        {"role": "system", "content": f"Patient {MARKER}."},
        {"role": "user", "content": f"I am {MARKER}, call me at 555-0100.", "name": MARKER},
    ], "max_tokens": 4, **fields}


# Each: path, json body (or raw bytes), extra headers.
REQUESTS: list[tuple[str, Any, dict[str, str]]] = [
    ("/v1/chat/completions", _chat(stop=[MARKER], user=MARKER, model=MARKER,
                                   chat_template_kwargs={"thinking_mode": "off", "note": MARKER}),
     {"x-conversation-id": MARKER, "user-agent": MARKER, "x-note": MARKER}),
    ("/v1/chat/completions", _chat(stream=True, stop=MARKER), {}),
    ("/v1/chat/completions", _chat(response_format={"type": "json_schema", "json_schema": {
        "name": MARKER, "schema": {"type": "object", "properties": {
            MARKER: {"type": "string", "enum": [MARKER, f'{MARKER} "quoted\\']}}}}}), {}),
    ("/v1/chat/completions", _chat(response_format={"type": "json_schema", "json_schema": {
        "schema": {"type": "string", "pattern": f"({MARKER}"}}}), {}),
    ("/v1/completions", {"prompt": f"Patient {MARKER}:", "max_tokens": 4, "stop": [MARKER]}, {}),
    ("/v1/chat/completions?note=" + MARKER, _chat(), {}),
    ("/v1/chat/completions", _chat(), {"authorization": f"Bearer {MARKER}"}),
    ("/v1/chat/completions", _chat(temperature=MARKER), {}),
    ("/v1/chat/completions", _chat(max_tokens=MARKER, n=MARKER), {}),
    ("/v1/chat/completions", {"messages": [{"role": MARKER, "content": MARKER}]}, {}),
    ("/v1/chat/completions", _chat(response_format={"type": MARKER}), {}),
    ("/v1/chat/completions", _chat(chat_template_kwargs=[MARKER]), {}),
    ("/v1/chat/completions", f'{{"messages": [{{"role": "user", "content": "{MARKER}\\ud800"}}]}}'
     .encode(), {}),
    ("/v1/chat/completions", f'{{"messages": "{MARKER}", "top_p": NaN}}'.encode(), {}),
    ("/v1/chat/completions", f'{{"messages": [{{"content": "{MARKER}'.encode(), {}),
    ("/v1/chat/completions", f'{{"messages": "{MARKER}\xff"}}'.encode("latin-1"), {}),
    ("/v1/chat/completions", _chat(padding=MARKER * 10_000), {}),
    ("/v1/completions", {"prompt": [MARKER, MARKER]}, {}),
    ("/admin/v1/versions", {"parent": MARKER, "model_path": f"/tmp/{MARKER}.gguf"},
     {"authorization": f"Bearer {ADMIN_KEY}"}),
    ("/admin/v1/canary", {"version": MARKER, "share": 0.5},
     {"authorization": f"Bearer {ADMIN_KEY}"}),
    ("/admin/v1/versions", {"parent": MARKER}, {}),
]
# What the failing upstream is asked for: it quotes the request in its error text.
UPSTREAM_FAILURES = ["error_chunk", "error_first", "http_500", "bad_json", "bad_delta", "drop",
                     "finish:abort", "finish:made_up"]


def _send(server, path: str, body: Any, headers: dict[str, str]) -> int:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = httpx.post(server.base_url + path, content=content, timeout=60,
                      headers={"content-type": "application/json", **AUTH, **headers})
    return resp.status_code


@pytest.mark.parametrize("engine", ["llamacpp", "openai"])
def test_no_request_text_in_the_server_log(servers, engine):
    server = servers[engine]
    statuses = [_send(server, *request) for request in REQUESTS]
    assert all(status < 500 for status in statuses), statuses
    sent = sum(path.startswith("/v1/") for path, _, _ in REQUESTS)
    if engine == "openai":
        for scenario in UPSTREAM_FAILURES:
            for stream in (False, True):
                message = {"role": "user", "content": f"@@{scenario}@@ {MARKER}"}
                status = _send(server, "/v1/chat/completions",
                               _chat(stream=stream, messages=[message]), {})
                assert status in ((200, 502, 503) if stream else (502, 503))
                sent += 1
    # The marker stays out of the log, but the log is not empty: each request left its line.
    wait_until(lambda: server.log().count('"POST /v1/') >= sent, 10, "access lines")
    log = server.log()
    assert MARKER not in log
    assert "Traceback" not in log
    assert '"POST /v1/chat/completions HTTP/1.1" 200' in log


APP = """
import sys
import threading
import uvicorn
from starlette.responses import PlainTextResponse, StreamingResponse
from clinicloop.serving.errors import ContainErrors
from clinicloop.serving.logs import configure

MARKER = sys.argv[3]

def fail():
    raise LookupError(f"in a thread {MARKER}")

class Unraisable:
    def __del__(self):
        raise OSError(f"in __del__ {MARKER}")

async def app(scope, receive, send):
    if scope["path"] == "/before":
        raise ValueError(f"bad value {MARKER}") from KeyError(MARKER)
    if scope["path"] == "/python":
        thread = threading.Thread(target=fail)
        thread.start()
        thread.join()
        Unraisable()
        return await PlainTextResponse("ok")(scope, receive, send)
    async def body():
        yield b"data: 1\\n\\n"
        raise RuntimeError(f"mid-stream {MARKER}")
    await StreamingResponse(body())(scope, receive, send)

served = ContainErrors(app) if sys.argv[2] == "contained" else app
uvicorn.run(served, port=int(sys.argv[1]), lifespan="off", log_config=configure())
"""


@pytest.mark.parametrize("wrapped", ["contained", "bare"])
def test_exceptions_escaping_the_app_are_logged_by_class_name_only(tmp_path: Path, wrapped):
    """`ContainErrors` stops them before uvicorn, logging the class; were one to reach uvicorn
    (`bare`), the server's log config prints its class names, not its text; and so it does for
    what Python prints itself (an exception ending a thread, one raised in `__del__`)."""
    port = free_port()
    log_path = tmp_path / "uvicorn.log"
    proc = subprocess.Popen([sys.executable, "-c", APP, str(port), wrapped, MARKER],
                            stdout=log_path.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(base + "/before").status_code == 500, 30, "uvicorn", proc)
        if wrapped == "contained":
            assert httpx.get(base + "/before").json()["error"]["code"] == "internal_error"
        with pytest.raises(httpx.RemoteProtocolError):  # cut off, not ended as if complete
            httpx.get(base + "/stream").read()
        assert httpx.get(base + "/python").text == "ok"
        wait_until(lambda: "RuntimeError" in log_path.read_text(), 10, "stream error logged")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    log = log_path.read_text()
    assert MARKER not in log and "Traceback" not in log
    assert all(name in log for name in ("ValueError", "RuntimeError", "LookupError", "OSError"))
