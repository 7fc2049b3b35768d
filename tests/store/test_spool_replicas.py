"""Several gateway replicas, each with its own spool: a second writer (or `clinicloop serve`) on a
spool another process holds is refused; with `store.adopt_spools`, the spools of replicas that are
gone (a killed process, a `.replaying` a death cut short) are replayed by the living ones, and
replays that race over shared records land every record exactly once, on a real Postgres."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from clinicloop.config import StoreSettings
from clinicloop.store.db import Store
from clinicloop.store.records import TurnRecord
from clinicloop.store.redact import redact_record
from clinicloop.store.writer import LogWriter, SpoolInUse
from tests.conftest import ROOT, free_port
from tests.store.conftest import make_turn
from tests.store.test_writer import until

# A replica that spools `count` records (its store is unreachable) and then holds its spool until
# it is killed; it prints each record's id, then "ready".
DEAD_REPLICA = """
import asyncio, sys
from clinicloop.config import StoreSettings
from clinicloop.store.db import Store
from clinicloop.store.writer import LogWriter
from tests.store.conftest import make_turn

async def main():
    store_url, spool, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    writer = LogWriter(Store(store_url), StoreSettings(spool_path=spool, retry_interval_s=3600))
    await writer.start()
    for i in range(count):
        turn = make_turn(i, conversation_id="conv-dead")
        assert await writer.log(turn) == "spooled"
        print(turn.id, flush=True)
    print("ready", flush=True)
    sys.stdin.read()

asyncio.run(main())
"""


def replica_settings(directory: Path, name: str, *, adopt: bool) -> StoreSettings:
    return StoreSettings(spool_path=directory / f"{name}.jsonl", adopt_spools=adopt,
                         batch_size=16, retry_interval_s=0.05)


def write_spool(path: Path, turns: list[TurnRecord]) -> None:
    path.write_text("".join(t.model_dump_json() + "\n" for t in turns))


def left_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_a_second_writer_on_the_same_spool_is_refused(tmp_path: Path):
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    settings = replica_settings(tmp_path / "spool", "gateway-0", adopt=True)

    async def scenario() -> None:
        first = LogWriter(store, settings)
        await first.start()
        second = LogWriter(store, settings)
        with pytest.raises(SpoolInUse, match=r"store.spool_path .*gateway-0.jsonl is in use by "
                           r"another process: give each replica its own \(e.g. named by pod\)"):
            await second.start()
        # The refused writer took nothing over: the first still writes, and owns the spool.
        assert await first.log(make_turn(0)) == "stored"
        await first.close()
        await second.start()  # the spool is free once its owner closed
        await second.close()

    asyncio.run(scenario())
    assert store.count() == 1
    assert left_in(tmp_path / "spool") == []  # no spool and no lock file left behind
    store.dispose()


def test_serve_stops_with_one_line_on_a_spool_another_replica_holds(tmp_path: Path):
    spool = tmp_path / "spool.jsonl"
    store_url = f"sqlite:///{tmp_path / 'clinicloop.db'}"
    env = {**os.environ, "CLINICLOOP_STORE__URL": store_url,
           "CLINICLOOP_STORE__SPOOL_PATH": str(spool),
           "CLINICLOOP_MODELS_DIR": str(ROOT / "var" / "models")}

    async def scenario() -> subprocess.CompletedProcess[str]:
        holder = LogWriter(Store(store_url), StoreSettings(spool_path=spool))
        await holder.start()
        try:
            return await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "clinicloop.cli", "serve", "--port", str(free_port())],
                env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        finally:
            await holder.close()

    done = asyncio.run(scenario())
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"clinicloop serve: the log writer could not start: store.spool_path {spool} is in use "
        "by another process: give each replica its own (e.g. named by pod)")
    assert "engine ready" not in done.stderr  # it stopped before loading anything


def test_a_killed_replicas_spool_is_adopted_once_it_is_gone(tmp_path: Path, pg_url: str):
    spools = tmp_path / "spool"
    store = Store(pg_url)
    unreachable = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/gone"
    dead = subprocess.Popen(
        [sys.executable, "-c", DEAD_REPLICA, unreachable, str(spools / "gateway-1.jsonl"), "30"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert dead.stdout is not None
        ids = [line.strip() for line in iter(dead.stdout.readline, "ready\n")]
        assert len(ids) == 30, ids

        async def live_round(adopt: bool) -> None:
            # `close` waits for the replay round in progress and runs one more: two full rounds.
            writer = LogWriter(store, replica_settings(spools, "gateway-0", adopt=adopt))
            await writer.start()
            await writer.close()

        asyncio.run(live_round(adopt=True))
        assert store.count() == 0, "adopted the spool of a replica still running"
        dead.send_signal(signal.SIGKILL)
        dead.wait(timeout=30)
        asyncio.run(live_round(adopt=False))
        assert store.count() == 0, "adopted a spool with adopt_spools off"
        assert "gateway-1.jsonl" in left_in(spools)

        async def adopt() -> LogWriter:
            writer = LogWriter(store, replica_settings(spools, "gateway-0", adopt=True))
            await writer.start()
            await until(lambda: store.count() == 30, "the dead replica's records stored")
            await writer.close()
            return writer

        writer = asyncio.run(adopt())
    finally:
        if dead.poll() is None:
            dead.kill()
            dead.wait()
    assert sorted(t.id for t in store.list_turns(limit=100)) == sorted(ids)
    assert (writer.replayed, writer.dead_lettered, writer.dropped) == (30, 0, 0)
    assert left_in(spools) == []  # its spool and lock file are gone too
    store.dispose()


def test_replays_racing_over_shared_records_store_each_once(tmp_path: Path, pg_url: str):
    spools = tmp_path / "spool"
    spools.mkdir()
    store = Store(pg_url)
    store.migrate()
    turns = [redact_record(make_turn(i, conversation_id=f"conv-{i % 7}")) for i in range(240)]
    # A replay cut short had stored the first 40. Gone replicas left two spools and a `.replaying`
    # their death interrupted; the two live replicas' own spools share records with all of them.
    store.insert_many(turns[:40])
    shuffled = turns[100:240]
    random.Random(0).shuffle(shuffled)
    write_spool(spools / "gone-1.jsonl", turns[:120])
    write_spool(spools / "gone-2.jsonl.replaying", turns[60:180])
    write_spool(spools / "gone-3.jsonl", shuffled)
    write_spool(spools / "gateway-a.jsonl", turns[:100])
    write_spool(spools / "gateway-b.jsonl", turns[50:200])
    # A dead-letter file is for people to read: adoption never replays or removes it.
    dead_letter = spools / "gone-1.dead.jsonl"
    dead_letter.write_text(json.dumps({"id": None, "stage": "replay", "line": "{torn"}) + "\n")

    async def scenario() -> list[LogWriter]:
        writers = [LogWriter(store, replica_settings(spools, name, adopt=True))
                   for name in ("gateway-a", "gateway-b")]
        await asyncio.gather(*(w.start() for w in writers))
        # Left: the dead-letter file, and the live replicas' lock files until they close.
        await until(lambda: left_in(spools) == ["gateway-a.jsonl.lock", "gateway-b.jsonl.lock",
                                                "gone-1.dead.jsonl"], "every spool replayed")
        await asyncio.gather(*(w.close() for w in writers))
        return writers

    writers = asyncio.run(scenario())
    stored = store.list_turns(limit=1000)
    assert sorted(t.id for t in stored) == sorted(t.id for t in turns)
    # `replayed` counts rows the inserts wrote: a record inserted twice would be counted twice.
    assert sum(w.replayed for w in writers) == 200
    assert [(w.dead_lettered, w.dropped) for w in writers] == [(0, 0), (0, 0)]
    assert dead_letter.read_text().count("\n") == 1
    assert left_in(spools) == ["gone-1.dead.jsonl"]
    store.dispose()
