"""Work several processes share through the store: scorers' claims on turns, and advisory locks.

Claims (`score_claims`): a scorer takes a page of scorable turns in one transaction and grades
only those. A turn is claimable when it is scorable (`Store.turns_to_score`), in the scorer's
shard, and has no live claim (none, or one past its `expires_at`). On Postgres the candidates are
read `FOR UPDATE SKIP LOCKED`, so concurrent scorers take different turns instead of queueing on
the same ones; on SQLite the transaction starts as a write (`BEGIN IMMEDIATE`), which serialises
claimers. Either way the claim rows are written with an upsert that only replaces an expired
claim, so a turn is never held by two scorers at once even if two candidate reads overlap.

A claim lasts `lease_s`: a scorer releases its claims once their turns are scored (the
`turn_scores` row then marks the turn done), and a killed scorer's claims pass to the next scorer
when they expire. The lease must outlast the grading of one page; a claim that expires while its
scorer is still grading may be taken, and the turn graded twice.

Shards (`--shard I/N`, e.g. one per pod of an Indexed Job) split turns by a stable hash of their
id: the first four bytes of its sha256, modulo N, computed in SQL (Postgres' `sha256`, a Python
function registered on SQLite connections) so a claim's `LIMIT` counts only the shard's turns.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, Connection, cast, delete, func, select
from sqlalchemy import text as sql
from sqlalchemy.exc import SQLAlchemyError

from clinicloop.store.db import (
    ScoreClaimRow,
    Store,
    TurnRow,
    _insert,
    _scorable_page,
    _to_record,
)
from clinicloop.store.records import TurnRecord

# Advisory lock keys, beside the migrations' (`db._MIGRATE_LOCK_KEY`, "clin"); any constants
# work as long as every process uses the same and no two locks share one.
REFRESH_LOCK_KEY = 0x636C7266  # "clrf": one `rl refresh` at a time
_SQLITE_BUCKET = "clinicloop_shard_bucket"


def default_worker() -> str:
    """A scorer's name when none is given: `<hostname>-<pid>` (a pod name in Kubernetes)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def shard_bucket(turn_id: str) -> int:
    """The stable hash shards are cut from: the first four bytes of the id's sha256."""
    return int.from_bytes(hashlib.sha256(turn_id.encode()).digest()[:4], "big")


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`: the turns whose `shard_bucket` is `index` modulo `count`."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: need N >= 1 and 0 <= I < N")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`I/N`, e.g. `0/4`; ValueError with the accepted form otherwise."""
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ValueError(f"{text!r} is not I/N, e.g. 0/4") from None
        return cls(index, count)

    def holds(self, turn_id: str) -> bool:
        return shard_bucket(turn_id) % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def claim_turns(
    store: Store,
    worker: str,
    *,
    lease_s: float,
    limit: int,
    shard: Shard | None = None,
    since: datetime | None = None,
    model_version: str | None = None,
    only_unscored: bool = True,
    after: tuple[datetime, str] | None = None,
) -> list[TurnRecord]:
    """Claim up to `limit` claimable turns for `worker` until now + `lease_s`, oldest first
    (after `after`, the last turn of the previous page, as in `Store.turns_to_score`)."""
    now = datetime.now(UTC)
    query = _claimable(store, now, shard, since, model_version, only_unscored, after).limit(limit)
    if store.dialect == "postgresql":
        query = query.with_for_update(skip_locked=True, of=TurnRow)
    with store.engine.connect() as connection:
        _begin_claim(store, connection)
        turns = [_to_record(row) for row in connection.execute(query).all()]
        if not turns:
            connection.rollback()
            return []
        upsert = _insert(store.dialect)(ScoreClaimRow).values(
            [{"turn_id": t.id, "worker": worker, "expires_at": now + timedelta(seconds=lease_s)}
             for t in turns])
        upsert = upsert.on_conflict_do_update(
            index_elements=["turn_id"],
            set_={"worker": upsert.excluded.worker, "expires_at": upsert.excluded.expires_at},
            where=ScoreClaimRow.expires_at <= now,  # only an expired claim is taken over
        ).returning(ScoreClaimRow.turn_id)
        claimed = set(connection.execute(upsert).scalars())
        connection.commit()
    return [t for t in turns if t.id in claimed]


def count_claimable(
    store: Store,
    *,
    shard: Shard | None = None,
    since: datetime | None = None,
    model_version: str | None = None,
    only_unscored: bool = True,
) -> int:
    """How many turns `claim_turns` could claim now (for a progress bar: others may take some)."""
    query = _claimable(store, datetime.now(UTC), shard, since, model_version, only_unscored, None)
    with store.engine.connect() as connection:
        _register_bucket(store, connection)
        return connection.execute(select(func.count()).select_from(query.subquery())).scalar_one()


def release_claims(store: Store, worker: str, turn_ids: list[str]) -> None:
    """Drop `worker`'s claims on `turn_ids` (a claim another worker took over stays)."""
    if not turn_ids:
        return
    statement = delete(ScoreClaimRow).where(
        ScoreClaimRow.worker == worker, ScoreClaimRow.turn_id.in_(turn_ids))
    with store.engine.begin() as connection:
        connection.execute(statement)


@contextmanager
def try_advisory_lock(store: Store, key: int) -> Iterator[bool]:
    """Try to take Postgres' session advisory lock `key` and hold it for the block; yields
    whether it was taken (False: another session holds it). The lock lives on a connection of
    its own, in autocommit (no transaction stays open however long the block runs), and is
    released when the block ends, raising or not; if the process dies, Postgres drops it with
    the session."""
    if store.dialect != "postgresql":
        raise ValueError(f"advisory locks need Postgres, not {store.dialect}")
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        taken = connection.execute(
            sql("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar_one()
        try:
            yield bool(taken)
        finally:
            if taken:
                # Unlocked by hand: the connection goes back to the pool, its session lives on.
                # If the connection broke, its session and the lock are gone already.
                with suppress(SQLAlchemyError):
                    connection.execute(sql("SELECT pg_advisory_unlock(:key)"), {"key": key})


def _claimable(store: Store, now: datetime, shard: Shard | None, since: datetime | None,
               model_version: str | None, only_unscored: bool,
               after: tuple[datetime, str] | None) -> Any:
    live = select(ScoreClaimRow.turn_id).where(
        ScoreClaimRow.turn_id == TurnRow.id, ScoreClaimRow.expires_at > now).exists()
    query = _scorable_page(since, model_version, only_unscored, after).where(~live)
    if shard is not None and shard.count > 1:
        query = query.where(_bucket(store) % shard.count == shard.index)
    return query


def _bucket(store: Store) -> Any:
    """`shard_bucket(turns.id)` in SQL."""
    if store.dialect == "sqlite":
        return getattr(func, _SQLITE_BUCKET)(TurnRow.id)
    digest = func.sha256(func.convert_to(TurnRow.id, "UTF8"))
    bucket: Any = cast(func.get_byte(digest, 0), BigInteger)
    for i in range(1, 4):
        bucket = bucket * 256 + func.get_byte(digest, i)
    return bucket


def _register_bucket(store: Store, connection: Connection) -> None:
    if store.dialect == "sqlite":
        connection.connection.driver_connection.create_function(  # type: ignore[union-attr]
            _SQLITE_BUCKET, 1, shard_bucket, deterministic=True)


def _begin_claim(store: Store, connection: Connection) -> None:
    _register_bucket(store, connection)
    if store.dialect == "sqlite":
        # Take the write lock before reading, so two claimers never read the same candidates.
        connection.exec_driver_sql("BEGIN IMMEDIATE")
