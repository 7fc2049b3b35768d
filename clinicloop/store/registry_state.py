"""State that several gateway replicas share through the store: the model registry's document and
the sticky conversation pins.

`RegistryStateTable` keeps one row of `registry_state` per registry name: the registry's whole
state as JSON text and a revision that every write increments, so a replica notices a change by
reading one number. A write is a read-modify-write in one transaction with the row locked
(`SELECT ... FOR UPDATE` on Postgres; on SQLite the transaction takes the database's write lock
up front with `BEGIN IMMEDIATE`), so concurrent writers on any replica or job lose nothing.

`StickyPins` maps a conversation to the version it began on, so its next turn goes there on
whichever replica it lands. The first replica to pin a conversation wins; the others read its
choice back. A pin idle longer than the TTL is free to be replaced.

This layer knows nothing of what the JSON holds (`backends/registry.py` does). Every method is
blocking: async callers run them in a thread.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from datetime import UTC, datetime
from typing import TypeVar

from sqlalchemy import case, delete, select, update

from clinicloop.store.db import RegistryStateRow, StickyPinRow, Store, _insert

T = TypeVar("T")


class RegistryStateTable:
    """The `registry_state` row named `name`."""

    def __init__(self, store: Store, name: str = "default") -> None:
        self.store = store
        self.name = name

    def revision(self) -> int | None:
        """The row's revision (None: no row yet): cheap enough to poll."""
        query = select(RegistryStateRow.revision).where(RegistryStateRow.name == self.name)
        with self.store.engine.connect() as connection:
            return connection.execute(query).scalar_one_or_none()

    def read(self) -> str | None:
        query = select(RegistryStateRow.state).where(RegistryStateRow.name == self.name)
        with self.store.engine.connect() as connection:
            return connection.execute(query).scalar_one_or_none()

    def create(self, state: str) -> bool:
        """Insert the row with `state` unless it exists; whether this call inserted it."""
        statement = _insert(self.store.dialect)(RegistryStateRow).on_conflict_do_nothing(
            index_elements=["name"]).returning(RegistryStateRow.name)
        row = {"name": self.name, "revision": 1, "state": state, "updated_at": datetime.now(UTC)}
        with self.store.engine.begin() as connection:
            return connection.execute(statement, [row]).first() is not None

    def update(self, change: Callable[[str], tuple[str, T]]) -> T:
        """Read the state, call `change(state) -> (new state, result)` and write the new state,
        all with the row locked; returns the result. The revision moves only when the state
        changed. If `change` raises, nothing is written. `LookupError` when there is no row."""
        with self.store.engine.connect() as connection:
            if self.store.dialect == "sqlite":
                # pysqlite would begin lazily at the first write, after the read: take the write
                # lock before reading instead.
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            row = connection.execute(
                select(RegistryStateRow.revision, RegistryStateRow.state)
                .where(RegistryStateRow.name == self.name).with_for_update()
            ).one_or_none()
            if row is None:
                raise LookupError(f"no registry state named {self.name!r}")
            new, result = change(row.state)
            if new != row.state:
                connection.execute(
                    update(RegistryStateRow).where(RegistryStateRow.name == self.name).values(
                        revision=row.revision + 1, state=new, updated_at=datetime.now(UTC)))
            connection.commit()
        return result


class StickyPins:
    """The `sticky_pins` table: which version each conversation is served by."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def claim(self, conversation: str, version: str, now: datetime, ttl_s: float) -> str:
        """Pin `conversation` to `version` unless it is pinned already (and used within
        `ttl_s`), marking it used now; returns the version it is pinned to, which is the
        winner's when replicas race."""
        insert = _insert(self.store.dialect)
        statement = insert(StickyPinRow).values(
            conversation=conversation, version=version, last_used=now)
        # One statement: insert, or keep the live pin (replace an expired one), and read back.
        statement = statement.on_conflict_do_update(
            index_elements=["conversation"],
            set_={"last_used": statement.excluded.last_used,
                  "version": case((StickyPinRow.last_used < _ago(now, ttl_s),
                                   statement.excluded.version), else_=StickyPinRow.version)},
        ).returning(StickyPinRow.version)
        with self.store.engine.begin() as connection:
            return connection.execute(statement).scalar_one()

    def touch(self, conversations: Collection[str], now: datetime) -> None:
        """Mark pins used now, so they do not expire while their conversations go on."""
        if not conversations:
            return
        with self.store.engine.begin() as connection:
            connection.execute(update(StickyPinRow).where(
                StickyPinRow.conversation.in_(conversations)).values(last_used=now))

    def unpin(self, version: str) -> int:
        """Drop every pin to `version` (taken out of service); returns how many."""
        with self.store.engine.begin() as connection:
            return connection.execute(
                delete(StickyPinRow).where(StickyPinRow.version == version)).rowcount

    def expire(self, now: datetime, ttl_s: float) -> int:
        """Drop pins unused for `ttl_s`; returns how many."""
        with self.store.engine.begin() as connection:
            return connection.execute(
                delete(StickyPinRow).where(StickyPinRow.last_used < _ago(now, ttl_s))).rowcount


def _ago(now: datetime, seconds: float) -> datetime:
    return datetime.fromtimestamp(now.timestamp() - seconds, UTC)
