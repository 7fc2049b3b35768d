"""A misbehaving OpenAI-compatible upstream, as a real process on 127.0.0.1, for the tests of what
the gateway does when an upstream fails.

`python tests/serving/scripted_upstream.py PORT` (or `running()`, for a test) serves
`GET /v1/models` (one model, `scripted`) and streamed `POST /v1/chat/completions` and
`/v1/completions`. What a request gets is chosen by a scenario token `@@<name>@@` anywhere in its
body (a message, a prompt); without one it answers normally. Failure texts quote the request,
as real upstreams do ("... your prompt: ..."), so a test can check that upstream text never
reaches the gateway's log. Scenarios:

- `ok`: two content chunks, finish_reason `stop`, usage, `[DONE]`
- `finish:<reason>`: one content chunk, then finish_reason `<reason>` (vLLM sends `abort`)
- `error_chunk`: one content chunk, then vLLM's mid-stream `data: {"error": ...}`, then `[DONE]`
- `error_first`: the error chunk before any content
- `drop`: one content chunk, then the connection is cut inside the chunked body
- `no_done`: one content chunk, then the body ends cleanly without `[DONE]`
- `bad_json`: one content chunk, then a chunk that is not JSON
- `bad_delta`: a chunk whose text is not a string (chat: a delta that is not an object)
- `bad_choice`: a chunk for choice 7 of a request for one
- `http_500`: a 500 answer whose error message quotes the request
- `tool_calls` (chat): "Hello", then a call streamed as vLLM's hermes parser streams it (id, type
  and name first, the arguments `{"drug_a": "ibuprofen", "drug_b": "warfarin"}` in three
  fragments), finish_reason `tool_calls`
- `think_call` (chat): reasoning_content holding a whole `<tool_call>` block (what vLLM's
  reasoning parser passes on when a model calls inside `<think>`), then content, finish `stop`
- `bad_tool_call` (chat): a tool call piece whose index is not an integer

Beside generation it serves vLLM's runtime LoRA routes (`POST /v1/load_lora_adapter`,
`/v1/unload_lora_adapter`: the adapter names, and the paths loads name, are recorded in order,
`GET /lora_calls` lists them; `/v1/models` reports the base's `root` as vLLM does, `MODEL_ROOT`)
and its sleep-mode routes (`POST /sleep`, `POST /wake_up`, `GET /is_sleeping`): while asleep,
generation is answered 503, where a sleeping vLLM would not serve it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MODEL = "scripted"
MODEL_ROOT = "/srv/models/scripted"


class _State:
    """What the process remembers between requests (one process per upstream)."""

    def __init__(self) -> None:
        self.asleep = False
        self.loads: list[str] = []
        self.load_paths: list[str] = []
        self.unloads: list[str] = []


STATE = _State()
_SCENARIO = re.compile(r"@@([a-z0-9_]+(?::[a-z0-9_]+)?)@@")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib's name
        pass

    def do_GET(self) -> None:
        path = self.path.rstrip("/")
        if path == "/is_sleeping":
            self._json(200, {"is_sleeping": STATE.asleep})
        elif path == "/lora_calls":
            self._json(200, {"load": STATE.loads, "unload": STATE.unloads,
                             "load_paths": STATE.load_paths})
        elif path == "/v1/models":
            self._json(200, {"object": "list",
                             "data": [{"id": MODEL, "object": "model", "root": MODEL_ROOT}]})
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        text = raw.decode("utf-8", "replace")
        path = self.path.split("?")[0]
        if path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            body = json.loads(raw)
            if path.endswith("/load_lora_adapter"):
                STATE.loads.append(body["lora_name"])
                STATE.load_paths.append(body["lora_path"])
            else:
                STATE.unloads.append(body["lora_name"])
            self._json(200, {"status": "Success"})
            return
        if path in ("/sleep", "/wake_up"):
            STATE.asleep = path == "/sleep"
            self._json(200, {"status": "sleeping" if STATE.asleep else "awake"})
            return
        if STATE.asleep:
            self._json(503, {"error": {"message": "the engine is sleeping",
                                       "type": "ServiceUnavailableError", "code": 503}})
            return
        found = _SCENARIO.search(text)
        scenario = found.group(1) if found else "ok"
        chat = self.path.endswith("/chat/completions")
        if scenario == "http_500":
            self._json(500, {"error": {"message": f"engine crashed on your prompt: {text}",
                                       "type": "InternalServerError", "code": 500}})
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        error = {"error": {"message": f"generation failed on your prompt: {text}",
                           "type": "InternalServerError", "code": 500}}
        if scenario == "error_first":
            self._event(error)
            self._done()
            return
        self._event(_chunk(chat, "Hello", None))
        if scenario == "ok":
            self._event(_chunk(chat, " there.", "stop"))
            self._event({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}})
            self._done()
        elif scenario.startswith("finish:"):
            self._event(_chunk(chat, "", scenario.split(":", 1)[1]))
            self._done()
        elif scenario == "error_chunk":
            self._event(error)
            self._done()
        elif scenario == "drop":
            self.wfile.write(b"400\r\ndata: {\"choices\": [")  # a chunk promised, never finished
            self.wfile.flush()
            self.close_connection = True
        elif scenario == "no_done":
            self._end()
        elif scenario == "bad_json":
            self._write(f"data: {{not json {text}\n\n")
            self._done()
        elif scenario == "bad_delta":
            self._event({"choices": [{"index": 0, "delta": "text", "text": ["x"]}]})
            self._done()
        elif scenario == "tool_calls":
            call = {"index": 0, "id": "chatcmpl-tool-up1", "type": "function",
                    "function": {"name": "check_drug_interaction", "arguments": ""}}
            self._event(_delta({"tool_calls": [call]}))
            for part in ('{"drug_a": "ibu', 'profen", "drug_b": ', '"warfarin"}'):
                self._event(_delta({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}))
            self._event(_delta({}, "tool_calls"))
            self._done()
        elif scenario == "think_call":
            block = ('<tool_call>\n{"name": "book_appointment", "arguments": {"specialty": '
                     '"dermatology", "day": "Tuesday"}}\n</tool_call>')
            self._event(_delta({"reasoning_content": f"I should book. {block}"}))
            self._event(_delta({"content": "Booked."}, "stop"))
            self._done()
        elif scenario == "bad_tool_call":
            self._event(_delta({"tool_calls": [{"index": "first", "function": {}}]}))
            self._done()
        elif scenario == "bad_choice":
            chunk = _chunk(chat, "more", None)
            chunk["choices"][0]["index"] = 7
            self._event(chunk)
            self._done()

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _write(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _event(self, body: dict[str, Any]) -> None:
        self._write(f"data: {json.dumps(body)}\n\n")

    def _done(self) -> None:
        self._write("data: [DONE]\n\n")
        self._end()

    def _end(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def _chunk(chat: bool, text: str, finish: str | None) -> dict[str, Any]:
    choice: dict[str, Any] = (
        {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
    )
    return {"id": "x", "model": MODEL, "choices": [{**choice, "finish_reason": finish}]}


def _delta(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "x", "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


@contextmanager
def running() -> Iterator[str]:
    """Start the scripted upstream in its own process; yields its base URL (ending in /v1)."""
    import httpx

    from tests.conftest import free_port, wait_until

    port = free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__)), str(port)],
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until(lambda: httpx.get(url + "/models").status_code == 200, 30,
                   "scripted upstream", proc)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
