"""Store test fixtures: log records that carry PHI (the Postgres server fixture is in
tests/postgres.py, shared with the gateway's tests)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from clinicloop.store.db import Store
from clinicloop.store.records import LoggedChoice, TurnRecord
from tests.postgres import PostgresServer, pg_server, pg_url  # noqa: F401  (fixtures)

# Every record from `make_turn` contains these; none may reach the database or the spool.
PHI = ["Maria", "Lopez", "maria.lg@example.com", "555-201-4477", "03/14/1962", "00482913"]


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path) -> Iterator[Store]:
    """A migrated store, once on SQLite and once on a real Postgres."""
    url = (f"sqlite:///{tmp_path / 'store.db'}" if request.param == "sqlite"
           else request.getfixturevalue("pg_url"))
    store = Store(url)
    store.migrate()
    yield store
    store.dispose()


def make_turn(i: int, conversation_id: str = "conv-1", model_version: str = "v1") -> TurnRecord:
    return TurnRecord(
        conversation_id=conversation_id,
        endpoint="chat.completions",
        model="tiny",
        model_version=model_version,
        messages=[
            {"role": "system", "content": "You are a careful clinician."},
            {
                "role": "user",
                "content": f"My name is Maria Lopez, DOB 03/14/1962, MRN 00482913. Email "
                f"maria.lg@example.com or call 555-201-4477. Message {i}: chest pain for 3 days.",
            },
        ],
        choices=[
            LoggedChoice(
                index=0,
                content=f"Ms. Lopez, chest pain for 3 days needs an ECG today (reply {i}).",
                reasoning_content="Her name is Maria Lopez; at 62, rule out ACS.",
                finish_reason="stop",
            )
        ],
        params={"temperature": 0.0, "max_tokens": 64},
        prompt_tokens=40 + i,
        completion_tokens=12,
        ttft_s=0.05,
        e2e_s=0.4,
    )
