"""Clients that hang up mid-stream free what they held: 20 streamed requests, each far longer than
the test, abandoned at different points (after the first content chunk, after a few dozen chunks,
and while still queued for a slot). Afterwards `vllm:num_requests_running` and `..._waiting` are 0
within a few seconds, and as many new requests as the engine has slots are all served at once: a
sequence still decoding for a client that left would hold an engine slot for minutes."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.conftest import wait_until

CLIENTS = 20
SLOTS = 4
# An abandoned sequence left decoding would hold its slot for minutes, far past every deadline
# below (the tiny model's KV cache is 256 bytes a token, so 4 x 32k tokens is 32 MiB).
N_CTX = 32768
MAX_TOKENS = 32000
MESSAGES = [{"role": "user", "content": "Tell me everything about managing a chronic cough."}]


def gauge(base_url: str, name: str) -> float:
    for line in httpx.get(base_url + "/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not on /metrics")


def hang_up(chat_url: str, how: str) -> str:
    """Open a long stream and drop the connection at the point `how` names; what happened."""
    body = {"messages": MESSAGES, "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}
    # `queued`: give up while the request still waits for a slot (no response headers yet).
    timeout = httpx.Timeout(60.0, read=0.5) if how == "queued" else httpx.Timeout(60.0)
    chunks = {"first_chunk": 1, "mid_stream": 30}.get(how, 0)
    try:
        with httpx.stream("POST", chat_url, json=body, timeout=timeout) as resp:
            assert resp.status_code == 200, resp.read()
            seen = 0
            for line in resp.iter_lines():
                if line.startswith("data:") and '"content"' in line:
                    seen += 1
                    if seen >= chunks:
                        return f"hung up after {seen} chunks"
    except httpx.ReadTimeout:
        return "hung up while queued"
    raise AssertionError("the stream ended before the client hung up")


def test_twenty_clients_hanging_up_mid_stream_free_their_slots(server_factory):
    server = server_factory({
        "CLINICLOOP_ENGINE__N_CTX": str(N_CTX), "CLINICLOOP_ENGINE__N_PARALLEL": str(SLOTS),
        "CLINICLOOP_ENGINE__PREFIX_CACHE_SLOTS": "0", "CLINICLOOP_SERVER__MAX_WAITING": "32",
    })
    chat = server.v1 + "/chat/completions"
    hows = [("first_chunk", "mid_stream", "queued")[i % 3] for i in range(CLIENTS)]
    with ThreadPoolExecutor(CLIENTS) as pool:
        outcomes = list(pool.map(lambda how: hang_up(chat, how), hows))
    assert all(o.startswith("hung up") for o in outcomes), outcomes
    assert server.proc.poll() is None, server.log()

    def idle() -> bool:
        return (gauge(server.base_url, "vllm:num_requests_running") == 0
                and gauge(server.base_url, "vllm:num_requests_waiting") == 0)

    wait_until(idle, 10, "no request running or waiting after the hang-ups", server.proc)

    def ask(_: int) -> float:
        started = time.monotonic()
        r = httpx.post(chat, timeout=120, json={"messages": MESSAGES, "max_tokens": 8})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"]
        return time.monotonic() - started

    # Every engine slot must be free: one left decoding would hold a request here.
    with ThreadPoolExecutor(SLOTS) as pool:
        latencies = list(pool.map(ask, range(SLOTS)))
    assert max(latencies) < 10, latencies
    assert idle()
