"""The log writer against a store that fails for real: SQLite locked by another connection,
Postgres stopped with `pg_ctl stop`, a store that hangs. Every record must land exactly once,
redacted, and the spool must never hold PHI; a record that cannot be stored is set aside without
touching the rest of its batch; `ack` returns once a record is on disk; `close` is bounded."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from clinicloop.config import StoreSettings
from clinicloop.store import writer as writer_module
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
    assert (writer.replayed, writer.dead_lettered, writer.dropped) == (10, 1, 0)
    assert sorted(t.id for t in store.list_turns()) == sorted(t.id for t in turns)
    # The torn line is kept aside for inspection, not silently dropped.
    [entry] = dead_letters(writer)
    assert entry["stage"] == "replay" and entry["line"] == lines[10][:40]


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


# A record no store can keep must cost only itself: the rest of its batch is stored, the record is
# set aside (redacted, JSON-safe) in the dead-letter file, and the writer keeps writing.


def dead_letters(writer: LogWriter) -> list[dict[str, Any]]:
    path = writer.dead_letter_path
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def bad_turns() -> dict[str, tuple[TurnRecord, set[str]]]:
    """Records the store cannot keep, each for another reason: kind -> (record, stages that may
    set it aside)."""
    deep, raw, huge = make_turn(1001), make_turn(1002), make_turn(1003)
    # Too deep to serialise (and for a redaction that walks `params` recursively).
    deep.params["chat_template_kwargs"] = nested(5000)
    raw.params["logit_bias"] = b"\xff\xfe"  # bytes that are not text: no JSON for them
    huge.prompt_tokens = 2**70  # serialises, but no integer column holds it
    return {"deep": (deep, {"redact", "serialise"}), "raw": (raw, {"redact", "serialise"}),
            "huge": (huge, {"insert"})}


def test_bad_records_are_set_aside_and_the_rest_of_their_batch_is_stored(
    backend: Backend, settings: StoreSettings
):
    good = [make_turn(i) for i in range(40)]
    bad = bad_turns()
    # Batches of 16: each bad record shares its batch with good ones.
    turns = [*good[:10], bad["deep"][0], *good[10:20], bad["raw"][0], *good[20:30],
             bad["huge"][0], *good[30:]]
    later = make_turn(99)

    async def scenario() -> LogWriter:
        writer = LogWriter(backend.store, settings.model_copy(update={"queue_size": 1000}))
        for turn in turns:  # queued before the writer starts, so the batches are full
            writer.submit(turn)
        await writer.start()
        await until(lambda: writer.inserted + writer.dead_lettered == len(turns), "all settled")
        writer.submit(later)  # the writer is still writing
        await until(lambda: backend.store.get(later.id) is not None, "a later record stored")
        await asyncio.wait_for(writer.close(), DEADLINE_S)
        return writer

    writer = asyncio.run(scenario())
    assert_redacted_in_store(backend.store, [*good, later])
    assert (writer.inserted, writer.dead_lettered, writer.dropped) == (41, 3, 0)
    entries = {e["id"]: e for e in dead_letters(writer)}
    assert entries.keys() == {r.id for r, _ in bad.values()}
    assert all(entries[r.id]["stage"] in stages for r, stages in bad.values())
    assert not [phi for phi in PHI if phi in writer.dead_letter_path.read_text()]
    deep = entries[bad["deep"][0].id]
    if deep["stage"] == "serialise":  # redacted, and cut where JSON would not go
        assert deep["record"]["messages"][1]["content"].startswith("My name is [NAME]")
        assert "[cut: nested deeper than" in json.dumps(deep["record"]["params"])
    assert entries[bad["huge"][0].id]["record"]["prompt_tokens"] == 2**70


def _fail_for(victim: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn`, raising instead when its argument is, or holds, the record `victim`."""
    def wrapped(arg: Any, *args: Any, **kwargs: Any) -> Any:
        ids = {r.id for r in arg} if isinstance(arg, list) else {arg.id}
        if victim in ids:
            raise RuntimeError("injected failure")
        return fn(arg, *args, **kwargs)

    return wrapped


@pytest.mark.parametrize("stage", ["redact", "serialise", "insert"])
def test_writer_survives_a_failure_injected_at_each_stage(
    stage: str, tmp_path: Path, settings: StoreSettings, monkeypatch: pytest.MonkeyPatch
):
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    turns = [make_turn(i) for i in range(30)]
    victim = turns[7]
    if stage == "redact":
        monkeypatch.setattr(writer_module, "redact_record", _fail_for(victim.id, redact_record))
    elif stage == "serialise":
        monkeypatch.setattr(writer_module, "_serialise",
                            _fail_for(victim.id, writer_module._serialise))
    else:
        monkeypatch.setattr(store, "insert_many", _fail_for(victim.id, store.insert_many))
    later = make_turn(99)

    async def scenario() -> LogWriter:
        writer = LogWriter(store, settings.model_copy(update={"queue_size": 1000}))
        for turn in turns:
            writer.submit(turn)
        await writer.start()
        await until(lambda: writer.inserted + writer.dead_lettered == len(turns), "all settled")
        writer.submit(later)
        await until(lambda: store.get(later.id) is not None, "a later record stored")
        await asyncio.wait_for(writer.close(), DEADLINE_S)
        return writer

    writer = asyncio.run(scenario())
    kept = [t for t in turns if t is not victim] + [later]
    assert_redacted_in_store(store, kept)
    [entry] = dead_letters(writer)
    assert (entry["id"], entry["stage"], entry["error"]) == (victim.id, stage, "RuntimeError")
    assert not [phi for phi in PHI if phi in writer.dead_letter_path.read_text()]
    if stage == "redact":  # its text could not be redacted: only metadata is kept
        assert "messages" not in entry["record"] and entry["record"]["prompt_tokens"] == 47
    else:
        assert entry["record"]["messages"][1]["content"].startswith("My name is [NAME]")


def test_close_is_bounded_when_the_store_hangs_and_spools_what_is_left(
    tmp_path: Path, settings: StoreSettings
):
    path = tmp_path / "store.db"
    # A lock held by another connection and an hour of busy timeout: inserts hang.
    store = Store(f"sqlite:///{path}", sqlite_busy_timeout_s=3600)
    lock = SqliteLock(path)
    turns = [make_turn(i) for i in range(20)]
    bounded = settings.model_copy(update={"close_timeout_s": 0.5})

    async def scenario() -> tuple[LogWriter, float]:
        writer = LogWriter(store, bounded)
        await writer.start()
        await asyncio.to_thread(lock.take)
        for turn in turns:
            writer.submit(turn)
        # One batch hangs in an insert, the rest waits in the queue.
        await until(lambda: writer.queue_depth < len(turns), "the first batch taken")
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(writer.close(), DEADLINE_S)
        return writer, loop.time() - started

    try:
        writer, took = asyncio.run(scenario())
        assert took < 3 * bounded.close_timeout_s + 1.0
        assert writer.spooled == 20 and writer.dropped == 0
        assert sorted(t.id for t in spooled_records(settings)) == sorted(t.id for t in turns)
        assert not [phi for phi in PHI if any(phi in p.read_text() for p in spool_files(settings))]
    finally:
        lock.release()  # the hung insert finishes now; the replay below skips what it wrote

    async def start_again() -> None:
        writer = LogWriter(Store(f"sqlite:///{path}"), settings)
        await writer.start()
        await until(lambda: not spool_files(settings), "spool replayed")
        await writer.close()

    asyncio.run(start_again())
    assert_redacted_in_store(store, turns)


# Durability modes: with `ack`, `log` returns once the record is on disk.


def test_ack_returns_once_the_record_is_committed_or_spooled(
    tmp_path: Path, settings: StoreSettings
):
    path = tmp_path / "store.db"
    store = Store(f"sqlite:///{path}", sqlite_busy_timeout_s=0.05, sqlite_synchronous="FULL")
    lock = SqliteLock(path)
    first, second = make_turn(0), make_turn(1)
    group = [make_turn(i) for i in range(2, 42)]

    def committed(turn_id: str) -> bool:  # seen by another connection: committed, not cached
        with sqlite3.connect(path) as other:
            return other.execute("select 1 from turns where id = ?", (turn_id,)).fetchone() == (1,)

    async def scenario() -> tuple[LogWriter, list[str]]:
        writer = LogWriter(store, settings)
        await writer.start()
        assert await writer.log(first) == "stored" and committed(first.id)
        await asyncio.to_thread(lock.take)
        assert await writer.log(second) == "spooled"
        assert second.id in {t.id for t in spooled_records(settings)}
        await asyncio.to_thread(lock.release)
        outcomes = await asyncio.gather(*(writer.log(t) for t in group))
        assert writer.acks_waiting == 0
        await writer.close()
        return writer, outcomes

    writer, outcomes = asyncio.run(scenario())
    assert set(outcomes) <= {"stored", "spooled"} and writer.ack_timeouts == 0
    assert_redacted_in_store(store, [first, second, *group])
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_ack_times_out_answers_and_still_writes_the_record(tmp_path: Path, settings: StoreSettings):
    path = tmp_path / "store.db"
    store = Store(f"sqlite:///{path}", sqlite_busy_timeout_s=3600)
    lock = SqliteLock(path)
    turn = make_turn(0)
    quick = settings.model_copy(update={"ack_timeout_s": 0.3})

    async def scenario() -> LogWriter:
        writer = LogWriter(store, quick)
        await writer.start()
        await asyncio.to_thread(lock.take)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await writer.log(turn) == "pending"
        assert 0.3 <= loop.time() - started < 5.0
        assert (writer.ack_timeouts, writer.acks_waiting) == (1, 0)
        await asyncio.to_thread(lock.release)
        await until(lambda: store.get(turn.id) is not None, "the record written after all")
        await writer.close()
        return writer

    try:
        writer = asyncio.run(scenario())
    finally:
        lock.release()
    assert writer.inserted == 1


def test_async_mode_does_not_wait(tmp_path: Path, settings: StoreSettings):
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    turn = make_turn(0)

    async def scenario() -> str:
        writer = LogWriter(store, settings.model_copy(update={"durability": "async"}))
        await writer.start()
        outcome = await writer.log(turn)
        await writer.close()
        return outcome

    assert asyncio.run(scenario()) == "pending"
    assert store.get(turn.id) is not None


# The property: whatever JSON-able (or not quite JSON) values a record carries, every record is
# either stored or dead-lettered, and the writer closes.

_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@hsettings(max_examples=25, deadline=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(values=st.lists(_JSON_VALUES | st.integers(0, 3000).map(nested), min_size=1, max_size=6),
       texts=st.lists(st.text(), min_size=1, max_size=6))
def test_property_writer_survives_arbitrary_json_records(
    tmp_path: Path, settings: StoreSettings, values: list[Any], texts: list[str]
):
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    turns = []
    for i, value in enumerate(values):
        turn = make_turn(i)
        turn.params["chat_template_kwargs"] = {"x": value}
        turn.messages.append({"role": "user", "content": texts[i % len(texts)], "extra": value})
        turns.append(turn)
    run = settings.model_copy(update={"spool_path": tmp_path / uuid.uuid4().hex / "log.jsonl"})

    async def scenario() -> LogWriter:
        writer = LogWriter(store, run)
        await writer.start()
        for turn in turns:
            writer.submit(turn)
        await asyncio.wait_for(writer.close(), DEADLINE_S)
        return writer

    writer = asyncio.run(scenario())
    dead = {e["id"] for e in dead_letters(writer)}
    stored = {t.id for t in turns if store.get(t.id) is not None}
    assert stored | dead == {t.id for t in turns} and not stored & dead
    assert writer.dropped == 0 and writer.inserted == len(stored)
    store.dispose()
