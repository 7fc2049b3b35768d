"""Model versions in a real server on two genuinely different tiny GGUFs (q8_0 as `base`, f16 as
`v1`): a swap under a stream of requests, refused loads, canary split, rollback and admin auth."""

from __future__ import annotations

import os
import sqlite3
import threading
import time

import httpx
import pytest

from clinicloop.backends.registry import Registry
from clinicloop.serving.versions import canary_bucket
from tests.conftest import stored_conversation_id, wait_until

CLIENT_KEY, ADMIN_KEY = "sk-swap-client", "sk-swap-admin"
KEYS = {"CLINICLOOP_SERVER__API_KEYS": f'["{CLIENT_KEY}"]',
        "CLINICLOOP_SERVER__ADMIN_KEYS": f'["{ADMIN_KEY}"]'}
# The server checks the registry file every second; loading a tiny version takes well under one.
FOLLOW_BOUND_S = 5.0
# A schema no reply within max_tokens can finish keeps the model generating for a while.
LONG = {"max_tokens": 1200, "response_format": {"type": "json_schema", "json_schema": {
    "name": "long", "schema": {"type": "string", "minLength": 8000}}}}


def _admin(server, method: str, path: str, key: str | None = ADMIN_KEY, **kwargs):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, server.base_url + "/admin/v1" + path, headers=headers,
                         timeout=60, **kwargs)


# The store keeps a hash of the caller's key and the conversation's name: back to the names.
_NAMES: dict[str, str] = {}


def _stored(conversation: str) -> str:
    stored = stored_conversation_id(CLIENT_KEY, conversation)
    _NAMES[stored] = conversation
    return stored


def _headers(conversation: str) -> dict[str, str]:
    _stored(conversation)
    return {"authorization": f"Bearer {CLIENT_KEY}", "x-conversation-id": conversation}


def _chat(server, conversation: str, *, stream: bool = False, turn: int = 1,
          **body) -> httpx.Response | list[str]:
    """One turn of `conversation`; a stream comes back as its SSE lines."""
    request = {"messages": [{"role": "user", "content": f"Turn {turn}: I have a headache."}],
               "max_tokens": 16, "stream": stream, **body}
    headers = _headers(conversation)
    if not stream:
        return httpx.post(server.v1 + "/chat/completions", json=request, headers=headers,
                          timeout=60)
    with httpx.stream("POST", server.v1 + "/chat/completions", json=request, headers=headers,
                      timeout=60) as response:
        return [line for line in response.iter_lines() if line]


def _ok(result: httpx.Response | list[str]) -> bool:
    if isinstance(result, list):
        return result[-1] == "data: [DONE]" and not any('"error"' in x for x in result)
    return result.status_code == 200 and bool(result.json()["choices"])


def _logged(server) -> list[tuple[str, str, str]]:
    with sqlite3.connect(server.db_path) as db:
        return db.execute("select conversation_id, model_version, status from turns "
                          "order by created_at").fetchall()


def _versions_by_conversation(server, expected: int) -> dict[str, list[str]]:
    wait_until(lambda: len(_logged(server)) >= expected, 15, f"{expected} records")
    out: dict[str, list[str]] = {}
    for conversation, version, status in _logged(server):
        assert status == "ok", (conversation, version, status)
        out.setdefault(_NAMES.get(conversation, conversation), []).append(version)
    return out


@pytest.fixture
def server(server_factory, tiny_model):
    """A fresh server (own registry) with the f16 GGUF registered as `v1` on top of `base`."""
    server = server_factory(KEYS)
    r = _admin(server, "POST", "/versions", json={
        "id": "v1", "parent": "base", "model_path": str(tiny_model.gguf_f16),
        "metrics": {"held_out_score": 0.5}})
    assert r.status_code == 201, r.text
    return server


def test_swap_under_load_drops_nothing_and_logs_the_serving_version(server, tiny_model):
    results: list[tuple[str, float, float, bool]] = []  # conversation, sent, done, ok
    stop = threading.Event()

    def client(k: int) -> None:
        i = 0
        while not stop.is_set():
            # Alternate a conversation that lasts the whole test with fresh ones.
            conversation = f"long-{k}" if i % 2 == 0 else f"new-{k}-{i}"
            sent = time.monotonic()
            try:
                ok = _ok(_chat(server, conversation, stream=(i + k) % 2 == 0, turn=i))
            except httpx.HTTPError:
                ok = False
            results.append((conversation, sent, time.monotonic(), ok))
            i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: len(results) >= 12, 30, "traffic before the swap")
    # One long generation is in flight on `base` while the swap happens.
    headers = _headers("in-flight")
    with httpx.stream("POST", server.v1 + "/chat/completions", headers=headers, timeout=60, json={
            "messages": [{"role": "user", "content": "Long answer please."}], "stream": True,
            **LONG}) as in_flight:
        lines = in_flight.iter_lines()
        assert next(lines).startswith("data: ")
        swap_started = time.monotonic()
        r = _admin(server, "POST", "/versions/v1/activate")
        swap_done = time.monotonic()
        assert r.status_code == 200, r.text
        assert r.json()["active"] == "v1"
        assert {v["id"] for v in r.json()["loaded"]} == {"base", "v1"}
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]" and not any('"error"' in x for x in rest)
    wait_until(lambda: sum(sent > swap_done for _, sent, _, _ in results) >= 12, 30,
               "traffic after the swap")
    stop.set()
    for t in threads:
        t.join(60)

    assert results and all(ok for *_, ok in results), [r for r in results if not r[3]]
    loaded = _admin(server, "GET", "/versions").json()["loaded"]
    assert loaded == [{"id": "base", "in_flight": 0}, {"id": "v1", "in_flight": 0}]
    served = _versions_by_conversation(server, len(results) + 1)
    assert served["in-flight"] == ["base"]
    for k in range(4):  # begun before the swap, continued after it: still on base
        assert set(served[f"long-{k}"]) == {"base"} and len(served[f"long-{k}"]) >= 2
    before = [c for c, sent, done, _ in results if c.startswith("new-") and done < swap_started]
    after = [c for c, sent, done, _ in results if c.startswith("new-") and sent > swap_done]
    assert before and after
    assert all(served[c] == ["base"] for c in before)
    assert all(served[c] == ["v1"] for c in after)
    # /v1/models: the served model first, then the version with its parent.
    models = httpx.get(server.v1 + "/models",
                       headers={"authorization": f"Bearer {CLIENT_KEY}"}).json()["data"]
    assert [(m["id"], m["parent"]) for m in models] == [
        (tiny_model.name, None), (f"{tiny_model.name}@v1", tiny_model.name)]
    assert models[1]["root"] == str(tiny_model.gguf_f16.resolve())


def test_corrupt_or_foreign_files_are_refused_and_the_active_one_keeps_serving(
        server, tmp_path, tiny_model):
    model = tiny_model.gguf_q8_0.read_bytes()
    (tmp_path / "truncated.gguf").write_bytes(model[: len(model) // 2])
    (tmp_path / "random.gguf").write_bytes(b"\x00" + os.urandom(4095))
    (tmp_path / "directory.gguf").mkdir()
    (tmp_path / "config.gguf").write_bytes((tiny_model.hf_dir / "config.json").read_bytes())
    (tmp_path / "zeros.gguf").write_bytes(b"GGUF" + b"\x00" * 4096)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    cases = [
        ({"model_path": "truncated.gguf"}, "llama.cpp cannot load"),
        ({"model_path": "random.gguf"}, "is not a GGUF file"),
        ({"model_path": "directory.gguf"}, "is a directory"),
        ({"model_path": "config.gguf"}, "is not a GGUF file (it begins with b'{"),
        ({"model_path": "zeros.gguf"}, "GGUF version 0"),
        ({"model_path": str(tiny_model.gguf_q8_0),
          "lora_path": str(tiny_model.gguf_f16)}, "cannot apply the LoRA"),
        ({"backend": "vllm", "model_path": "tiny", "lora_path": "adapter"},
         "adapter_config.json is not JSON"),
    ]
    for body, why in cases:
        body = {"parent": "v1", **body}
        for key in ("model_path", "lora_path"):
            if key in body and "/" not in body[key] and body[key] != "tiny":
                body[key] = str(tmp_path / body[key])
        r = _admin(server, "POST", "/versions", json=body)
        error = r.json()["error"]
        assert r.status_code == 422 and error["code"] == "invalid_version_files", (body, r.text)
        assert why in error["message"], (why, error["message"])
    # A file that goes away after registration is refused when it would start serving.
    gone = tmp_path / "gone.gguf"
    gone.write_bytes(model)
    r = _admin(server, "POST", "/versions", json={"id": "gone", "parent": "v1",
                                                  "model_path": str(gone)})
    assert r.status_code == 201, r.text
    gone.unlink()
    for method, path, body in (("POST", "/versions/gone/activate", None),
                               ("POST", "/canary", {"version": "gone", "share": 0.5})):
        r = _admin(server, method, path, json=body)
        error = r.json()["error"]
        assert r.status_code == 422 and error["code"] == "version_load_failed", r.text
        assert "version 'gone' failed to load" in error["message"]
        assert "not found" in error["message"]
    state = _admin(server, "GET", "/versions").json()
    assert state["active"] == "base" and state["canary"] is None
    assert [v["id"] for v in state["data"]] == ["base", "v1", "gone"]
    assert [v["id"] for v in state["loaded"]] == ["base"]
    assert _ok(_chat(server, "after-refusal"))
    assert _versions_by_conversation(server, 1)["after-refusal"] == ["base"]
    r = _admin(server, "POST", "/versions/nope/activate")
    assert r.status_code == 404 and r.json()["error"]["code"] == "version_not_found"


def test_a_version_is_removed_unless_it_is_in_use(server, tiny_model):
    assert _admin(server, "POST", "/canary", json={"version": "v1", "share": 1.0}).is_success
    assert _ok(_chat(server, "on-the-canary"))
    for vid, why in (("base", "is active"), ("v1", "is the canary")):
        r = _admin(server, "DELETE", f"/versions/{vid}")
        assert r.status_code == 409 and r.json()["error"]["code"] == "version_in_use", r.text
        assert why in r.json()["error"]["message"]
    assert _admin(server, "DELETE", "/canary").is_success
    r = _admin(server, "DELETE", "/versions/v1")
    assert r.status_code == 200, r.text
    assert [v["id"] for v in r.json()["data"]] == ["base"] and tiny_model.gguf_f16.exists()
    wait_until(lambda: [v["id"] for v in _admin(server, "GET", "/versions").json()["loaded"]]
               == ["base"], 10, "v1 unloaded")
    assert _ok(_chat(server, "on-the-canary", turn=2))
    assert _versions_by_conversation(server, 2)["on-the-canary"] == ["v1", "base"]
    r = _admin(server, "DELETE", "/versions/v1")
    assert r.status_code == 404 and r.json()["error"]["code"] == "version_not_found"


def test_the_server_follows_changes_another_process_makes_to_the_registry(server, tmp_path,
                                                                          tiny_model):
    """`rl refresh` without --server-url writes the registry file: the running server serves
    what it names within a bounded time, and refuses (sets back) a version that fails to load."""
    registry = Registry(server.db_path.parent / "var" / "registry")
    changed = time.monotonic()
    registry.set_canary("v1", 1.0)
    wait_until(lambda: _admin(server, "GET", "/versions").json()["canary"] == {
        "version": "v1", "share": 1.0}, FOLLOW_BOUND_S, "the canary followed")
    print(f"registry change followed in {time.monotonic() - changed:.2f}s")
    assert _ok(_chat(server, "after-the-canary"))
    registry.activate("v1")  # promoted
    wait_until(lambda: _admin(server, "GET", "/versions").json()["active"] == "v1",
               FOLLOW_BOUND_S, "the activation followed")
    assert _ok(_chat(server, "after-the-activation"))

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(tiny_model.gguf_q8_0.read_bytes())
    registry.register(parent="v1", backend="llamacpp", model_path=bad, version_id="bad")
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)
    registry.activate("bad")
    wait_until(lambda: registry.read().active == "v1", FOLLOW_BOUND_S, "the file set back")
    state = _admin(server, "GET", "/versions").json()
    assert state["active"] == "v1" and "bad" not in {v["id"] for v in state["loaded"]}
    assert [a["version"] for a in state["history"]] == ["base", "v1"]
    assert _ok(_chat(server, "after-the-refusal"))
    served = _versions_by_conversation(server, 3)
    assert served == {"after-the-canary": ["v1"], "after-the-activation": ["v1"],
                      "after-the-refusal": ["v1"]}


def test_canary_splits_new_conversations_and_keeps_each_on_its_version(server):
    r = _admin(server, "POST", "/canary", json={"version": "v1", "share": 0.5})
    assert r.status_code == 200 and r.json()["canary"] == {"version": "v1", "share": 0.5}
    conversations = [f"canary-{i}" for i in range(16)]
    expected = {c: "v1" if canary_bucket(_stored(c)) < 0.5 else "base" for c in conversations}
    assert set(expected.values()) == {"base", "v1"}
    for c in conversations:
        assert _ok(_chat(server, c))
    assert _versions_by_conversation(server, 16) == {c: [v] for c, v in expected.items()}
    # Every new conversation to the canary now; those begun keep their version.
    r = _admin(server, "POST", "/canary", json={"version": "v1", "share": 1.0})
    assert r.status_code == 200
    for c in conversations:
        assert _ok(_chat(server, c, stream=True, turn=2))
    assert _ok(_chat(server, "canary-new"))
    served = _versions_by_conversation(server, 33)
    assert served.pop("canary-new") == ["v1"]
    assert served == {c: [v, v] for c, v in expected.items()}
    # Clearing the canary moves its conversations back to the active version.
    state = _admin(server, "DELETE", "/canary").json()
    assert state["canary"] is None and state["active"] == "base"
    on_canary = next(c for c, v in expected.items() if v == "v1")
    assert _ok(_chat(server, on_canary, turn=3))
    assert _versions_by_conversation(server, 34)[on_canary] == ["v1", "v1", "base"]
    wait_until(lambda: [v["id"] for v in _admin(server, "GET", "/versions").json()["loaded"]]
               == ["base"], 10, "canary unloaded")


def test_rollback_restores_the_previous_version(server):
    assert _admin(server, "POST", "/versions/v1/activate").json()["active"] == "v1"
    assert _ok(_chat(server, "on-v1"))
    state = _admin(server, "POST", "/rollback").json()
    assert state["active"] == "base" and [a["version"] for a in state["history"]] == ["base"]
    assert _ok(_chat(server, "after-rollback"))
    assert _ok(_chat(server, "on-v1", turn=2))  # the rolled-back version serves it no more
    served = _versions_by_conversation(server, 3)
    assert served == {"on-v1": ["v1", "base"], "after-rollback": ["base"]}
    wait_until(lambda: [v["id"] for v in _admin(server, "GET", "/versions").json()["loaded"]]
               == ["base"], 10, "v1 unloaded")
    r = _admin(server, "POST", "/rollback")
    assert r.status_code == 400 and "no earlier version" in r.json()["error"]["message"]


def test_admin_routes_need_an_admin_key(server):
    routes = [("GET", "/versions", None),
              ("POST", "/versions", {"parent": "base", "model_path": "/x.gguf"}),
              ("POST", "/versions/v1/activate", None),
              ("DELETE", "/versions/v1", None),
              ("POST", "/canary", {"version": "v1", "share": 0.5}),
              ("DELETE", "/canary", None),
              ("POST", "/rollback", None)]
    for method, path, body in routes:
        for key, status in ((CLIENT_KEY, 403), (None, 401), ("sk-wrong", 401)):
            r = _admin(server, method, path, key=key, json=body)
            assert r.status_code == status, (method, path, key, r.text)
            assert r.json()["error"]["type"] in ("permission_error", "authentication_error")
    state = _admin(server, "GET", "/versions").json()
    assert state["active"] == "base" and [v["id"] for v in state["data"]] == ["base", "v1"]
