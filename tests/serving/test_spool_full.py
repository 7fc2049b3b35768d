"""The disk under the store and the spool fills up while the server takes traffic.

`clinicloop serve` runs in a private mount namespace (`unshare`) on a 4 MiB tmpfs that holds its
SQLite store and its spool; once the server is up the test fills that disk, so inserts fail with
SQLite's "database or disk is full" and spool appends with ENOSPC: a real full disk, gone with the
server's namespace. While it is full the server keeps answering (no crash, /health 200), the
writer logs an error naming the cause (ENOSPC), and every turn is accounted for: stored once
space is freed, or counted on /metrics as dropped (`clinicloop:log_records_dropped`), none set
aside as a bad record and none vanished."""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, free_port, stop_server, wait_until

DISK = "4m"
DURING = 12  # requests while the disk is full
NOTE = "My knee has been swollen since I fell last week. " * 20  # ~1 kB a turn


def unshare_prefix() -> list[str]:
    """`unshare` into a private mount namespace (mapping us to root when we are not)."""
    if shutil.which("unshare") is None:
        pytest.skip("no `unshare` (util-linux) to mount a small tmpfs in")
    prefix = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        prefix.append("--map-root-user")
    probe = subprocess.run([*prefix, "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", "/mnt"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a mount namespace here: {probe.stderr.strip()}")
    return prefix


@pytest.fixture
def full_disk_server(tmp_path: Path, tiny_model) -> Iterator[tuple[Server, Path]]:
    """A server whose store and spool live on a small tmpfs; yields it and that disk's path as
    this process sees it (through /proc/<pid>/root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    port = free_port()
    env = {
        **os.environ,
        "CLINICLOOP_ENGINE__MODEL_PATH": str(tiny_model.gguf_q8_0),
        "CLINICLOOP_ENGINE__SERVED_MODEL_NAME": tiny_model.name,
        "CLINICLOOP_STORE__URL": f"sqlite:///{disk / 'clinicloop.db'}",
        "CLINICLOOP_STORE__SPOOL_PATH": str(disk / "spool.jsonl"),
        "CLINICLOOP_STORE__RETRY_INTERVAL_S": "0.2",
        "CLINICLOOP_REGISTRY__DIR": str(tmp_path / "registry"),
        "CLINICLOOP_MODELS_DIR": str(tmp_path / "models"),
    }
    log_path = tmp_path / "server.log"
    mount_then_serve = 'mount -t tmpfs -o size="$1" tmpfs "$2" && shift 2 && exec "$@"'
    proc = subprocess.Popen(
        [*unshare_prefix(), "sh", "-c", mount_then_serve, "sh", DISK, str(disk),
         sys.executable, "-m", "clinicloop.cli", "serve", "--port", str(port)],
        env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT, cwd=tmp_path,
        start_new_session=True,
    )
    server = Server(f"http://127.0.0.1:{port}", proc, log_path, disk / "clinicloop.db")
    try:
        wait_until(lambda: httpx.get(server.base_url + "/health").status_code == 200, 120,
                   f"server on a tmpfs (log: {log_path})", proc)
        yield server, Path(f"/proc/{proc.pid}/root{disk}")
    finally:
        stop_server(server)


def fill(disk: Path) -> int:
    """Write a file until the disk refuses more; its size."""
    written = 0
    block = b"\0" * 65536
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                written += f.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return written


def counter(base_url: str, name: str) -> float:
    for line in httpx.get(base_url + "/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not on /metrics")


def test_spool_disk_full_is_an_error_not_a_crash_and_every_turn_is_accounted_for(
        full_disk_server, tmp_path):
    server, disk = full_disk_server
    chat = server.v1 + "/chat/completions"

    def ask(i: int) -> int:
        r = httpx.post(chat, timeout=120, json={
            "messages": [{"role": "user", "content": f"{NOTE} (turn {i})"}], "max_tokens": 16})
        if r.status_code != 200:  # acknowledging a turn may fail; it must say so, OpenAI-shaped
            assert set(r.json()["error"]) >= {"message", "type", "param", "code"}, r.text
        return r.status_code

    assert ask(0) == 200
    wait_until(lambda: counter(server.base_url, "clinicloop:log_records_inserted") == 1, 20,
               "the first turn stored")

    assert fill(disk) > 0
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(ask, range(1, DURING + 1)))
    assert server.proc.poll() is None, server.log()
    assert httpx.get(server.base_url + "/health").status_code == 200
    assert statuses.count(200) > 0, statuses  # generation never depends on the disk
    errors = [line for line in server.log().splitlines()
              if "spool" in line.lower() and ("ENOSPC" in line or "No space left" in line)]
    assert errors, server.log()[-3000:]

    (disk / "filler").unlink()
    assert ask(DURING + 1) == 200
    total = DURING + 2

    def stored() -> int:
        # SQLite resolves the /proc/<pid>/root link to a host path, so it reads a copy.
        copy = tmp_path / "copy"
        copy.mkdir(exist_ok=True)
        for name in ("clinicloop.db", "clinicloop.db-wal"):
            if (disk / name).exists():
                shutil.copyfile(disk / name, copy / name)
        try:
            with sqlite3.connect(copy / "clinicloop.db") as db:
                return db.execute("select count(*) from turns").fetchone()[0]
        except sqlite3.DatabaseError:  # copied in the middle of a write: try again
            return -1

    def accounted() -> bool:
        return stored() + counter(server.base_url, "clinicloop:log_records_dropped") == total

    wait_until(accounted, 30, "every turn stored or counted as dropped", server.proc)
    # A full disk is the store being unavailable, not a bad record: nothing is set aside.
    assert counter(server.base_url, "clinicloop:log_records_dead_lettered") == 0
    assert server.proc.poll() is None
