"""What the gateway owns beyond the protocol: keys, limits, cancellation, health, metrics and the
conversation log — each against a real server."""

from __future__ import annotations

import sqlite3

import httpx
import openai
import pytest

from clinicloop.serving.auth import KeyRing, hash_key
from tests.conftest import wait_until

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


def test_dead_engine_is_503(server_factory, tmp_path):
    server = server_factory({"CLINICLOOP_ENGINE__MODEL_PATH": str(tmp_path / "missing.gguf")},
                            wait_healthy=False)
    wait_until(lambda: "failed" in httpx.get(server.base_url + "/health").text, 30, "load failed")
    assert httpx.get(server.base_url + "/health").status_code == 503
    r = httpx.post(server.v1 + "/chat/completions", json={"messages": MESSAGES})
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"


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
