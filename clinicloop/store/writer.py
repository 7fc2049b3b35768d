"""Durable conversation logging off the request path: the gateway hands records to the store here.

`log(record)` enqueues and, with `store.durability = "ack"` (the default), returns once the record
is on disk: committed (SQLite `synchronous=FULL`), or fsynced in the spool or the dead-letter file;
at most `ack_timeout_s` later it returns anyway and the record is still written when the writer gets
to it. In `ack` mode the flush task takes whatever is queued without waiting for a batch to fill,
so the records that arrive during one commit share the next (group commit). With `async`, `log`
returns at once and the flush task waits up to `flush_interval_s` to fill a batch: up to
`queue_size` records live only in memory, and a killed process loses them. `submit` hands a record
over without waiting, in either mode.

Each record of a batch is redacted and serialised on its own; the batch is inserted in one
transaction from a worker thread. A failure is either the store's or one record's:
- Store unavailable (connection, lock, disk: `_store_unavailable`): the batch goes to the spool
  (JSON lines, already redacted, fsynced) and later batches go straight there until the store is
  back; when the in-memory queue is full, records are spooled too. Every `retry_interval_s` a replay
  task renames the spool to `<spool>.replaying`, inserts its records in batches and deletes it.
  Inserts skip ids already stored, so a replay cut short is redone and every record lands once.

Each spool has one owner: `start` takes an exclusive `flock` on `<spool>.lock` (held until
`close`, released by the kernel when the process dies) and refuses a spool another process holds
(`SpoolInUse`), since two writers would replay each other's records from under their appends.
With `adopt_spools`, each replay round also takes, without waiting, the lock of every other spool
in the directory (`*.jsonl`, or the `.replaying` it left; never a dead-letter file): one it gets
belongs to a replica that is gone, and is replayed the same way. Lock files are removed on release;
a lock is held only once it is checked to still be the file at its path, so removal is safe.
- A bad record (redaction or serialisation raised, nesting too deep for JSON, a value JSON cannot
  encode such as NaN, a value the database refuses): only that record is set aside. A batch the
  store refuses is retried one record at a time, and each record that still fails goes to the
  dead-letter file beside the spool (`log.jsonl` -> `log.dead.jsonl`) in a JSON-safe form of what
  can be kept: the redacted record (cut at `_SAFE_DEPTH` levels), or only its metadata when
  redaction itself failed. Unreadable spool lines go there too. Nothing replays that file.

No exception ends a writer task: whatever one batch raises costs that batch at most (set aside as
metadata). `close` drains what was submitted within `close_timeout_s`; past it, what is left goes
to the spool within `close_timeout_s` more. Blocking work runs on daemon threads, so a hung database
cannot hold the process at exit.

Logs carry counts and exception class names only: records hold conversations, and a driver's error
message can quote them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import math
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel
from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    InterfaceError,
    InternalError,
    OperationalError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from clinicloop.config import StoreSettings
from clinicloop.errors import UserError
from clinicloop.store.db import Store
from clinicloop.store.records import TurnRecord
from clinicloop.store.redact import redact_record

log = logging.getLogger(__name__)

Outcome = Literal["stored", "spooled", "dead_lettered", "dropped", "pending"]
T = TypeVar("T")

# Dead-letter entries keep structures down to this depth; deeper parts become a marker string.
_SAFE_DEPTH = 32
# What a dead-letter entry keeps of a record whose redaction failed: no free text.
_METADATA = ("id", "conversation_id", "created_at", "endpoint", "model", "model_version",
             "api_key_id", "prompt_tokens", "completion_tokens", "ttft_s", "e2e_s", "status")
# SQLSTATE classes that blame the data, not the server: data exception (e.g. a number out of
# range), integrity violation, program limit exceeded (e.g. JSON nested deeper than the stack).
_RECORD_SQLSTATES = frozenset({"22", "23", "54"})
# Spools `adopt_spools` looks for beside its own; a dead-letter file ends in `.dead.jsonl`.
_SPOOL_SUFFIX = ".jsonl"
_DEAD_SUFFIX = ".dead.jsonl"


class SpoolInUse(UserError):
    """Another process (or writer) holds the spool this writer was given."""


@dataclass(eq=False)
class _Pending:
    """One record on its way; `done` (only when a caller waits) resolves with its outcome."""

    record: TurnRecord
    done: asyncio.Future[Outcome] | None = None
    line: str | None = None  # the redacted record as one JSON line, once prepared
    redacted: bool = False


class LogWriter:
    """Batches, redacts and persists `TurnRecord`s; spools them while the store is down and sets
    aside the ones that cannot be stored.

    The counters are for metrics: `inserted` (rows written directly), `spooled` (records written
    to the spool), `replayed` (spooled records later written to the store), `dead_lettered`
    (records or spool lines set aside in the dead-letter file), `dropped` (records lost: submitted
    after `close`, or the spool or dead-letter file itself failed), `acks_waiting` (responses
    waiting for their record to be on disk), `ack_timeouts`, `store_up`, `queue_depth`.
    """

    def __init__(self, store: Store, settings: StoreSettings) -> None:
        self._store = store
        self._settings = settings
        self._spool = Path(settings.spool_path)
        self._lock: int | None = None  # the descriptor holding `<spool>.lock`, from start to close
        self.dead_letter_path = self._spool.with_name(
            f"{self._spool.stem}.dead{self._spool.suffix}")
        # Unbounded, so `close` can always queue its stop signal (None); `queue_size` is enforced
        # in `_enqueue`, which sends the excess to the spool.
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._overflow: list[_Pending] = []
        self._overflow_ready = asyncio.Event()
        self._held: set[_Pending] = set()  # taken from the queue or overflow, not yet settled
        self._append_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._migrated = False
        self._closed = False
        self.inserted = 0
        self.spooled = 0
        self.replayed = 0
        self.dead_lettered = 0
        self.dropped = 0
        self.acks_waiting = 0
        self.ack_timeouts = 0
        self.store_up = True

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize() + len(self._overflow)

    async def start(self) -> None:
        """Take the spool's lock, migrate the store if it answers, then start writing; a down
        store is retried later. Raises `SpoolInUse` if another process holds the spool."""
        if self._lock is None:
            self._lock = _try_lock(_lock_path(self._spool))
            if self._lock is None:
                raise SpoolInUse(
                    f"store.spool_path {self._spool} is in use by another process: give each "
                    "replica its own (e.g. named by pod)")
        await self._migrate()
        self._tasks = [
            asyncio.create_task(self._flush_loop(), name="log-writer-flush"),
            asyncio.create_task(self._spill_loop(), name="log-writer-spill"),
            asyncio.create_task(self._replay_loop(), name="log-writer-replay"),
        ]

    def submit(self, record: TurnRecord) -> None:
        """Hand over one record without waiting; never blocks and never raises."""
        self._enqueue(_Pending(record))

    async def log(self, record: TurnRecord) -> Outcome:
        """Hand over one record; with `ack` durability, return once it is on disk (its outcome) or
        after `ack_timeout_s` ("pending": it is still written later). Never raises but
        `CancelledError`, which leaves the record to be written all the same."""
        if self._settings.durability == "async":
            self.submit(record)
            return "pending"
        pending = _Pending(record, asyncio.get_running_loop().create_future())
        self._enqueue(pending)
        assert pending.done is not None
        self.acks_waiting += 1
        try:
            async with asyncio.timeout(self._settings.ack_timeout_s):
                return await asyncio.shield(pending.done)
        except TimeoutError:
            self.ack_timeouts += 1
            log.warning("a log record was not on disk within %.1f s; answered without it "
                        "(%d so far)", self._settings.ack_timeout_s, self.ack_timeouts)
            return "pending"
        finally:
            self.acks_waiting -= 1

    async def close(self) -> None:
        """Write out everything submitted (to the store, or else to the spool), taking at most
        about twice `close_timeout_s`."""
        if self._closed:
            return
        if not self._tasks:  # records submitted to a writer never started still get written
            await self.start()
        self._closed = True
        self._queue.put_nowait(None)
        self._stopping.set()
        self._overflow_ready.set()
        budget = self._settings.close_timeout_s
        deadline = asyncio.get_running_loop().time() + budget
        _, unfinished = await asyncio.wait(self._tasks, timeout=budget)
        if unfinished:
            log.error("log writer did not drain within %.1f s; spooling what is left", budget)
            for task in unfinished:
                task.cancel()
            await asyncio.wait(unfinished)
            await self._rescue(budget)
        else:
            # One last replay, so a short outage leaves no spool behind a clean shutdown.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self._replay_once()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await _blocking(self._store.dispose)
        if self._lock is not None:
            _unlock(_lock_path(self._spool), self._lock)
            self._lock = None

    def _enqueue(self, pending: _Pending) -> None:
        if self._closed:
            self.dropped += 1
            log.error("log record submitted after close; %d dropped so far", self.dropped)
            self._settle([pending], "dropped")
        elif self._queue.qsize() >= self._settings.queue_size:
            # The store can't keep up: the record goes to disk rather than away.
            self._overflow.append(pending)
            self._overflow_ready.set()
        else:
            self._queue.put_nowait(pending)

    def _settle(self, items: Iterable[_Pending], outcome: Outcome) -> None:
        for pending in items:
            self._held.discard(pending)
            if pending.done is not None and not pending.done.done():
                pending.done.set_result(outcome)

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        group_commit = self._settings.durability == "ack"
        while (first := await self._queue.get()) is not None:
            self._held.add(first)
            batch = [first]
            deadline = loop.time() + self._settings.flush_interval_s
            stop = False
            while len(batch) < self._settings.batch_size:
                try:
                    if group_commit:  # what is queued now; later arrivals make the next batch
                        pending = self._queue.get_nowait()
                    else:
                        async with asyncio.timeout_at(deadline):
                            pending = await self._queue.get()
                except (TimeoutError, asyncio.QueueEmpty):
                    break
                if pending is None:
                    stop = True
                    break
                self._held.add(pending)
                batch.append(pending)
            await self._write(batch, to_store=True)
            if stop:
                return

    async def _spill_loop(self) -> None:
        while True:
            await self._overflow_ready.wait()
            self._overflow_ready.clear()
            while self._overflow:
                batch, self._overflow = self._overflow, []
                self._held.update(batch)
                await self._write(batch, to_store=False)
            if self._stopping.is_set():
                return

    async def _replay_loop(self) -> None:
        while True:
            await self._replay_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._settings.retry_interval_s)
                return

    async def _rescue(self, budget: float) -> None:
        """After the tasks were stopped: spool every record not yet settled."""
        left = list(self._held) + self._overflow
        self._overflow = []
        while not self._queue.empty():
            if (pending := self._queue.get_nowait()) is not None:
                left.append(pending)
        self._held.update(left)
        try:
            async with asyncio.timeout(budget):
                await self._write(left, to_store=False)
        except TimeoutError:
            lost = [p for p in left if p in self._held]
            self.dropped += len(lost)
            log.error("%d log records could not be spooled at shutdown", len(lost))
            self._settle(lost, "dropped")

    async def _write(self, batch: list[_Pending], *, to_store: bool) -> None:
        """Prepare each record, then insert the batch (if `to_store` and the store is up) or spool
        it; every record ends settled. Never raises but `CancelledError`."""
        try:
            # One thread hop for redaction, serialisation and the insert: each hop waits for the
            # GIL behind the decode thread, which an `ack` response would wait for in turn.
            store = to_store and self.store_up
            bad, inserted, error = await _blocking(self._prepare_and_insert, batch, store)
            await self._dead_letter([entry for _, entry in bad], [p for p, _ in bad])
            ready = [p for p in batch if p.line is not None]
            if store and ready:
                if error is None:
                    self._settle(ready, "stored")
                    self.inserted += inserted
                    ready = []
                else:
                    inserted, ready = await self._insert_failed(ready, error)
                    self.inserted += inserted
            await self._append_spool(ready)
        except Exception as exc:  # a fault of the writer's own costs this batch at most
            left = [p for p in batch if p in self._held]
            log.error("log writer failed on a batch (%s); setting %d records aside",
                      type(exc).__name__, len(left))
            await self._dead_letter([_dead_entry(p, "writer", exc, keep_text=False) for p in left],
                                    left)

    def _prepare_and_insert(self, batch: list[_Pending], store: bool,
                            ) -> tuple[list[tuple[_Pending, str]], int, Exception | None]:
        """In a thread: redact and serialise each record, then (if `store`) insert the ones that
        could be. Returns (each record that cannot be kept with its dead-letter entry, rows
        inserted, the insert's exception)."""
        bad = [(p, entry) for p in batch if p.line is None
               if (entry := self._prepare_one(p)) is not None]
        ready = [p for p in batch if p.line is not None]
        if not (store and ready):
            return bad, 0, None
        try:
            return bad, self._store.insert_many([p.record for p in ready]), None
        except Exception as exc:  # judged on the loop: store down, or a bad record among them
            return bad, 0, exc

    def _prepare_one(self, pending: _Pending) -> str | None:
        """Set `pending.line`; or return the dead-letter entry of a record that cannot be kept."""
        if self._settings.redact and not pending.redacted:
            try:
                pending.record = redact_record(pending.record)
            except Exception as exc:  # unredacted text must not be persisted: metadata only
                return _dead_entry(pending, "redact", exc, keep_text=False)
        pending.redacted = True
        try:
            pending.line = _serialise(pending.record)
        except Exception as exc:
            return _dead_entry(pending, "serialise", exc, keep_text=True)
        return None

    async def _insert(self, items: list[_Pending]) -> tuple[int, list[_Pending]]:
        """Insert `items`, settling them: (rows inserted, the items left because the store is
        unavailable, which marks it down). A batch it refuses is retried one record at a time."""
        if not items:
            return 0, []
        try:
            inserted = await _blocking(self._store.insert_many, [p.record for p in items])
        except Exception as exc:  # whatever the store raised, the batch must survive it
            return await self._insert_failed(items, exc)
        self._settle(items, "stored")
        return inserted, []

    async def _insert_failed(self, items: list[_Pending], exc: Exception,
                             ) -> tuple[int, list[_Pending]]:
        """After inserting `items` raised `exc`: a store that is down is marked so and every
        item is left (for the spool); else the items are retried one at a time."""
        if _store_unavailable(exc):
            self._mark_down(exc)
            return 0, items
        log.warning("the store refused a batch of %d log records (%s); inserting them one "
                    "at a time", len(items), type(exc).__name__)
        return await self._insert_each(items)

    async def _insert_each(self, items: list[_Pending]) -> tuple[int, list[_Pending]]:
        inserted = 0
        for i, pending in enumerate(items):
            try:
                inserted += await _blocking(self._store.insert_many, [pending.record])
            except Exception as exc:
                if _store_unavailable(exc):
                    self._mark_down(exc)
                    return inserted, items[i:]
                await self._dead_letter([_refused_entry(pending, exc)], [pending])
            else:
                self._settle([pending], "stored")
        return inserted, []

    async def _append_spool(self, items: list[_Pending]) -> None:
        if not items:
            return
        lines = [p.line or "" for p in items]
        try:
            async with self._append_lock:
                await _blocking(_append, self._spool, lines)
        except Exception as exc:  # a full or failed disk: counted and logged, never raised
            self.dropped += len(items)
            log.error("could not spool %d log records (%s)", len(items), _cause(exc))
            self._settle(items, "dropped")
            return
        self.spooled += len(items)
        self._settle(items, "spooled")

    async def _dead_letter(self, entries: list[str], items: list[_Pending]) -> None:
        """Append `entries` (one per bad record or spool line) and settle `items`."""
        if not entries:
            return
        try:
            async with self._append_lock:
                await _blocking(_append, self.dead_letter_path, entries)
        except Exception as exc:
            self.dropped += len(entries)
            log.error("could not dead-letter %d log records (%s)", len(entries), _cause(exc))
            self._settle(items, "dropped")
            return
        self.dead_lettered += len(entries)
        log.warning("set %d log records aside in the dead-letter file; %d so far", len(entries),
                    self.dead_lettered)
        self._settle(items, "dead_lettered")

    async def _migrate(self) -> bool:
        try:
            await _blocking(self._store.migrate)
        except Exception as exc:  # a store down at start-up is retried by the replay task
            self._mark_down(exc)
            return False
        self._migrated = True
        return True

    async def _replay_once(self) -> None:
        try:
            await self._replay()
        except Exception as exc:  # e.g. the spool's disk failed; the next round tries again
            log.error("spool replay failed (%s)", _cause(exc))

    async def _replay(self) -> None:
        """Replay the spool into the store, then (with `adopt_spools`) the spools no process
        holds; with nothing replayed, probe a store that is down."""
        if not self._migrated and not await self._migrate():
            return
        replayed = await self._replay_spool(self._spool)
        if replayed is None:
            return
        if replayed:
            log.info("replayed %d spooled log records", replayed)
            self._mark_up()
        elif not self.store_up and await _blocking(self._store.ping):
            # An empty spool (an append that failed and was undone) proves nothing about the store.
            self._mark_up()
        if self._settings.adopt_spools and self.store_up:
            await self._adopt()

    async def _adopt(self) -> None:
        """Replay each other spool in the directory whose lock no process holds."""
        for spool in await _blocking(_other_spools, self._spool):
            lock_path = _lock_path(spool)
            lock = await _blocking(_try_lock, lock_path)
            if lock is None:
                continue  # its replica is alive and replays it itself
            try:
                replayed = await self._replay_spool(spool)
            finally:
                _unlock(lock_path, lock)
            if replayed:
                log.info("adopted %d log records from %s, a spool no process held", replayed,
                         spool.name)
            if replayed is None:
                return  # the store went down; the next round goes on

    async def _replay_spool(self, spool: Path) -> int | None:
        """Replay one spool (the `.replaying` it left first) and delete it: the records inserted,
        or None when the store failed part way (the file stays; the next round starts it over,
        idempotently)."""
        replaying = _replaying(spool)
        async with self._append_lock:
            claimed = await _blocking(_claim, spool, replaying)
        if not claimed:
            return 0
        offset = replayed = 0
        while True:
            batch, offset, unreadable = await _blocking(
                _read_batch, replaying, offset, self._settings.batch_size
            )
            # Lines torn by a crash mid-append, or not a record: kept aside, never retried.
            await self._dead_letter([_unreadable_entry(line) for line in unreadable], [])
            if not batch:
                break
            # Rows in id order: two writers replaying spools that share records then wait on
            # each other's inserts in one order, never in a cycle (a deadlock).
            batch.sort(key=lambda pending: pending.record.id)
            inserted, left = await self._insert(batch)
            replayed += inserted
            self.replayed += inserted
            if left:
                return None
        await _blocking(_remove, replaying)
        return replayed

    def _mark_down(self, exc: Exception) -> None:
        if self.store_up:
            log.warning("log store unavailable (%s); spooling to disk", _cause(exc))
        self.store_up = False

    def _mark_up(self) -> None:
        if not self.store_up:
            log.info("log store available again")
        self.store_up = True


def _store_unavailable(exc: Exception) -> bool:
    """Whether `exc` says the store cannot take writes now (spool, retry later), rather than that
    the records are bad (find and set aside the bad one)."""
    if isinstance(exc, DBAPIError):
        sqlstate = getattr(exc.orig, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate[:2] in _RECORD_SQLSTATES:
            return False
        return exc.connection_invalidated or isinstance(
            exc, OperationalError | InterfaceError | InternalError)
    return isinstance(exc, OSError | PoolTimeoutError | DisconnectionError)


def _cause(exc: BaseException) -> str:
    """What a log line may say about `exc`: its class, and an OS error's errno name (`ENOSPC`),
    never its message, which can quote a record."""
    code = errno.errorcode.get(exc.errno or 0) if isinstance(exc, OSError) else None
    return f"{type(exc).__name__} {code}" if code else type(exc).__name__


async def _blocking(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on a daemon thread: unlike `asyncio.to_thread`'s pool, a call that never
    returns (a hung database) cannot keep the process from exiting."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():  # the caller stopped waiting
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    def run() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (fn(*args), None)
        except BaseException as exc:  # handed to the awaiting task, which decides
            outcome = (None, exc)
        with contextlib.suppress(RuntimeError):  # the loop closed while this thread ran
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name="log-writer-io", daemon=True).start()
    return await future


def _serialise(record: TurnRecord) -> str:
    """The record as one strict JSON line (pydantic writes NaN and infinities as null, which
    Postgres would refuse as numbers; `allow_nan=False` holds that)."""
    return json.dumps(record.model_dump(mode="json"), allow_nan=False)


def _json_safe(value: Any, depth: int = 0) -> Any:
    """A copy of `value` that `json.dumps(allow_nan=False)` always encodes."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if depth >= _SAFE_DEPTH:
        return f"[cut: nested deeper than {_SAFE_DEPTH} levels]"
    if isinstance(value, BaseModel):
        return {name: _json_safe(getattr(value, name), depth + 1)
                for name in type(value).model_fields}
    if isinstance(value, dict):
        return {str(k): _json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v, depth + 1) for v in value]
    return f"[{type(value).__name__}]"


def _entry_head(record_id: str | None, stage: str, error: str) -> dict[str, Any]:
    return {"id": record_id, "stage": stage, "error": error,
            "dead_lettered_at": datetime.now(UTC).isoformat()}


def _dead_entry(pending: _Pending, stage: str, exc: Exception, *, keep_text: bool) -> str:
    """A dead-letter line: the record (redacted, JSON-safe), or only its metadata when its text
    may not be redacted."""
    record = pending.record
    kept = _json_safe(record) if keep_text and pending.redacted else {
        name: _json_safe(getattr(record, name)) for name in _METADATA}
    return json.dumps(_entry_head(record.id, stage, type(exc).__name__) | {"record": kept})


def _refused_entry(pending: _Pending, exc: Exception) -> str:
    """A dead-letter line for a prepared record the store refused (its JSON line kept whole)."""
    head = json.dumps(_entry_head(pending.record.id, "insert", type(exc).__name__))
    return f'{head[:-1]}, "record": {pending.line}}}'


def _unreadable_entry(line: str) -> str:
    return json.dumps(_entry_head(None, "replay", "unreadable spool line") | {"line": line})


def _fsync_dir(path: Path) -> None:
    # A created, renamed or removed file survives a power cut only once its directory is synced.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _append(path: Path, lines: list[str]) -> None:
    """Append JSON lines and fsync, all or nothing: a failed append (a full disk) is cut back off,
    so its records are counted once, as dropped, and never half-replayed. `json.dumps` escapes
    what a strict UTF-8 encoder would refuse (lone surrogates), so every line encodes."""
    data = "".join(line + "\n" for line in lines).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        # A crash mid-append leaves a torn last line; start on a new one so only it is lost.
        if size > 0 and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)
    if created:
        _fsync_dir(path.parent)


def _replaying(spool: Path) -> Path:
    return spool.with_name(spool.name + ".replaying")


def _lock_path(spool: Path) -> Path:
    return spool.with_name(spool.name + ".lock")


def _try_lock(path: Path) -> int | None:
    """A descriptor holding an exclusive `flock` on `path` (created if missing), or None when
    another open file holds it. The lock counts only if `path` is still the file locked: a holder
    may have removed it meanwhile (`_unlock`), and then the new file at `path` is tried."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        held = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            return fd
        os.close(fd)


def _unlock(path: Path, fd: int) -> None:
    """Remove the lock file while still holding it, then release it."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    os.close(fd)


def _other_spools(spool: Path) -> list[Path]:
    """The other spools in `spool`'s directory, named as spools even where only the
    `.replaying` file of one is left."""
    names = {path.name.removesuffix(".replaying") for path in spool.parent.iterdir()}
    return [spool.parent / name for name in sorted(names)
            if name.endswith(_SPOOL_SUFFIX) and not name.endswith(_DEAD_SUFFIX)
            and name != spool.name]


def _claim(spool: Path, replaying: Path) -> bool:
    """Whether there is a `.replaying` file to replay, renaming the spool to it if needed."""
    if replaying.exists():
        return True
    if not spool.exists():
        return False
    os.replace(spool, replaying)
    _fsync_dir(spool.parent)
    return True


def _read_batch(path: Path, offset: int, size: int) -> tuple[list[_Pending], int, list[str]]:
    """Up to `size` records from byte `offset`: (records, next offset, unreadable lines)."""
    records: list[_Pending] = []
    unreadable: list[str] = []
    with open(path, "rb") as spool:
        spool.seek(offset)
        while len(records) < size and (raw := spool.readline()):
            line = raw.decode(errors="replace").strip()
            if not line:
                continue
            try:
                record = TurnRecord.model_validate(json.loads(line))
            except Exception:  # torn, too deep for the parser, or not a record
                unreadable.append(line)
                continue
            records.append(_Pending(record, line=line, redacted=True))
        return records, spool.tell(), unreadable


def _remove(path: Path) -> None:
    path.unlink()
    _fsync_dir(path.parent)
