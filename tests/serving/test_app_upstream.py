"""The gateway in front of a supervised upstream (`engine.kind=openai` with `upstream_command`):
the official client streams through it and each request is logged like any other, under the
registry version the upstream's own model was registered as."""

from __future__ import annotations

import json
import sqlite3
import sys

import openai

from tests.conftest import free_port, wait_until


def test_gateway_over_a_supervised_llama_cpp_server(server_factory, tiny_model):
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(tiny_model.gguf_q8_0),
               "--host", "127.0.0.1", "--port", str(port), "--n_threads", "1", "--n_ctx", "1024",
               "--interrupt_requests", "False"]
    server = server_factory({
        "CLINICLOOP_ENGINE__KIND": "openai",
        "CLINICLOOP_ENGINE__UPSTREAM_URL": f"http://127.0.0.1:{port}/v1",
        "CLINICLOOP_ENGINE__UPSTREAM_COMMAND": json.dumps(command),
        "CLINICLOOP_ENGINE__SERVED_MODEL_NAME": "upstream-tiny",
    })
    client = openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["upstream-tiny"]
    messages = [{"role": "user", "content": "I have a sore throat."}]
    full = client.chat.completions.create(model="upstream-tiny", messages=messages,
                                          temperature=0, seed=1, max_tokens=24)
    chunks = list(client.chat.completions.create(model="upstream-tiny", messages=messages,
                                                 temperature=0, seed=1, max_tokens=24,
                                                 stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content and streamed

    def logged() -> list[tuple]:
        with sqlite3.connect(server.db_path) as db:
            return db.execute("select model_version, status, completion_tokens from turns"
                              ).fetchall()

    wait_until(lambda: len(logged()) == 2, 10, "both requests logged")
    assert all(v == "base" and s == "ok" and n > 0 for v, s, n in logged())
