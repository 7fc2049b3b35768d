"""What the gateway owns beyond the protocol: keys, limits, cancellation, health, metrics and the
conversation log — each against a real server."""

from __future__ import annotations

import json
import socket
import sqlite3
from collections.abc import Iterator

import httpx
import openai
import pytest

from clinicloop.serving.auth import NO_ADMIN_KEY, KeyRing, hash_key
from tests.conftest import wait_until
from tests.serving import scripted_upstream

CLIENT_KEY, ADMIN_KEY = "sk-test-client", "sk-test-admin"
MESSAGES = [{"role": "user", "content": "My name is John Carter, call me at 555-867-5309. "
             "I have chest pain."}]


def _rows(server, sql="select conversation_id, status, messages, response, model_version, "
                      "prompt_tokens, completion_tokens, api_key_id, e2e_s from turns"):
    with sqlite3.connect(server.db_path) as db:
        return db.execute(sql).fetchall()


@pytest.fixture(scope="module")
def keyed(server_factory):
    return server_factory({
        "CLINICLOOP_SERVER__API_KEYS": f'["{hash_key(CLIENT_KEY)}"]',
        "CLINICLOOP_SERVER__ADMIN_KEYS": f'["{ADMIN_KEY}"]',
        "CLINICLOOP_SERVER__MAX_RUNNING": "1",
        "CLINICLOOP_SERVER__MAX_WAITING": "0",
        "CLINICLOOP_SERVER__MAX_BODY_BYTES": "4096",
    })


def _chat(server, key, **body):
    return httpx.post(server.v1 + "/chat/completions", timeout=60,
                      headers={"authorization": f"Bearer {key}"} if key else {},
                      json={"messages": MESSAGES, "max_tokens": 8, **body})


def test_keys(keyed):
    assert _chat(keyed, None).status_code == 401
    assert _chat(keyed, "sk-wrong").status_code == 401
    assert _chat(keyed, CLIENT_KEY).status_code == 200
    assert _chat(keyed, ADMIN_KEY).status_code == 200
    stats = httpx.get(keyed.base_url + "/admin/v1/stats",
                      headers={"authorization": f"Bearer {CLIENT_KEY}"})
    assert stats.status_code == 403 and stats.json()["error"]["type"] == "permission_error"
    stats = httpx.get(keyed.base_url + "/admin/v1/stats",
                      headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert stats.status_code == 200 and stats.json()["model"]
    client = openai.OpenAI(base_url=keyed.v1, api_key=CLIENT_KEY, max_retries=0)
    assert client.models.list().data


def test_open_server_only_on_loopback():
    ring = KeyRing([], [])
    ring.check_open_allowed("127.0.0.1")
    ring.check_open_allowed("::1")
    with pytest.raises(SystemExit):
        ring.check_open_allowed("0.0.0.0")
    KeyRing(["k"], []).check_open_allowed("0.0.0.0")


def test_body_over_limit_is_413(keyed):
    r = _chat(keyed, CLIENT_KEY, messages=[{"role": "user", "content": "x" * 5000}])
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_chunked_body_over_limit_is_413(keyed):
    """A body that does not declare its length is counted as it arrives."""
    def chunks() -> Iterator[bytes]:
        yield b'{"messages": [{"role": "user", "content": "'
        yield from (b"x" * 1000 for _ in range(6))
        yield b'"}]}'

    r = httpx.post(keyed.v1 + "/chat/completions", content=chunks(), timeout=30,
                   headers={"authorization": f"Bearer {CLIENT_KEY}",
                            "content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def _first_response(server, head: str, body: bytes) -> str:
    """Send a request head and only the start of its body; what the server answers meanwhile."""
    port = int(server.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(head.encode() + body)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < int(
                answer.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0]):
            answer += conn.recv(65536)
        return answer.decode(errors="replace")


@pytest.mark.parametrize(("path", "key", "status"), [
    ("/v1/chat/completions", None, 401),
    ("/v1/chat/completions", "sk-wrong", 401),
    ("/admin/v1/versions", None, 401),
    ("/admin/v1/versions", CLIENT_KEY, 403),
    ("/tokenize", None, 401),
    ("/detokenize", "sk-wrong", 401),
])
@pytest.mark.parametrize("declared", [3000, 1 << 20])
def test_keys_are_checked_before_the_body_is_read(keyed, path, key, status, declared):
    """The body is announced (within and over the limit) but never sent: the refusal comes at
    once, without waiting for a byte of it, and before the body limit is looked at."""
    auth = f"authorization: Bearer {key}\r\n" if key else ""
    head = (f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{auth}"
            f"content-length: {declared}\r\n\r\n")
    answer = _first_response(keyed, head, b'{"messages": [')
    assert answer.startswith(f"HTTP/1.1 {status} "), answer[:200]
    error = json.loads(answer.split("\r\n\r\n", 1)[1])["error"]
    assert error["type"] == ("authentication_error" if status == 401 else "permission_error")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/health"])
def test_cors_is_closed_by_default(keyed, path):
    r = httpx.options(keyed.base_url + path, headers={
        "origin": "https://evil.example", "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type"})
    assert r.status_code >= 400
    assert not any(h.startswith("access-control-") for h in r.headers)


def test_full_queue_is_429_with_retry_after_and_disconnect_cancels(keyed):
    """One slot, no waiting room: while a stream holds the slot a second request gets 429. The
    stream's client then disconnects, which must free the slot at once (generation cancelled)."""
    headers = {"authorization": f"Bearer {CLIENT_KEY}"}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", keyed.v1 + "/chat/completions", headers=headers, json={
            # A schema no reply of max_tokens can finish keeps the model generating.
            "messages": MESSAGES, "max_tokens": 1800, "stream": True,
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "long", "schema": {"type": "string", "minLength": 8000}}},
        }) as stream:
            # Keep the iterator open: closing it closes the response, i.e. disconnects.
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
            busy = _chat(keyed, CLIENT_KEY)
            assert busy.status_code == 429
            assert busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["type"] == "rate_limit_error"
            lines.close()
    wait_until(lambda: _chat(keyed, CLIENT_KEY).status_code == 200, 30, "slot freed")
    wait_until(lambda: any(r[1] == "cancelled" for r in _rows(keyed)), 10, "cancel logged")
    cancelled = [r for r in _rows(keyed) if r[1] == "cancelled"]
    assert 0 < cancelled[0][6] < 1800


def test_requests_are_logged_redacted_with_version_tokens_and_key(keyed):
    before = len(_rows(keyed))
    r = _chat(keyed, CLIENT_KEY, temperature=0)
    assert r.status_code == 200
    wait_until(lambda: len(_rows(keyed)) > before, 10, "record written")
    conv, status, messages, response, version, p_tok, c_tok, key_id, e2e = _rows(keyed)[-1]
    assert status == "ok" and conv.startswith("conv-") and version
    assert p_tok == r.json()["usage"]["prompt_tokens"] and c_tok > 0 and e2e > 0
    assert key_id == hash_key(CLIENT_KEY)[7:19]
    assert "John" not in messages and "555-867-5309" not in messages
    assert "chest pain" in messages
    # Later turns of the same conversation share its id.
    follow = MESSAGES + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "?"}]
    _chat(keyed, CLIENT_KEY, messages=follow)
    wait_until(lambda: len(_rows(keyed)) > before + 1, 10, "second record")
    assert _rows(keyed)[-1][0] == conv
    assert "555-867-5309" not in keyed.log() and "John Carter" not in keyed.log()


def test_health_and_metrics(keyed):
    assert httpx.get(keyed.base_url + "/health").json()["status"] == "ok"
    text = httpx.get(keyed.base_url + "/metrics").text
    for name in ("vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds",
                 "vllm:e2e_request_latency_seconds", "vllm:num_requests_running",
                 "vllm:num_requests_waiting", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "clinicloop:log_store_up"):
        assert name in text, name


def test_request_deadline(server_factory):
    server = server_factory({"CLINICLOOP_SERVER__REQUEST_TIMEOUT_S": "0.3"})
    body = {"messages": MESSAGES, "max_tokens": 1800, "response_format": {
        "type": "json_schema", "json_schema": {"name": "long", "schema": {
            "type": "string", "minLength": 8000}}}}
    r = httpx.post(server.v1 + "/chat/completions", json=body, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "timeout"
    with httpx.stream("POST", server.v1 + "/chat/completions", json={**body, "stream": True},
                      timeout=30) as s:
        lines = [line for line in s.iter_lines() if line]
    assert '"code":"timeout"' in lines[-2] and lines[-1] == "data: [DONE]"
    assert httpx.post(server.v1 + "/chat/completions", timeout=30,
                      json={"messages": MESSAGES, "max_tokens": 4}).status_code == 200


@pytest.fixture(scope="module")
def over_scripted(server_factory) -> Iterator:
    """A gateway (client key only, no admin key) in front of the scripted failing upstream."""
    with scripted_upstream.running() as url:
        yield server_factory({"CLINICLOOP_ENGINE__KIND": "openai",
                              "CLINICLOOP_ENGINE__UPSTREAM_URL": url,
                              "CLINICLOOP_SERVER__API_KEYS": f'["{CLIENT_KEY}"]'})


UPSTREAM_FAILURES = {  # scenario: the status a non-streamed request gets
    "error_chunk": 502, "error_first": 502, "finish:abort": 502, "finish:eos_token": 502,
    "bad_json": 502, "bad_delta": 502, "bad_choice": 502, "drop": 503, "no_done": 503,
    "http_500": 503,
}
# These fail before the first token, so a streamed request gets the HTTP error, as OpenAI's do.
BEFORE_THE_FIRST_TOKEN = {"error_first", "http_500"}


@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
@pytest.mark.parametrize("scenario", sorted(UPSTREAM_FAILURES))
def test_an_upstream_failure_ends_the_stream_with_an_error_then_done(over_scripted, scenario,
                                                                    endpoint):
    """Streamed: the chunks so far, an error event, `[DONE]`. Not streamed (or failed before the
    first token): a 502/503 in OpenAI's shape naming the upstream. Then the server goes on
    serving."""
    def body(text: str) -> dict:
        return ({"messages": [{"role": "user", "content": text}]}
                if endpoint == "chat/completions" else {"prompt": text})

    failing = body(f"I have a cough. @@{scenario}@@")
    headers = {"authorization": f"Bearer {CLIENT_KEY}"}
    url = f"{over_scripted.v1}/{endpoint}"
    with httpx.stream("POST", url, json={**failing, "stream": True}, headers=headers,
                      timeout=30) as resp:
        events = [line[5:].strip() for line in resp.iter_lines() if line.startswith("data:")]
    if scenario in BEFORE_THE_FIRST_TOKEN:
        assert resp.status_code == UPSTREAM_FAILURES[scenario] and not events
    else:
        assert resp.status_code == 200 and events[-1] == "[DONE]", events
        error = json.loads(events[-2])["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert "upstream" in error["message"]
        assert not any(c["choices"][0].get("finish_reason")
                       for c in map(json.loads, events[:-2]) if c.get("choices"))

    whole = httpx.post(url, json=failing, headers=headers, timeout=30)
    assert whole.status_code == UPSTREAM_FAILURES[scenario], whole.text
    assert set(whole.json()["error"]) == {"message", "type", "param", "code"}
    assert "upstream" in whole.json()["error"]["message"]
    assert httpx.post(url, json=body("hi"), headers=headers, timeout=30).status_code == 200


@pytest.mark.parametrize("reason", ["tool_calls", "content_filter", "length"])
def test_finish_reasons_openai_knows_pass_through(over_scripted, reason):
    client = openai.OpenAI(base_url=over_scripted.v1, api_key=CLIENT_KEY, max_retries=0)
    messages = [{"role": "user", "content": f"@@finish:{reason}@@"}]
    model = client.models.list().data[0].id  # the served name, not the upstream's
    full = client.chat.completions.create(model=model, messages=messages)
    assert full.choices[0].finish_reason == reason
    chunks = list(client.chat.completions.create(model=model, messages=messages, stream=True))
    assert chunks[-1].choices[0].finish_reason == reason


def test_admin_routes_without_an_admin_key_configured_say_so(over_scripted):
    for key in (CLIENT_KEY, None):
        r = httpx.get(over_scripted.base_url + "/admin/v1/stats",
                      headers={"authorization": f"Bearer {key}"} if key else {})
        assert r.status_code == 403 and r.json()["error"]["message"] == NO_ADMIN_KEY
