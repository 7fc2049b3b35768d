"""The supervised upstream killed mid-stream, through a real gateway: `clinicloop serve` on the
`openai` engine with `engine.upstream_command` launching llama-cpp-python's server on the tiny
GGUF (a real OpenAI-compatible upstream, standing in for `vllm serve`, which takes minutes to start
on a CPU). While a client is reading a long stream the upstream gets SIGKILL: the client's stream
ends with an error event and then `data: [DONE]`, `/health` answers 503, the supervisor starts a
new upstream, `/health` is 200 again and the next request is served by it."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import httpx

from tests.conftest import free_port, wait_until

# Seeded sampling at temperature 2 rarely draws end-of-sequence, so the answer runs far past the
# moment of the kill (checked: the stream must not have finished before it).
LONG = {"messages": [{"role": "user", "content": "Describe every cause of a headache."}],
        "max_tokens": 900, "temperature": 2.0, "seed": 11, "stream": True}


def upstream_command(gguf: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host",
            "127.0.0.1", "--port", str(port), "--n_threads", "1", "--n_ctx", "1024",
            "--interrupt_requests", "False"]


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def health(base_url: str) -> int:
    return httpx.get(base_url + "/health", timeout=5).status_code


def test_upstream_killed_mid_stream_errors_the_stream_and_is_restarted(server_factory,
                                                                       tiny_model):
    port = free_port()
    server = server_factory({
        "CLINICLOOP_ENGINE__KIND": "openai",
        "CLINICLOOP_ENGINE__UPSTREAM_URL": f"http://127.0.0.1:{port}/v1",
        "CLINICLOOP_ENGINE__UPSTREAM_COMMAND": json.dumps(
            upstream_command(tiny_model.gguf_q8_0, port)),
        "CLINICLOOP_ENGINE__UPSTREAM_STARTUP_TIMEOUT_S": "90",
    })
    [upstream] = children(server.proc.pid)

    events: list[str] = []
    with httpx.stream("POST", server.v1 + "/chat/completions", json=LONG, timeout=120) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if not line.startswith("data:"):
                continue
            events.append(line[5:].strip())
            if len(events) == 3:
                os.kill(upstream, signal.SIGKILL)
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]", events[-3:]
    assert "error" in chunks[-1], events[-3:]
    error = chunks[-1]["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["code"]
    assert not any(c["choices"][0].get("finish_reason") for c in chunks[:-1] if "choices" in c)

    wait_until(lambda: health(server.base_url) == 503, 10, "/health 503 after the kill")
    wait_until(lambda: health(server.base_url) == 200, 120, "/health 200 after the restart",
               server.proc)
    assert children(server.proc.pid) not in ([], [upstream])
    answer = httpx.post(server.v1 + "/chat/completions", timeout=60, json={
        "messages": LONG["messages"], "max_tokens": 8})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"]
