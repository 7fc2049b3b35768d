"""A real Postgres for tests: `initdb` in a temporary directory, started on a free loopback port,
stopped at session end. Skips only when no server binaries exist (CI installs Debian's package)."""

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

from tests.conftest import free_port


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
