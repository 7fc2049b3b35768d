"""The shared registry row and sticky pins on SQLite and Postgres: concurrent read-modify-writes
lose nothing, the revision moves only on a change, a failed change writes nothing; the first pin
of a conversation wins, live pins are kept and expired ones replaced or deleted."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from clinicloop.store.db import Store
from clinicloop.store.registry_state import RegistryStateTable, StickyPins


def _add(name: str) -> Callable[[str], tuple[str, int]]:
    def change(text: str) -> tuple[str, int]:
        names = json.loads(text)
        names.append(name)
        return json.dumps(names), len(names)
    return change


def test_concurrent_updates_lose_nothing_and_the_revision_counts_changes(store):
    table = RegistryStateTable(store)
    assert table.revision() is None and table.read() is None
    with pytest.raises(LookupError):
        table.update(_add("x"))
    assert table.create("[]") and not table.create('["ignored"]')
    assert (table.revision(), table.read()) == (1, "[]")

    # Four threads on their own connections, each appending 10 names read-modify-write.
    others = [RegistryStateTable(Store(store.engine.url.render_as_string(False)))
              for _ in range(4)]

    def writer(n: int) -> None:
        for i in range(10):
            others[n].update(_add(f"{n}-{i}"))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    names = json.loads(table.read() or "")
    assert sorted(names) == sorted(f"{n}-{i}" for n in range(4) for i in range(10))
    assert table.revision() == 41

    # No change, no new revision; a change that raises writes nothing.
    assert table.update(lambda text: (text, "same")) == "same"
    assert table.revision() == 41

    def broken(text: str) -> tuple[str, None]:
        raise ValueError("refused")
    with pytest.raises(ValueError):
        table.update(broken)
    assert table.revision() == 41 and len(json.loads(table.read() or "")) == 40
    for other in others:
        other.store.dispose()


def test_first_pin_wins_live_pins_are_kept_expired_ones_replaced(store):
    pins, other = StickyPins(store), StickyPins(store)
    now, ttl = datetime.now(UTC), 60.0
    assert pins.claim("c1", "v1", now, ttl) == "v1"
    assert other.claim("c1", "v2", now + timedelta(seconds=30), ttl) == "v1"  # read back
    # That claim marked it used at +30 s, so it is alive at +80 s; idle 61 s later it is free.
    assert other.claim("c1", "v2", now + timedelta(seconds=80), ttl) == "v1"
    assert other.claim("c1", "v2", now + timedelta(seconds=141), ttl) == "v2"

    # Touched pins survive expiry; the others go.
    later = now + timedelta(seconds=200)
    for conversation in ("c2", "c3", "c4"):
        pins.claim(conversation, "v3", now, ttl)
    pins.touch(["c2"], later)
    assert pins.expire(later + timedelta(seconds=2), ttl) == 3  # c1 (used at +141), c3, c4
    assert pins.claim("c2", "v9", later, ttl) == "v3"
    assert pins.claim("c3", "v9", later, ttl) == "v9"

    # A retired version's pins are dropped everywhere.
    assert pins.unpin("v3") == 1
    assert pins.claim("c2", "v4", later, ttl) == "v4"


def test_racing_claims_all_read_the_one_winner(store):
    url = store.engine.url.render_as_string(False)
    stores = [Store(url) for _ in range(4)]
    won: list[str] = []
    barrier = threading.Barrier(len(stores))

    def claim(n: int) -> None:
        barrier.wait()
        won.append(StickyPins(stores[n]).claim("raced", f"v{n}", datetime.now(UTC), 60.0))

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(won) == 4 and len(set(won)) == 1
    for s in stores:
        s.dispose()
