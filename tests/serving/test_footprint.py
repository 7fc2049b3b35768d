"""What a serving process loads: a server runs llama.cpp and renders chat templates with jinja; it
has no use for torch, which would more than double its memory (about 200 MiB more) and its
start-up time. Torch is loaded by what builds or trains models, never by serving one, whether the
model is a GGUF path or the default tiny model's cached build."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import start_server, stop_server


@pytest.mark.parametrize("model", ["gguf path", "default tiny build"])
def test_a_server_never_loads_torch(tmp_path, tiny_model, model):
    env = {"CLINICLOOP_ENGINE__MODEL_PATH": str(tiny_model.gguf_q8_0)} if model == "gguf path" \
        else {}
    server = start_server(tmp_path, {**env, "CLINICLOOP_REGISTRY__DIR": str(tmp_path / "reg")})
    try:
        r = httpx.post(server.base_url + "/v1/chat/completions", timeout=60, json={
            "model": httpx.get(server.base_url + "/v1/models").json()["data"][0]["id"],
            "max_tokens": 8, "messages": [{"role": "user", "content": "I have a cough."}]})
        assert r.status_code == 200, r.text
        maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
        assert "llama" in maps  # the right process: it has llama.cpp loaded
        assert "libtorch" not in maps
    finally:
        stop_server(server)
