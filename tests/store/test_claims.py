"""Scorers' claims on turns and the store's advisory lock, on SQLite and Postgres: claimed turns
are skipped by other scorers, expired claims are taken over, shards split the turns once, racing
claimers never share a turn, Postgres skips rows another claimer has locked."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, text, update

from clinicloop.store.claims import (
    Shard,
    claim_turns,
    count_claimable,
    release_claims,
    try_advisory_lock,
)
from clinicloop.store.db import ScoreClaimRow, Store, TurnRow, TurnScore
from tests.store.conftest import make_turn

LEASE_S = 900.0
T0 = datetime(2025, 3, 1, 12, tzinfo=UTC)


def log(db: Store, n: int) -> list[str]:
    """`n` scorable turns, one minute apart; their ids oldest first."""
    turns = [make_turn(i).model_copy(update={"created_at": T0 + timedelta(minutes=i)})
             for i in range(n)]
    db.insert_many(turns)
    return [t.id for t in turns]


def ids(turns) -> list[str]:
    return [t.id for t in turns]


def claims(db: Store) -> dict[str, str]:
    with db.engine.connect() as connection:
        return dict(connection.execute(select(ScoreClaimRow.turn_id, ScoreClaimRow.worker)).all())


def test_a_claimed_turn_is_skipped_until_released_and_a_scored_one_for_good(store):  # noqa: F811
    turn_ids = log(store, 5)
    assert ids(claim_turns(store, "a", lease_s=LEASE_S, limit=2)) == turn_ids[:2]
    assert ids(claim_turns(store, "b", lease_s=LEASE_S, limit=10)) == turn_ids[2:]
    assert claims(store) == {**dict.fromkeys(turn_ids[:2], "a"), **dict.fromkeys(turn_ids[2:], "b")}
    assert claim_turns(store, "c", lease_s=LEASE_S, limit=10) == []
    assert count_claimable(store) == 0

    store.put_turn_score(TurnScore(turn_id=turn_ids[0], score=1.0, n_items=1, judge_model="m"))
    release_claims(store, "a", turn_ids[:2])
    release_claims(store, "c", turn_ids[2:])  # not c's: b keeps them
    assert claims(store) == dict.fromkeys(turn_ids[2:], "b")
    # The scored turn is done; the other one a released is free again.
    assert ids(claim_turns(store, "c", lease_s=LEASE_S, limit=10)) == [turn_ids[1]]


def test_an_expired_claim_is_taken_over_and_its_late_release_keeps_the_new_one(store):  # noqa: F811
    turn_ids = log(store, 3)
    claim_turns(store, "killed", lease_s=LEASE_S, limit=3)
    # The killed scorer's lease runs out on two of its turns.
    with store.engine.begin() as connection:
        connection.execute(update(ScoreClaimRow).where(ScoreClaimRow.turn_id.in_(turn_ids[:2]))
                           .values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    assert count_claimable(store) == 2
    assert ids(claim_turns(store, "next", lease_s=LEASE_S, limit=10)) == turn_ids[:2]
    release_claims(store, "killed", turn_ids)  # back after all: only its live claim goes
    assert claims(store) == dict.fromkeys(turn_ids[:2], "next")


def test_shards_split_the_turns_once_as_the_python_hash_does(store):  # noqa: F811
    turn_ids = log(store, 40)
    shards = [Shard(i, 3) for i in range(3)]
    assert sum(count_claimable(store, shard=s) for s in shards) == 40
    taken = [ids(claim_turns(store, f"w{s.index}", lease_s=LEASE_S, limit=100, shard=s))
             for s in shards]
    for shard, mine in zip(shards, taken, strict=True):
        assert mine == [t for t in turn_ids if shard.holds(t)] and mine  # SQL hash == Python's
    assert sorted(sum(taken, [])) == sorted(turn_ids)
    assert ids(claim_turns(store, "x", lease_s=LEASE_S, limit=100, shard=Shard(0, 1))) == []


def test_racing_claimers_never_share_a_turn(store):  # noqa: F811
    turn_ids = log(store, 24)

    def drain(worker: str) -> list[str]:
        mine: list[str] = []
        while page := claim_turns(store, worker, lease_s=LEASE_S, limit=2):
            mine += ids(page)
        return mine

    with ThreadPoolExecutor(4) as pool:
        taken = list(pool.map(drain, ["a", "b", "c", "d"]))
    assert sorted(sum(taken, [])) == sorted(turn_ids)  # all claimed, none twice
    assert claims(store) == {t: w for w, mine in zip("abcd", taken, strict=True) for t in mine}


def test_postgres_claims_skip_turns_another_claimer_has_locked(pg_url):
    db = Store(pg_url)
    db.migrate()
    turn_ids = log(db, 4)
    with db.engine.connect() as other:  # another claimer, mid-transaction
        other.execute(select(TurnRow.id).where(TurnRow.id.in_(turn_ids[:2])).with_for_update())
        assert ids(claim_turns(db, "a", lease_s=LEASE_S, limit=4)) == turn_ids[2:]
        other.rollback()
    assert ids(claim_turns(db, "a", lease_s=LEASE_S, limit=4)) == turn_ids[:2]
    db.dispose()


@pytest.mark.parametrize("text_, message", [
    ("1/3", None), ("0/1", None), ("3/3", "0 <= I < N"), ("-1/2", "0 <= I < N"),
    ("0/0", "N >= 1"), ("1", "not I/N"), ("a/b", "not I/N"), ("1/2/3", "not I/N")])
def test_shard_parse(text_, message):
    if message is None:
        assert str(Shard.parse(text_)) == text_
    else:
        with pytest.raises(ValueError, match=message):
            Shard.parse(text_)


def test_advisory_lock_is_exclusive_and_released_on_error(pg_url):
    db, other = Store(pg_url), Store(pg_url)
    key = 12345
    with try_advisory_lock(db, key) as taken:
        assert taken
        with try_advisory_lock(other, key) as second:
            assert not second
    with pytest.raises(RuntimeError, match="boom"), try_advisory_lock(db, key) as taken:
        assert taken
        raise RuntimeError("boom")
    with try_advisory_lock(other, key) as taken:
        assert taken  # released by the error above
    with db.engine.connect() as connection:  # none left on the pooled connections
        assert connection.execute(text("SELECT count(*) FROM pg_locks WHERE "
                                       "locktype = 'advisory'")).scalar_one() == 0
    db.dispose()
    other.dispose()
    with pytest.raises(ValueError, match="Postgres"), try_advisory_lock(
            Store("sqlite://"), key):
        pass
