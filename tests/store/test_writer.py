"""The log writer against a store that fails for real: SQLite locked by another connection,
Postgres stopped with `pg_ctl stop`. Every record must land exactly once, redacted, and the spool
must never hold PHI."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from clinicloop.config import StoreSettings
from clinicloop.store.db import Store
from clinicloop.store.records import TurnRecord
from clinicloop.store.redact import redact_record
from clinicloop.store.writer import LogWriter
from tests.store.conftest import PHI, make_turn

DEADLINE_S = 60.0


@dataclass
class Backend:
    """A store, and a way to make it fail for real and to bring it back."""

    store: Store
    down: Callable[[], None]
    up: Callable[[], None]


class SqliteLock:
    """Another connection holding the write lock: the store's inserts fail with 'locked'."""

    def __init__(self, path: Path) -> None:
        self._connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)

    def take(self) -> None:
        self._connection.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        if self._connection.in_transaction:
            self._connection.execute("ROLLBACK")


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        path = tmp_path / "store.db"
        store = Store(f"sqlite:///{path}", sqlite_busy_timeout_s=0.05)
        lock = SqliteLock(path)
        yield Backend(store, lock.take, lock.release)
        lock.release()
    else:
        server = request.getfixturevalue("pg_server")
        store = Store(request.getfixturevalue("pg_url"))
        yield Backend(store, server.stop, server.start)
        if not server.running():  # a failed test must not leave the session's server down
            server.start()
    store.dispose()


@pytest.fixture
def settings(tmp_path: Path) -> StoreSettings:
    # A small queue, so a burst overflows into the spool even while the store is up.
    return StoreSettings(
        spool_path=tmp_path / "spool" / "log.jsonl",
        queue_size=32,
        batch_size=16,
        flush_interval_s=0.02,
        retry_interval_s=0.05,
    )


def spool_files(settings: StoreSettings) -> list[Path]:
    spool = settings.spool_path
    return [p for p in (spool, spool.with_name(spool.name + ".replaying")) if p.exists()]


def spooled_records(settings: StoreSettings) -> list[TurnRecord]:
    return [
        TurnRecord.model_validate(json.loads(line))
        for path in spool_files(settings)
        for line in path.read_text().splitlines()
    ]


async def until(check: Callable[[], bool], what: str) -> None:
    """Poll `check` (in a thread: it may query the store) until true or the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not await asyncio.to_thread(check):
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class SpoolWatch:
    """Reads the spool files over and over while a test runs, remembering any PHI seen."""

    def __init__(self, settings: StoreSettings) -> None:
        self._settings = settings
        self.bytes_seen = 0
        self.phi_seen: set[str] = set()

    def scan(self) -> None:
        for path in spool_files(self._settings):
            try:
                content = path.read_text()
            except FileNotFoundError:  # renamed or replayed between the listing and the read
                continue
            self.bytes_seen = max(self.bytes_seen, len(content))
            self.phi_seen |= {phi for phi in PHI if phi in content}

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.to_thread(self.scan)
            await asyncio.sleep(0.01)


def assert_redacted_in_store(store: Store, expected: list[TurnRecord]) -> None:
    stored = store.list_turns(limit=len(expected) + 10)
    assert sorted(t.id for t in stored) == sorted(t.id for t in expected)
    dump = json.dumps([t.model_dump(mode="json") for t in stored])
    assert not [phi for phi in PHI if phi in dump]
    assert {t.id: t for t in stored} == {t.id: redact_record(t) for t in expected}


def test_writer_survives_a_store_outage_mid_burst(backend: Backend, settings: StoreSettings):
    turns = [make_turn(i) for i in range(300)]

    async def scenario() -> LogWriter:
        writer = LogWriter(backend.store, settings)
        watch, watching = SpoolWatch(settings), asyncio.Event()
        watcher = asyncio.create_task(watch.run(watching))
        await writer.start()
        for turn in turns[:100]:
            writer.submit(turn)
        await until(lambda: writer.inserted > 0, "first inserts")
        await asyncio.to_thread(backend.down)
        for turn in turns[100:200]:
            writer.submit(turn)
        await until(lambda: not writer.store_up and watch.bytes_seen > 0, "outage spooled")
        await asyncio.to_thread(backend.up)
        for turn in turns[200:]:
            writer.submit(turn)
        await until(lambda: backend.store.count() == len(turns), "every record stored")
        await writer.close()
        watching.set()
        await watcher
        watch.scan()
        assert not watch.phi_seen, "PHI reached the spool"
        return writer

    writer = asyncio.run(scenario())
    assert backend.store.count() == 300
    assert_redacted_in_store(backend.store, turns)
    assert writer.spooled > 0 and writer.replayed > 0 and writer.dropped == 0
    assert writer.inserted + writer.replayed == 300
    assert writer.store_up and writer.queue_depth == 0
    assert spool_files(settings) == []


def test_spool_left_by_a_writer_closed_while_down_is_replayed_on_start(
    backend: Backend, settings: StoreSettings
):
    turns = [make_turn(i) for i in range(20)]

    async def close_while_down() -> LogWriter:
        writer = LogWriter(backend.store, settings)
        await writer.start()
        await asyncio.to_thread(backend.down)
        for turn in turns:
            writer.submit(turn)
        await writer.close()
        return writer

    async def start_again() -> LogWriter:
        writer = LogWriter(backend.store, settings)
        await writer.start()
        await until(lambda: not spool_files(settings), "spool replayed and removed")
        await writer.close()
        return writer

    first = asyncio.run(close_while_down())
    assert (first.inserted, first.spooled, first.store_up) == (0, 20, False)
    left = spooled_records(settings)
    assert sorted(t.id for t in left) == sorted(t.id for t in turns)
    assert left[0].messages[1]["content"].startswith("My name is [NAME], DOB [DATE]")
    backend.up()
    second = asyncio.run(start_again())
    assert second.replayed == 20 and backend.store.count() == 20
    assert_redacted_in_store(backend.store, turns)


def test_interrupted_replay_is_finished_exactly_once(tmp_path: Path, settings: StoreSettings):
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.migrate()
    turns = [redact_record(make_turn(i)) for i in range(15)]
    # A crash mid-replay: the first 5 of the `.replaying` file were inserted, the rest not; the
    # file ends in a line torn by a crash mid-append. A newer spool holds 5 more.
    store.insert_many(turns[:5])
    settings.spool_path.parent.mkdir(parents=True)
    lines = [json.dumps(t.model_dump(mode="json")) + "\n" for t in turns]
    replaying = settings.spool_path.with_name(settings.spool_path.name + ".replaying")
    replaying.write_text("".join(lines[:10]) + lines[10][:40])
    settings.spool_path.write_text("".join(lines[10:]))

    async def scenario() -> LogWriter:
        writer = LogWriter(store, settings)
        await writer.start()
        await until(lambda: not spool_files(settings), "both files replayed")
        await writer.close()
        return writer

    writer = asyncio.run(scenario())
    assert (writer.replayed, writer.dropped) == (10, 1)
    assert sorted(t.id for t in store.list_turns()) == sorted(t.id for t in turns)


def test_store_down_at_start_is_migrated_and_filled_when_it_returns(
    tmp_path: Path, settings: StoreSettings
):
    path = tmp_path / "store.db"
    lock = SqliteLock(path)
    lock.take()
    store = Store(f"sqlite:///{path}", sqlite_busy_timeout_s=0.05)
    turns = [make_turn(i) for i in range(10)]

    async def scenario() -> LogWriter:
        writer = LogWriter(store, settings)
        await writer.start()
        assert not writer.store_up
        for turn in turns:
            writer.submit(turn)
        await until(lambda: writer.spooled == 10, "records spooled")
        lock.release()
        await until(lambda: writer.store_up and not spool_files(settings), "store back")
        await writer.close()
        return writer

    writer = asyncio.run(scenario())
    assert (writer.inserted, writer.replayed) == (0, 10)
    assert_redacted_in_store(store, turns)


def test_submit_never_raises_and_after_close_counts_a_drop(tmp_path: Path, settings: StoreSettings):
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")

    async def scenario() -> LogWriter:
        writer = LogWriter(store, settings)
        writer.submit(make_turn(0))  # before start: kept, written once started
        await writer.close()
        writer.submit(make_turn(1))
        return writer

    writer = asyncio.run(scenario())
    assert (writer.inserted, writer.dropped, store.count()) == (1, 1, 1)


def test_redaction_can_be_turned_off(tmp_path: Path, settings: StoreSettings):
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    turn = make_turn(0)

    async def scenario() -> None:
        writer = LogWriter(store, settings.model_copy(update={"redact": False}))
        await writer.start()
        writer.submit(turn)
        await writer.close()

    asyncio.run(scenario())
    assert store.get(turn.id) == turn
