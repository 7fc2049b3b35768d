"""Start, health-poll and stop the servers `compare_llamacpp_server.py` measures, each on a free
127.0.0.1 port, one llama.cpp thread, the same GGUF, in its own process group:

- clinicloop: `python -m clinicloop.cli serve`, its store, spool and registry in a scratch dir;
- llama_cpp.server: llama-cpp-python's own server, with `--interrupt_requests False` (by default
  it aborts the running request whenever a new one arrives);
- llama-server: llama.cpp's C++ server (continuous batching, one slot per concurrent request),
  built once by `make llama-server` and found through `$LLAMA_SERVER_BIN` or the shared cache.

Every server runs in its own scratch directory, so paths are resolved first. A peer that cannot
start is reported as skipped with the reason; only clinicloop is required.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

LLAMA_CPP_PYTHON = "0.3.36"
LLAMA_SERVER_CACHE = (Path.home() / ".cache" / "clinicloop" / "bin"
                      / f"llama-server-{LLAMA_CPP_PYTHON}")
BUILD_HINT = "build it once with `make llama-server` (about 10 minutes on 2 cores)"
ROOT = Path(__file__).resolve().parents[1]


def bench_gguf(gguf: Path | None, progress: bool) -> Path:
    """The GGUF the servers share: `gguf` if given, else the `bench` tiny model's q8_0 (built
    once under var/models)."""
    if gguf is None:
        from clinicloop.model.tiny_train import build_tiny

        gguf = build_tiny("bench", out_root=ROOT / "var" / "models", progress=progress).gguf_q8_0
    return gguf.resolve()


@dataclass(frozen=True)
class PeerSpec:
    """How to launch one server; `command` and `health_path` are filled in with the port."""

    name: str
    command: list[str]
    env: dict[str, str]
    health_path: str
    # vLLM's `ignore_eos`; a server that silently drops it may stop at end-of-sequence.
    accepts_ignore_eos: bool

    @property
    def dirname(self) -> str:
        """The name as a file-name part (`clinicloop+draft` -> `clinicloop_draft`)."""
        return self.name.replace("+", "_")

    def command_for(self, port: int) -> list[str]:
        return [arg.replace("{port}", str(port)) for arg in self.command]


@dataclass
class Peer:
    spec: PeerSpec
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def command(self) -> list[str]:
        return self.spec.command_for(self.port)

    @property
    def v1(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log_tail(self, n_chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-n_chars:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server_bin() -> tuple[Path | None, str]:
    """The llama-server binary and, where there is none, why."""
    env = os.environ.get("LLAMA_SERVER_BIN")
    path = Path(env) if env else LLAMA_SERVER_CACHE
    if path.is_file() and os.access(path, os.X_OK):
        return path, ""
    where = f"$LLAMA_SERVER_BIN={env}" if env else str(LLAMA_SERVER_CACHE)
    return None, f"llama-server not found at {where}: {BUILD_HINT}"


def clinicloop_spec(gguf: Path, workdir: Path, n_ctx: int, slots: int,
                    extra_env: dict[str, str]) -> PeerSpec:
    # Inherited CLINICLOOP_* settings (or a CLINICLOOP_CONFIG file) would make runs differ by
    # shell; overrides go through `extra_env` so they are recorded with the results.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLINICLOOP_")}
    env.update({
        "CLINICLOOP_ENGINE__MODEL_PATH": str(gguf.resolve()),
        "CLINICLOOP_ENGINE__N_THREADS": "1",
        "CLINICLOOP_ENGINE__N_CTX": str(n_ctx),
        "CLINICLOOP_ENGINE__N_PARALLEL": str(slots),
        "CLINICLOOP_STORE__URL": f"sqlite:///{workdir / 'clinicloop.db'}",
        "CLINICLOOP_STORE__SPOOL_PATH": str(workdir / "spool.jsonl"),
        "CLINICLOOP_REGISTRY__DIR": str(workdir / "registry"),
        "CLINICLOOP_MODELS_DIR": str(workdir / "models"),
        **extra_env,
    })
    return PeerSpec("clinicloop", [sys.executable, "-m", "clinicloop.cli", "serve",
                                   "--port", "{port}"], env, "/health", accepts_ignore_eos=True)


def llama_cpp_python_spec(gguf: Path, n_ctx: int) -> PeerSpec:
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf.resolve()),
               "--n_threads", "1", "--n_threads_batch", "1", "--n_ctx", str(n_ctx),
               "--interrupt_requests", "False", "--host", "127.0.0.1", "--port", "{port}"]
    # Its request model ignores unknown fields, so `ignore_eos` would be dropped silently.
    return PeerSpec("llama_cpp.server", command, dict(os.environ), "/v1/models",
                    accepts_ignore_eos=False)


def llama_server_spec(binary: Path, gguf: Path, n_ctx: int, slots: int,
                      extra: Sequence[str] = ()) -> PeerSpec:
    # `-c` is the whole KV cache, shared by the slots: `n_ctx` tokens each, as the others get.
    command = [str(binary), "-m", str(gguf.resolve()), "-t", "1", "-tb", "1",
               "--parallel", str(slots), "-c", str(n_ctx * slots), "--cont-batching",
               *extra, "--host", "127.0.0.1", "--port", "{port}"]
    return PeerSpec("llama-server", command, dict(os.environ), "/health", accepts_ignore_eos=True)


def stop(peer: Peer, grace_s: float = 30.0) -> None:
    if peer.proc.poll() is None:
        os.killpg(peer.proc.pid, signal.SIGTERM)
        try:
            peer.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(peer.proc.pid, signal.SIGKILL)
            peer.proc.wait()


def start(spec: PeerSpec, workdir: Path, log_dir: Path, deadline_s: float = 180.0) -> Peer:
    """Launch `spec` and return once its health endpoint answers 200; raise RuntimeError with the
    log's tail if it exits or misses the deadline (the process is stopped first)."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{spec.dirname}-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(spec.command_for(port), env=spec.env, cwd=workdir, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    peer = Peer(spec, port, proc, log_path)
    url = f"http://127.0.0.1:{port}{spec.health_path}"
    end = time.monotonic() + deadline_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{spec.name} exited with {proc.returncode} while starting "
                               f"(log: {log_path})\n{peer.log_tail()}")
        try:
            if httpx.get(url, timeout=5.0).status_code == 200:
                return peer
        except httpx.HTTPError:
            pass  # not listening yet
        if time.monotonic() > end:
            stop(peer)
            raise RuntimeError(f"{spec.name} not healthy after {deadline_s:.0f}s "
                               f"(log: {log_path})\n{peer.log_tail()}")
        time.sleep(0.1)
