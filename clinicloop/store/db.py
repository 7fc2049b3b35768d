"""The conversation store: the `turns` table and the `Store` that writes and reads it.

SQLite in WAL mode is the embedded default; Postgres (`postgresql+psycopg://user@host/db`) serves
several gateway replicas. The schema belongs to the Alembic migrations in `migrations/`, never to
`create_all`: `Store.migrate()` runs `upgrade head` in code, with no alembic.ini. To work on the
migrations from a shell, use the ini shipped beside this file; the URL comes from `-x url=...` or
else from the clinicloop settings (`CLINICLOOP_STORE__URL`):

    alembic -c clinicloop/store/alembic.ini -x url=sqlite:///var/clinicloop.db upgrade head
    alembic -c clinicloop/store/alembic.ini -x url=sqlite:///var/clinicloop.db current
    alembic -c clinicloop/store/alembic.ini -x url=sqlite:///var/dev.db \\
        revision --autogenerate --rev-id 0002 -m "add scores"

A new table (e.g. verifier scores) is a model class on `Base` here plus the next numbered
migration; autogenerate against a database at head writes most of it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from alembic import command
from alembic.config import Config
from pydantic import BaseModel, Field
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    and_,
    create_engine,
    event,
    func,
    or_,
    select,
)
from sqlalchemy import text as sql
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from clinicloop.errors import UserError
from clinicloop.store.records import TurnRecord

_URL_HINT = "e.g. sqlite:///var/clinicloop.db or postgresql+psycopg://user@host/db"
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Any constant works; it only has to be the same for every replica that migrates.
_MIGRATE_LOCK_KEY = 0x636C696E  # "clin"
# Alembic runs migrations through module-level proxies: one migration at a time per process.
_MIGRATING = threading.Lock()


class Base(DeclarativeBase):
    """Every store table; Alembic's autogenerate compares the database against this metadata."""

    # Named constraints and indexes, so later migrations can refer to them on every backend.
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_name)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


_JSON = JSON().with_variant(postgresql.JSONB(), "postgresql")


class TurnRow(Base):
    """One served request, redacted: a `TurnRecord` plus choice 0's text for easy querying."""

    __tablename__ = "turns"

    id: Mapped[str] = mapped_column(String, primary_key=True)
    conversation_id: Mapped[str] = mapped_column(String, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    endpoint: Mapped[str] = mapped_column(String)
    model: Mapped[str] = mapped_column(String)
    model_version: Mapped[str] = mapped_column(String, index=True)
    api_key_id: Mapped[str | None] = mapped_column(String)
    messages: Mapped[list[dict[str, Any]]] = mapped_column(_JSON)
    choices: Mapped[list[dict[str, Any]]] = mapped_column(_JSON)
    params: Mapped[dict[str, Any]] = mapped_column(_JSON)
    response: Mapped[str | None] = mapped_column(Text)
    reasoning: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    # Explicit types: SQLAlchemy's default for `float` changed between versions (Float, Double).
    ttft_s: Mapped[float | None] = mapped_column(Float)
    e2e_s: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String)
    error: Mapped[str | None] = mapped_column(Text)
    # Migration 0003: `service` turns are the project's own traffic, never scored or trained on.
    origin: Mapped[str] = mapped_column(String, server_default="client")


class Store:
    """A SQLite or Postgres database holding `TurnRecord`s; every method is blocking."""

    def __init__(self, url: str, *, sqlite_busy_timeout_s: float = 5.0,
                 sqlite_synchronous: Literal["FULL", "NORMAL"] = "NORMAL") -> None:
        try:
            parsed = make_url(url)
        except ArgumentError:
            raise UserError(f"store URL {url!r} is not a URL: {_URL_HINT}") from None
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            _make_parent_dir(parsed)
            # `timeout` is SQLite's busy_timeout, set before the first statement on a connection
            # (a PRAGMA would come too late for the journal_mode one): how long a write waits
            # for another writer's lock before it fails.
            self.engine = create_engine(
                parsed, pool_pre_ping=True, connect_args={"timeout": sqlite_busy_timeout_s}
            )

            @event.listens_for(self.engine, "connect")
            def _pragmas(dbapi_connection: Any, _record: Any) -> None:
                cursor = dbapi_connection.cursor()
                # WAL: readers never block the writer. NORMAL is durable across app crashes but
                # may lose the last commits on power loss; FULL fsyncs the WAL at each commit, so
                # a committed row survives power loss too (the log writer's `ack` durability).
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute(f"PRAGMA synchronous={sqlite_synchronous}")
                cursor.close()

        elif self.dialect == "postgresql":
            # Pre-ping drops connections a server restart killed; the timeout bounds a hung host.
            self.engine = create_engine(
                parsed, pool_pre_ping=True, connect_args={"connect_timeout": 5}
            )
        else:
            raise UserError(f"store URL must be sqlite or postgresql, not {self.dialect!r}: "
                            f"{_URL_HINT}")

    def migrate(self) -> None:
        """Bring the schema to the newest migration (a no-op when it is there already)."""
        with _MIGRATING, self.engine.begin() as connection:
            if self.dialect == "postgresql":
                # Replicas starting together must not race to create the same tables.
                connection.execute(
                    sql("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATE_LOCK_KEY}
                )
            command.upgrade(alembic_config(connection), "head")

    def insert_many(self, records: Sequence[TurnRecord]) -> int:
        """Insert in one transaction, skipping ids already stored; returns the rows inserted."""
        if not records:
            return 0
        insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        statement = (
            insert(TurnRow).on_conflict_do_nothing(index_elements=["id"]).returning(TurnRow.id)
        )
        with self.engine.begin() as connection:
            return len(connection.execute(statement, [_to_row(r) for r in records]).all())

    def count(self) -> int:
        with self.engine.connect() as connection:
            return connection.execute(select(func.count()).select_from(TurnRow)).scalar_one()

    def get(self, turn_id: str) -> TurnRecord | None:
        with Session(self.engine) as session:
            row = session.get(TurnRow, turn_id)
            return None if row is None else _to_record(row)

    def list_turns(
        self,
        *,
        conversation_id: str | None = None,
        model_version: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[TurnRecord]:
        """Turns oldest first, optionally of one conversation or model version, or from `since`."""
        query = select(TurnRow).order_by(TurnRow.created_at, TurnRow.id).limit(limit)
        if conversation_id is not None:
            query = query.where(TurnRow.conversation_id == conversation_id)
        if model_version is not None:
            query = query.where(TurnRow.model_version == model_version)
        if since is not None:
            query = query.where(TurnRow.created_at >= _utc(since))
        with Session(self.engine) as session:
            return [_to_record(row) for row in session.scalars(query)]

    def ping(self) -> bool:
        """Whether the database answers a query."""
        try:
            with self.engine.connect() as connection:
                connection.execute(sql("SELECT 1"))
        except SQLAlchemyError:
            return False
        return True

    def dispose(self) -> None:
        """Close pooled connections; the store stays usable and reconnects on demand."""
        self.engine.dispose()

    # The verifier's tables.

    def get_rubric_set(self, prefix_hash: str) -> tuple[list[dict[str, Any]], str] | None:
        """A stored rubric's items and generator model."""
        with Session(self.engine) as session:
            row = session.get(RubricSetRow, prefix_hash)
            return None if row is None else (row.items, row.generator_model)

    def put_rubric_set(
        self, prefix_hash: str, items: list[dict[str, Any]], generator_model: str
    ) -> None:
        """Store a rubric unless one exists: the first rubric of a prefix is the one it keeps."""
        statement = _insert(self.dialect)(RubricSetRow).on_conflict_do_nothing(
            index_elements=["prefix_hash"]
        )
        row = {"prefix_hash": prefix_hash, "items": _clean(items),
               "generator_model": generator_model, "created_at": datetime.now(UTC)}
        with self.engine.begin() as connection:
            connection.execute(statement, [row])

    def get_verdict(self, verdict_key: str) -> StoredVerdict | None:
        query = select(VerdictRow).where(VerdictRow.verdict_key == verdict_key)
        with Session(self.engine) as session:
            row = session.scalars(query).first()
            return None if row is None else _verdict(row)

    def put_verdict(self, verdict: StoredVerdict) -> None:
        """Insert, or replace the verdict of the same key (a retried unparseable one)."""
        row = _clean(verdict.model_dump(mode="json")) | {"created_at": _utc(verdict.created_at)}
        self._upsert(VerdictRow, row, "verdict_key")

    def list_verdicts(self, turn_id: str) -> list[StoredVerdict]:
        query = select(VerdictRow).where(VerdictRow.turn_id == turn_id).order_by(VerdictRow.id)
        with Session(self.engine) as session:
            return [_verdict(row) for row in session.scalars(query)]

    def count_verdicts(self) -> int:
        with self.engine.connect() as connection:
            return connection.execute(select(func.count()).select_from(VerdictRow)).scalar_one()

    def put_turn_score(self, score: TurnScore) -> None:
        row = _clean(score.model_dump(mode="json")) | {"scored_at": _utc(score.scored_at)}
        self._upsert(TurnScoreRow, row, "turn_id")

    def _upsert(self, table: type[Base], row: dict[str, Any], key: str) -> None:
        statement = _insert(self.dialect)(table).values(row)
        statement = statement.on_conflict_do_update(
            index_elements=[key], set_={k: statement.excluded[k] for k in row if k != key}
        )
        with self.engine.begin() as connection:
            connection.execute(statement)

    def get_turn_score(self, turn_id: str) -> TurnScore | None:
        with Session(self.engine) as session:
            row = session.get(TurnScoreRow, turn_id)
            if row is None:
                return None
            columns = {c.key: getattr(row, c.key) for c in TurnScoreRow.__table__.columns}
            return TurnScore.model_validate({**columns, "scored_at": _utc(row.scored_at)})

    def turns_to_score(
        self,
        *,
        since: datetime | None = None,
        model_version: str | None = None,
        only_unscored: bool = True,
        after: tuple[datetime, str] | None = None,
        limit: int = 100,
    ) -> list[TurnRecord]:
        """Answered client turns (status ok, origin client) oldest first, from `since`, of one
        model version, without a score; `after` is the (created_at, id) of the last turn of the
        previous page."""
        query = _scorable_page(since, model_version, only_unscored, after)
        with Session(self.engine) as session:
            return [_to_record(row) for row in session.scalars(query.limit(limit))]

    def count_turns_to_score(
        self,
        *,
        since: datetime | None = None,
        model_version: str | None = None,
        only_unscored: bool = True,
    ) -> int:
        query = select(func.count()).select_from(
            _scorable(since, model_version, only_unscored).subquery()
        )
        with self.engine.connect() as connection:
            return connection.execute(query).scalar_one()


def alembic_config(connection: Connection | None = None) -> Config:
    """The Alembic config for the store's migrations, run on `connection` when one is given."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


def _make_parent_dir(url: URL) -> None:
    database = url.database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).parent.mkdir(parents=True, exist_ok=True)


def _utc(moment: datetime) -> datetime:
    # SQLite keeps no time zone: every timestamp is stored in UTC, and naive ones are UTC.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _clean(value: Any) -> Any:
    """Drop what no backend can store: NUL characters (Postgres) and lone surrogates (UTF-8).

    One such character in one request must not make a whole batch fail forever.
    """
    if isinstance(value, str):
        value = value.replace("\x00", "")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = value.encode("utf-8", "replace").decode("utf-8")
        return value
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    return value


def _to_row(record: TurnRecord) -> dict[str, Any]:
    row = _clean(record.model_dump(mode="json"))
    choices = row["choices"]
    row["created_at"] = _utc(record.created_at)
    row["response"] = choices[0]["content"] if choices else None
    row["reasoning"] = choices[0]["reasoning_content"] if choices else None
    return row


def _to_record(row: TurnRow) -> TurnRecord:
    columns = {c.key: getattr(row, c.key) for c in TurnRow.__table__.columns}
    return TurnRecord.model_validate({**columns, "created_at": _utc(row.created_at)})


# The verifier's tables (migration 0002): rubrics per conversation prefix, one verdict per rubric
# item of a logged turn, and each turn's score.


class RubricSetRow(Base):
    """The rubric of one conversation prefix (`verifier.generator.prefix_hash`)."""

    __tablename__ = "rubric_sets"

    prefix_hash: Mapped[str] = mapped_column(String, primary_key=True)
    items: Mapped[list[dict[str, Any]]] = mapped_column(_JSON)
    generator_model: Mapped[str] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class VerdictRow(Base):
    """One judge verdict on one rubric item of a turn; `verdict_key` is the judge's cache key."""

    __tablename__ = "verdicts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    turn_id: Mapped[str] = mapped_column(ForeignKey("turns.id", ondelete="CASCADE"), index=True)
    verdict_key: Mapped[str] = mapped_column(String, unique=True)
    item: Mapped[dict[str, Any]] = mapped_column(_JSON)
    judge_model: Mapped[str] = mapped_column(String)
    template: Mapped[str] = mapped_column(String)
    criteria_met: Mapped[bool | None] = mapped_column(Boolean)
    explanation: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class TurnScoreRow(Base):
    """A turn's rubric score (None: no positive item was graded) and its per-tag sub-scores."""

    __tablename__ = "turn_scores"

    turn_id: Mapped[str] = mapped_column(
        ForeignKey("turns.id", ondelete="CASCADE"), primary_key=True
    )
    score: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict[str, float]] = mapped_column(_JSON)
    n_items: Mapped[int] = mapped_column(Integer)
    n_unparseable: Mapped[int] = mapped_column(Integer)
    #: Migration 0005: negative (safety) items the judge found met; None: scored before 0005.
    red_flags: Mapped[int | None] = mapped_column(Integer)
    judge_model: Mapped[str] = mapped_column(String, index=True)
    scored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


# Shared state of several replicas and workers (migration 0004): the model registry, sticky
# conversation pins, and which scorer is grading which turn.


class RegistryStateRow(Base):
    """The model registry's whole state as one JSON document (`backends.registry`), with a
    revision that every write increments, so a replica notices a change by reading one number."""

    __tablename__ = "registry_state"

    name: Mapped[str] = mapped_column(String, primary_key=True)
    revision: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class StickyPinRow(Base):
    """A conversation's version: every replica routes the conversation's next turn there."""

    __tablename__ = "sticky_pins"

    conversation: Mapped[str] = mapped_column(String, primary_key=True)
    version: Mapped[str] = mapped_column(String, index=True)
    last_used: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class ScoreClaimRow(Base):
    """A turn a scorer (`verify score`) is grading, until `expires_at`: no other scorer takes
    it meanwhile; a scorer that died leaves it to the next once the claim expires."""

    __tablename__ = "score_claims"

    turn_id: Mapped[str] = mapped_column(
        ForeignKey("turns.id", ondelete="CASCADE"), primary_key=True
    )
    worker: Mapped[str] = mapped_column(String)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


# What people add (migration 0005): reviewers' labels on verdicts, their rubric edits and notes,
# and apps' feedback on responses. Rows are only ever added: the judge's verdicts stay as they
# were, and the latest row of a kind is what counts.


class VerdictLabelRow(Base):
    """A reviewer's answer to "does this reply meet this rubric item?" for one turn and item,
    next to (never over) the judge's verdict on it."""

    __tablename__ = "verdict_labels"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    turn_id: Mapped[str] = mapped_column(ForeignKey("turns.id", ondelete="CASCADE"), index=True)
    #: The item's identity whatever judged it (`verifier.judge.item_key`).
    item_key: Mapped[str] = mapped_column(String, index=True)
    item: Mapped[dict[str, Any]] = mapped_column(_JSON)
    criteria_met: Mapped[bool] = mapped_column(Boolean)
    #: The judge verdict the reviewer was looking at, if any.
    verdict_key: Mapped[str | None] = mapped_column(String)
    reviewer: Mapped[str] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class RubricEditRow(Base):
    """A reviewer's change to the rubric of a conversation prefix: `add` an item, `edit` the
    item `target_key` into `item`, or `remove` it."""

    __tablename__ = "rubric_edits"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    prefix_hash: Mapped[str] = mapped_column(String, index=True)
    turn_id: Mapped[str | None] = mapped_column(String)
    action: Mapped[str] = mapped_column(String)
    target_key: Mapped[str | None] = mapped_column(String)
    item: Mapped[dict[str, Any] | None] = mapped_column(_JSON)
    reviewer: Mapped[str] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ReviewNoteRow(Base):
    """A reviewer's note on a turn (redacted before it is stored)."""

    __tablename__ = "review_notes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    turn_id: Mapped[str] = mapped_column(ForeignKey("turns.id", ondelete="CASCADE"), index=True)
    conversation_id: Mapped[str] = mapped_column(String, index=True)
    body: Mapped[str] = mapped_column(Text)
    reviewer: Mapped[str] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class FeedbackRow(Base):
    """An app's rating of one response (`POST /v1/feedback`), comment redacted."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    turn_id: Mapped[str] = mapped_column(ForeignKey("turns.id", ondelete="CASCADE"), index=True)
    rating: Mapped[str] = mapped_column(String)
    comment: Mapped[str | None] = mapped_column(Text)
    api_key_id: Mapped[str | None] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class StoredVerdict(BaseModel):
    turn_id: str
    verdict_key: str
    item: dict[str, Any]
    judge_model: str
    template: str
    criteria_met: bool | None
    explanation: str = ""
    source: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class TurnScore(BaseModel):
    turn_id: str
    score: float | None
    metrics: dict[str, float] = Field(default_factory=dict)
    n_items: int
    n_unparseable: int = 0
    red_flags: int | None = None
    judge_model: str
    scored_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


def _insert(dialect: str) -> Any:
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


def _verdict(row: VerdictRow) -> StoredVerdict:
    columns = {c.key: getattr(row, c.key) for c in VerdictRow.__table__.columns if c.key != "id"}
    return StoredVerdict.model_validate({**columns, "created_at": _utc(row.created_at)})


def _scorable(since: datetime | None, model_version: str | None, only_unscored: bool) -> Any:
    query = select(TurnRow).where(
        TurnRow.status == "ok", TurnRow.response.is_not(None), TurnRow.origin == "client"
    )
    if since is not None:
        query = query.where(TurnRow.created_at >= _utc(since))
    if model_version is not None:
        query = query.where(TurnRow.model_version == model_version)
    if only_unscored:
        query = query.outerjoin(TurnScoreRow, TurnScoreRow.turn_id == TurnRow.id).where(
            TurnScoreRow.turn_id.is_(None)
        )
    return query


def _scorable_page(since: datetime | None, model_version: str | None, only_unscored: bool,
                   after: tuple[datetime, str] | None) -> Any:
    """`turns_to_score`'s query without its limit (`store.claims` adds to it)."""
    query = _scorable(since, model_version, only_unscored).order_by(TurnRow.created_at, TurnRow.id)
    if after is not None:
        moment = _utc(after[0])
        query = query.where(
            or_(
                TurnRow.created_at > moment,
                and_(TurnRow.created_at == moment, TurnRow.id > after[1]),
            )
        )
    return query
