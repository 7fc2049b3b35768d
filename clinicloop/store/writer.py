"""Durable conversation logging off the request path: the gateway's `submit(record)` to the store.

`submit` only enqueues. A background task takes batches (up to `batch_size` records, or what arrived
within `flush_interval_s`), redacts them and inserts them from a worker thread. When an insert
fails, the batch is appended to a spool file (JSON lines, already redacted, fsynced) and new
batches go straight there until the store is back; when the in-memory queue is full, records are
spooled too, so none is dropped. Every `retry_interval_s` a replay task renames the spool to
`<spool>.replaying` (new appends start a fresh spool), inserts its records in batches and deletes
it. Inserts skip ids already stored, so a replay cut short by a crash is simply redone on the next
start and every record lands exactly once.

Logs carry counts and exception class names only: records hold conversations, and a driver's error
message can quote them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path

from clinicloop.config import StoreSettings
from clinicloop.store.db import Store
from clinicloop.store.records import TurnRecord
from clinicloop.store.redact import redact_record

log = logging.getLogger(__name__)


class LogWriter:
    """Batches, redacts and persists `TurnRecord`s; spools them to disk while the store is down.

    The counters are for metrics: `inserted` (rows written directly), `spooled` (records written
    to the spool), `replayed` (spooled records later written to the store), `dropped` (records
    lost: submitted after `close`, or the spool itself failed), `store_up`, `queue_depth`.
    """

    def __init__(self, store: Store, settings: StoreSettings) -> None:
        self._store = store
        self._settings = settings
        self._spool = Path(settings.spool_path)
        self._replaying = self._spool.with_name(self._spool.name + ".replaying")
        # None is the stop signal that `close` queues behind the last record.
        self._queue: asyncio.Queue[TurnRecord | None] = asyncio.Queue(settings.queue_size)
        self._overflow: list[TurnRecord] = []
        self._overflow_ready = asyncio.Event()
        self._spool_lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._migrated = False
        self._closed = False
        self.inserted = 0
        self.spooled = 0
        self.replayed = 0
        self.dropped = 0
        self.store_up = True

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize() + len(self._overflow)

    async def start(self) -> None:
        """Migrate the store if it answers, then start writing; a down store is retried later."""
        await self._migrate()
        self._tasks = [
            asyncio.create_task(self._flush_loop(), name="log-writer-flush"),
            asyncio.create_task(self._spill_loop(), name="log-writer-spill"),
            asyncio.create_task(self._replay_loop(), name="log-writer-replay"),
        ]

    def submit(self, record: TurnRecord) -> None:
        """Hand over one record; never blocks and never raises."""
        if self._closed:
            self.dropped += 1
            log.error("log record submitted after close; %d dropped so far", self.dropped)
            return
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            # The store can't keep up: the record goes to disk rather than away.
            self._overflow.append(record)
            self._overflow_ready.set()

    async def close(self) -> None:
        """Write out everything submitted (to the store, or to the spool if it is down)."""
        if self._closed:
            return
        if not self._tasks:  # records submitted to a writer never started still get written
            await self.start()
        self._closed = True
        await self._queue.put(None)
        self._stopping.set()
        self._overflow_ready.set()
        await asyncio.gather(*self._tasks)
        # One last replay, so a short outage leaves no spool behind a clean shutdown.
        await self._replay_once()
        await asyncio.to_thread(self._store.dispose)

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while (first := await self._queue.get()) is not None:
            batch = [first]
            deadline = loop.time() + self._settings.flush_interval_s
            stop = False
            while len(batch) < self._settings.batch_size:
                try:
                    async with asyncio.timeout_at(deadline):
                        record = await self._queue.get()
                except TimeoutError:
                    break
                if record is None:
                    stop = True
                    break
                batch.append(record)
            await self._write(batch)
            if stop:
                return

    async def _spill_loop(self) -> None:
        while True:
            await self._overflow_ready.wait()
            self._overflow_ready.clear()
            while self._overflow:
                batch, self._overflow = self._overflow, []
                await self._append_to_spool(await self._redacted(batch))
            if self._stopping.is_set():
                return

    async def _replay_loop(self) -> None:
        while True:
            await self._replay_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._settings.retry_interval_s)
                return

    async def _redacted(self, batch: list[TurnRecord]) -> list[TurnRecord]:
        if not self._settings.redact:
            return batch
        return await asyncio.to_thread(lambda: [redact_record(r) for r in batch])

    async def _write(self, batch: list[TurnRecord]) -> None:
        batch = await self._redacted(batch)
        # While the store is down only the replay task probes it; batches go straight to disk.
        if self.store_up:
            inserted = await self._insert(batch)
            if inserted is not None:
                self.inserted += inserted
                return
        await self._append_to_spool(batch)

    async def _insert(self, batch: list[TurnRecord]) -> int | None:
        """Rows inserted, or None (and the store marked down) if the store failed."""
        try:
            inserted = await asyncio.to_thread(self._store.insert_many, batch)
        except Exception as exc:  # whatever the store raised, the batch must survive it
            self._mark_down(exc)
            return None
        return inserted

    async def _migrate(self) -> bool:
        try:
            await asyncio.to_thread(self._store.migrate)
        except Exception as exc:  # a store down at start-up is retried by the replay task
            self._mark_down(exc)
            return False
        self._migrated = True
        return True

    async def _append_to_spool(self, batch: list[TurnRecord]) -> None:
        try:
            async with self._spool_lock:
                await asyncio.to_thread(_append, self._spool, batch)
        except OSError as exc:
            self.dropped += len(batch)
            log.error("could not spool %d log records (%s)", len(batch), type(exc).__name__)
            return
        self.spooled += len(batch)

    async def _replay_once(self) -> None:
        try:
            await self._replay()
        except OSError as exc:  # the spool's disk failed; the next round tries again
            log.error("spool replay failed (%s)", type(exc).__name__)

    async def _replay(self) -> None:
        """Replay the spool into the store; with no spool, probe a store that is down."""
        if not self._migrated and not await self._migrate():
            return
        async with self._spool_lock:
            claimed = await asyncio.to_thread(_claim, self._spool, self._replaying)
        if not claimed:
            if not self.store_up and await asyncio.to_thread(self._store.ping):
                self._mark_up()
            return
        offset = replayed = 0
        while True:
            batch, offset, unreadable = await asyncio.to_thread(
                _read_batch, self._replaying, offset, self._settings.batch_size
            )
            if unreadable:
                # Torn lines from a crash mid-append; what was readable is kept.
                self.dropped += unreadable
                log.warning("skipped %d unreadable spool lines", unreadable)
            if not batch:
                break
            inserted = await self._insert(batch)
            if inserted is None:
                return  # the file stays; the next attempt starts it over, idempotently
            replayed += inserted
            self.replayed += inserted
        await asyncio.to_thread(_remove, self._replaying)
        log.info("replayed %d spooled log records", replayed)
        self._mark_up()

    def _mark_down(self, exc: Exception) -> None:
        if self.store_up:
            log.warning("log store unavailable (%s); spooling to disk", type(exc).__name__)
        self.store_up = False

    def _mark_up(self) -> None:
        if not self.store_up:
            log.info("log store available again")
        self.store_up = True


def _fsync_dir(path: Path) -> None:
    # A created, renamed or removed file survives a power cut only once its directory is synced.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _append(path: Path, records: list[TurnRecord]) -> None:
    # json.dumps escapes lone surrogates that a strict UTF-8 encoder would refuse.
    data = "".join(json.dumps(r.model_dump(mode="json")) + "\n" for r in records).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    with open(path, "ab+") as spool:
        # A crash mid-append leaves a torn last line; start on a new one so only it is lost.
        if spool.seek(0, os.SEEK_END) > 0:
            spool.seek(-1, os.SEEK_END)
            if spool.read(1) != b"\n":
                data = b"\n" + data
        spool.write(data)
        spool.flush()
        os.fsync(spool.fileno())
    if created:
        _fsync_dir(path.parent)


def _claim(spool: Path, replaying: Path) -> bool:
    """Whether there is a `.replaying` file to replay, renaming the spool to it if needed."""
    if replaying.exists():
        return True
    if not spool.exists():
        return False
    os.replace(spool, replaying)
    _fsync_dir(spool.parent)
    return True


def _read_batch(path: Path, offset: int, size: int) -> tuple[list[TurnRecord], int, int]:
    """Up to `size` records from byte `offset`: (records, next offset, unreadable lines)."""
    records: list[TurnRecord] = []
    unreadable = 0
    with open(path, "rb") as spool:
        spool.seek(offset)
        while len(records) < size and (line := spool.readline()):
            if not line.strip():
                continue
            try:
                records.append(TurnRecord.model_validate(json.loads(line)))
            except ValueError:
                unreadable += 1
        return records, spool.tell(), unreadable


def _remove(path: Path) -> None:
    path.unlink()
    _fsync_dir(path.parent)
