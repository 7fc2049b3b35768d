"""`clinicloop serve` that cannot serve exits at start-up: one line on stderr saying why, a non-zero
exit, and nothing it launched left running (the supervised upstream's process group is gone)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from clinicloop.backends.registry import Registry
from tests.conftest import ROOT, free_port, group_gone


def serve(tmp: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`clinicloop serve` in `tmp` (its registry under var/registry) until it exits by itself."""
    full_env = {**os.environ, "CLINICLOOP_STORE__URL": f"sqlite:///{tmp / 'clinicloop.db'}",
                "CLINICLOOP_STORE__SPOOL_PATH": str(tmp / "spool.jsonl"),
                "CLINICLOOP_MODELS_DIR": str(ROOT / "var" / "models"), **env}
    return subprocess.run(
        [sys.executable, "-m", "clinicloop.cli", "serve", *args, "--port", str(free_port())],
        env=full_env, cwd=tmp, capture_output=True, text=True, timeout=180)


def last_line(done: subprocess.CompletedProcess[str]) -> str:
    return done.stderr.strip().splitlines()[-1]


def test_a_missing_model_file_stops_the_server(tmp_path):
    missing = tmp_path / "missing.gguf"
    done = serve(tmp_path, {"CLINICLOOP_ENGINE__MODEL_PATH": str(missing)})
    assert done.returncode == 1, done.stderr
    assert last_line(done).startswith("clinicloop serve: the engine could not start: ")
    assert "missing.gguf" in last_line(done)


def test_a_registry_made_for_another_engine_stops_the_server(tmp_path, tiny_model):
    Registry(tmp_path / "var" / "registry").bootstrap("openai", Path("Qwen/Qwen2.5-32B"), "qwen")
    done = serve(tmp_path, {"CLINICLOOP_ENGINE__MODEL_PATH": str(tiny_model.gguf_q8_0)})
    assert done.returncode == 1, done.stderr
    assert last_line(done) == (
        "clinicloop serve: the engine could not start: VersionLoadError: version 'base' failed "
        "to load: RegistryError: a `openai` version cannot be served by the llamacpp engine")


def test_a_launched_upstream_is_stopped_when_the_registry_is_for_another_model(tmp_path,
                                                                               tiny_model):
    Registry(tmp_path / "var" / "registry").bootstrap("llamacpp", tiny_model.gguf_q8_0,
                                                       tiny_model.name)
    port = free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(tiny_model.gguf_q8_0),
               "--host", "127.0.0.1", "--port", str(port), "--n_threads", "1", "--n_ctx", "512"]
    done = serve(tmp_path, {"CLINICLOOP_ENGINE__KIND": "openai",
                            "CLINICLOOP_ENGINE__UPSTREAM_URL": f"http://127.0.0.1:{port}/v1",
                            "CLINICLOOP_ENGINE__UPSTREAM_COMMAND": json.dumps(command)})
    assert done.returncode == 1, done.stderr
    assert last_line(done).startswith("clinicloop serve: the engine could not start: "
                                      "RegistryError: the registry in ")
    assert last_line(done).endswith("move the registry away to start over")
    (pid,) = re.findall(r"upstream launched \(pid (\d+)\)", done.stderr)
    assert group_gone(int(pid))


@pytest.mark.parametrize("launcher, why", [
    (["/nonexistent/bin/vllm", "serve", "{model}"],
     "clinicloop serve: engine.vllm_launcher: '/nonexistent/bin/vllm' is not a program on this "
     "machine"),
    ([sys.executable, "-c", "import sys; print('vllm: no GPU found'); sys.exit(3)", "{model}"],
     "clinicloop serve: the engine could not start: UpstreamStartError: upstream exited with "
     "code 3 before answering: vllm: no GPU found (log: var/logs/upstream.log)"),
])
def test_vllm_that_cannot_start_stops_the_server(tmp_path, tiny_model, launcher, why):
    done = serve(tmp_path, {"CLINICLOOP_ENGINE__VLLM_LAUNCHER": json.dumps(launcher),
                            "CLINICLOOP_ENGINE__VLLM_MODEL": str(tiny_model.hf_dir)},
                 "--engine", "vllm", "--profile", "cpu")
    assert done.returncode == 1, done.stderr
    assert last_line(done).startswith(why), last_line(done)
    for pid in re.findall(r"upstream launched \(pid (\d+)\)", done.stderr):
        assert group_gone(int(pid))
