"""The store on SQLite and Postgres: migrations, idempotent inserts, readers."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from clinicloop.store.db import Base, Store, alembic_config
from tests.conftest import free_port
from tests.store.conftest import make_turn


def test_migrate_creates_the_schema_on_a_fresh_sqlite_file(tmp_path):
    path = tmp_path / "not" / "yet" / "there.db"
    store = Store(f"sqlite:///{path}")
    store.migrate()
    store.migrate()  # a second run finds nothing to do
    store.dispose()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(head,)]
    schema = inspect(Store(f"sqlite:///{path}").engine)
    assert {"turns", "alembic_version"} <= set(schema.get_table_names())
    columns = {c["name"] for c in schema.get_columns("turns")}
    assert set(make_turn(0).model_dump()) | {"response", "reasoning"} == columns
    assert {i["name"] for i in schema.get_indexes("turns")} == {
        "ix_turns_conversation_id", "ix_turns_created_at", "ix_turns_model_version",
    }


def test_migrations_match_the_models_and_form_one_chain(store):
    assert len(ScriptDirectory.from_config(alembic_config()).get_heads()) == 1
    with store.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    # Down to nothing and back up: every migration's downgrade works.
    with store.engine.begin() as connection:
        command.downgrade(alembic_config(connection), "base")
        assert "turns" not in inspect(connection).get_table_names()
        command.upgrade(alembic_config(connection), "head")
    assert store.count() == 0


def test_insert_many_is_idempotent_by_id(store):
    first = [make_turn(i) for i in range(3)]
    assert store.insert_many(first) == 3
    more = [make_turn(i) for i in range(3, 5)]
    assert store.insert_many(first + more + more[:1]) == 2
    assert store.insert_many([]) == 0
    assert store.count() == 5
    assert store.get(first[1].id) == first[1]
    assert store.get("missing") is None
    with store.engine.connect() as connection:
        response, reasoning = connection.execute(
            text("SELECT response, reasoning FROM turns WHERE id = :id"), {"id": first[0].id}
        ).one()
    assert (response, reasoning) == (first[0].response, first[0].reasoning)


def test_list_turns_filters_and_orders_oldest_first(store):
    start = datetime(2025, 3, 1, 12, tzinfo=UTC)
    turns = [
        make_turn(i, conversation_id=f"conv-{i % 2}", model_version=f"v{i % 3}").model_copy(
            update={"created_at": start + timedelta(minutes=i)}
        )
        for i in range(6)
    ]
    store.insert_many(list(reversed(turns)))
    assert [t.id for t in store.list_turns()] == [t.id for t in turns]
    assert [t.id for t in store.list_turns(conversation_id="conv-1")] == [
        turns[1].id, turns[3].id, turns[5].id,
    ]
    assert [t.id for t in store.list_turns(model_version="v0")] == [turns[0].id, turns[3].id]
    # A naive `since` is UTC, like every stored timestamp.
    since = (start + timedelta(minutes=4)).replace(tzinfo=None)
    assert [t.id for t in store.list_turns(since=since)] == [turns[4].id, turns[5].id]
    assert len(store.list_turns(limit=2)) == 2
    assert store.list_turns()[0].created_at == start


def test_text_no_backend_can_store_is_cleaned_not_fatal(store):
    turn = make_turn(0).model_copy(
        update={"messages": [{"role": "user", "content": "nul\x00 and lone \ud800 surrogate"}]}
    )
    assert store.insert_many([turn]) == 1
    assert store.get(turn.id).messages[0]["content"] == "nul and lone ? surrogate"


def test_ping(store):
    assert store.ping()
    nobody_listens = Store(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none")
    assert not nobody_listens.ping()


def test_unsupported_url_is_refused():
    with pytest.raises(ValueError, match="sqlite or postgresql"):
        Store("mysql://localhost/clinicloop")
