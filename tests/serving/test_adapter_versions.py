"""Versions that differ by a LoRA share one base in a real server (bench model, llama.cpp): a
canary of an adapter version adds its adapter and KV cache to the process, not a second copy of
the weights; routing, canary, rollback and logging behave as for whole-model versions."""

from __future__ import annotations

import httpx

from clinicloop.serving.versions import canary_bucket
from tests.conftest import start_server, stop_server, stored_conversation_id, wait_until

CLIENT_KEY, ADMIN_KEY = "sk-lora-client", "sk-lora-admin"
MiB = 1 << 20
# Per context llama.cpp also allocates compute buffers (about 5 MiB at n_batch 512) and the
# decode thread its stack: what a version may add beyond its adapter and KV cache.
CONTEXT_SLACK = 16 * MiB


def _admin(server, method: str, path: str, **kwargs) -> httpx.Response:
    r = httpx.request(method, server.base_url + "/admin/v1" + path, timeout=120,
                      headers={"authorization": f"Bearer {ADMIN_KEY}"}, **kwargs)
    assert r.status_code < 300, r.text
    return r


def _chat(server, conversation: str) -> str:
    r = httpx.post(server.v1 + "/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "I have a headache and a fever."}],
        "max_tokens": 8, "temperature": 0},
        headers={"authorization": f"Bearer {CLIENT_KEY}", "x-conversation-id": conversation})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_a_canary_of_an_adapter_version_shares_the_base(tmp_path, bench, bench_lora):
    base_gguf = bench.gguf_f16
    server = start_server(tmp_path, {
        "CLINICLOOP_ENGINE__MODEL_PATH": str(base_gguf),
        "CLINICLOOP_ENGINE__N_CTX": "512", "CLINICLOOP_ENGINE__PREFIX_CACHE_SLOTS": "0",
        "CLINICLOOP_SERVER__API_KEYS": f'["{CLIENT_KEY}"]',
        "CLINICLOOP_SERVER__ADMIN_KEYS": f'["{ADMIN_KEY}"]'})
    try:
        # A version is the served base plus the adapter; the server records its own kind.
        v1 = _admin(server, "POST", "/versions", json={
            "id": "v1", "parent": "base", "model_path": str(base_gguf),
            "lora_path": str(bench_lora.gguf), "adapter_dir": str(bench_lora.adapter_dir)}).json()
        assert v1["backend"] == "llamacpp" and v1["lora_path"] == str(bench_lora.gguf)
        before = _admin(server, "GET", "/versions").json()["memory"]
        assert list(before["versions"]) == ["base"]

        listing = _admin(server, "POST", "/canary", json={"version": "v1", "share": 0.5}).json()
        memory = listing["memory"]
        assert sorted(memory["versions"]) == ["base", "v1"]
        assert list(memory["bases"]) == [str(base_gguf.resolve())]  # one base in memory
        added = memory["rss_bytes"] - before["rss_bytes"]
        own = memory["versions"]["v1"]
        assert own["adapter_bytes"] == bench_lora.gguf.stat().st_size
        assert 0 < added <= own["adapter_bytes"] + own["kv_cache_bytes"] + CONTEXT_SLACK
        assert added < base_gguf.stat().st_size  # a second copy of the weights would not fit

        # Each conversation is served by the version its bucket names, and logged under it.
        names = [f"lora-{i}" for i in range(40)]
        on_canary = next(n for n in names if canary_bucket(
            stored_conversation_id(CLIENT_KEY, n)) < 0.5)
        on_base = next(n for n in names if canary_bucket(
            stored_conversation_id(CLIENT_KEY, n)) >= 0.5)
        served = {name: _chat(server, name) for name in (on_canary, on_base)}
        wait_until(lambda: _logged(server, served[on_base]) is not None, 15, "log rows")
        assert _logged(server, served[on_canary]) == "v1"
        assert _logged(server, served[on_base]) == "base"

        _admin(server, "POST", "/versions/v1/activate")
        assert _logged(server, _chat(server, "after-activate")) == "v1"
        listing = _admin(server, "POST", "/rollback").json()
        assert listing["active"] == "base"
        # v1 is retired once idle; the base it shared stays loaded for the active version.
        wait_until(lambda: sorted(_admin(server, "GET", "/versions").json()["memory"]["versions"])
                   == ["base"], 15, "v1 unloaded")
        assert _logged(server, _chat(server, "after-rollback")) == "base"
    finally:
        stop_server(server)


def _logged(server, response_id: str) -> str | None:
    import sqlite3

    def row() -> str | None:
        with sqlite3.connect(server.db_path) as db:
            found = db.execute("select model_version from turns where id = ?",
                               (response_id,)).fetchone()
        return None if found is None else found[0]

    wait_until(lambda: row() is not None, 15, f"log row {response_id}")
    return row()
