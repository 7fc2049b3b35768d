"""Store test fixtures: a real Postgres server (initdb in a temp dir, stopped at session end) and
log records that carry PHI."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from glob import glob
from pathlib import Path

import pytest

from clinicloop.store.records import LoggedChoice, TurnRecord
from tests.conftest import free_port

# Every record from `make_turn` contains these; none may reach the database or the spool.
PHI = ["Maria", "Lopez", "maria.lg@example.com", "555-201-4477", "03/14/1962", "00482913"]


def make_turn(i: int, conversation_id: str = "conv-1", model_version: str = "v1") -> TurnRecord:
    return TurnRecord(
        conversation_id=conversation_id,
        endpoint="chat.completions",
        model="tiny",
        model_version=model_version,
        messages=[
            {"role": "system", "content": "You are a careful clinician."},
            {
                "role": "user",
                "content": f"My name is Maria Lopez, DOB 03/14/1962, MRN 00482913. Email "
                f"maria.lg@example.com or call 555-201-4477. Message {i}: chest pain for 3 days.",
            },
        ],
        choices=[
            LoggedChoice(
                index=0,
                content=f"Ms. Lopez, chest pain for 3 days needs an ECG today (reply {i}).",
                reasoning_content="Her name is Maria Lopez; at 62, rule out ACS.",
                finish_reason="stop",
            )
        ],
        params={"temperature": 0.0, "max_tokens": 64},
        prompt_tokens=40 + i,
        completion_tokens=12,
        ttft_s=0.05,
        e2e_s=0.4,
    )


def _pg_bin_dir() -> Path | None:
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent
    # Debian's postgresql package keeps its server binaries off PATH.
    found = glob("/usr/lib/postgresql/*/bin/initdb")
    found.sort(key=lambda p: int(re.findall(r"/(\d+)/bin/", p)[0]), reverse=True)
    return Path(found[0]).parent if found else None


def _server_user() -> pwd.struct_passwd | None:
    """Who runs the server: initdb and postgres refuse to run as root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    pytest.skip("running as root and neither a postgres nor a nobody user exists for Postgres")


@dataclass
class PostgresServer:
    bin_dir: Path
    root: Path
    port: int
    user: pwd.struct_passwd | None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, program: str, *args: str) -> None:
        as_user = (
            {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
            if self.user
            else {}
        )
        done = subprocess.run(
            [str(self.bin_dir / program), *args],
            cwd=self.root,
            capture_output=True,
            text=True,
            check=False,
            **as_user,
        )
        if done.returncode != 0:
            log = self.root / "server.log"
            raise RuntimeError(
                f"{program} {' '.join(args)} failed:\n{done.stdout}{done.stderr}"
                + (log.read_text() if log.exists() else "")
            )

    def init(self) -> None:
        self._run("initdb", "-D", "data", "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", "data", "-l", "server.log",
                  "-o", options)

    def stop(self) -> None:
        self._run("pg_ctl", "stop", "-w", "-m", "fast", "-D", "data")

    def running(self) -> bool:
        return (self.root / "data" / "postmaster.pid").exists()

    def create_database(self) -> str:
        import psycopg  # the optional `postgres` extra; SQLite-only runs don't need it

        name = f"t{os.urandom(6).hex()}"
        with psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True
        ) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return name


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    bin_dir = _pg_bin_dir()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in "
                    "/usr/lib/postgresql/*/bin")
    pytest.importorskip("psycopg", reason="the postgres extra (psycopg) is not installed")
    user = _server_user()
    root = Path(tempfile.mkdtemp(prefix="clinicloop-pg-"))
    if user:
        os.chown(root, user.pw_uid, user.pw_gid)
    server = PostgresServer(bin_dir, root, free_port(), user)
    try:
        server.init()
        server.start()
        yield server
    finally:
        if server.running():
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> str:
    """A fresh, empty database on the session's server."""
    return pg_server.url(pg_server.create_database())
