"""Two real gateway replicas (`clinicloop serve`, tiny model on llama.cpp) on one real Postgres,
sharing the registry and sticky pins through it: concurrent load through both logs every turn
once; an activation or rollback made through either is served by the other within the follow
interval plus a load margin; a conversation keeps its version when its next turn lands on the
other replica; a store that goes down fails no request."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from clinicloop.store.db import Store
from tests.conftest import Server, start_server, stop_server, wait_until
from tests.postgres import PostgresServer, pg_server  # noqa: F401  (fixture)

CLIENT_KEY, ADMIN_KEY = "sk-replica-client", "sk-replica-admin"
FOLLOW_S = 0.3
# Loading the other tiny GGUF as a version takes well under a second; the rest is slack for two
# shared CPU cores.
LOAD_MARGIN_S = 3.0


@pytest.fixture(scope="module")
def cluster(pg_server: PostgresServer, tmp_path_factory, tiny_model  # noqa: F811
            ) -> Iterator[tuple[Server, Server, Store]]:
    url = pg_server.url(pg_server.create_database())
    env = {"CLINICLOOP_STORE__URL": url,
           "CLINICLOOP_REGISTRY__FOLLOW_INTERVAL_S": str(FOLLOW_S),
           "CLINICLOOP_ENGINE__MODEL_PATH": str(tiny_model.gguf_q8_0),
           "CLINICLOOP_ENGINE__SERVED_MODEL_NAME": tiny_model.name,
           "CLINICLOOP_ENGINE__N_THREADS": "1",
           "CLINICLOOP_SERVER__API_KEYS": f'["{CLIENT_KEY}"]',
           "CLINICLOOP_SERVER__ADMIN_KEYS": f'["{ADMIN_KEY}"]'}
    servers: list[Server] = []
    store = Store(url)
    try:
        for _ in range(2):  # each in its own directory: a spool of its own
            servers.append(start_server(tmp_path_factory.mktemp("replica"), env))
        yield servers[0], servers[1], store
    finally:
        for server in servers:
            stop_server(server)
        store.dispose()


def _chat(server: Server, conversation: str, turn: int = 1) -> str:
    """One turn of `conversation`; returns the response id (the turn's id in the store)."""
    r = httpx.post(server.v1 + "/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": f"Turn {turn}: I have a headache."}],
        "max_tokens": 8}, headers={"authorization": f"Bearer {CLIENT_KEY}",
                                   "x-conversation-id": conversation})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _admin(server: Server, method: str, path: str, **kwargs) -> httpx.Response:
    r = httpx.request(method, server.base_url + "/admin/v1" + path, timeout=60,
                      headers={"authorization": f"Bearer {ADMIN_KEY}"}, **kwargs)
    assert r.status_code in (200, 201), r.text
    return r


def _served_version(store: Store, turn_id: str) -> str:
    """The version that served a turn, as its replica logged it."""
    wait_until(lambda: store.get(turn_id) is not None, 15, f"turn {turn_id} logged")
    turn = store.get(turn_id)
    assert turn is not None
    return turn.model_version


def _propagation_s(changed_at: float, server: Server, active: str) -> float:
    """Seconds from `changed_at` until `server` serves `active`."""
    wait_until(lambda: _admin(server, "GET", "/versions").json()["active"] == active,
               FOLLOW_S + LOAD_MARGIN_S + 5, f"{server.base_url} serves {active}")
    return time.monotonic() - changed_at


def test_concurrent_load_through_both_logs_every_turn_once(cluster):
    one, two, store = cluster
    with ThreadPoolExecutor(6) as pool:
        ids = list(pool.map(lambda i: _chat((one, two)[i % 2], f"load-{i}"), range(40)))
    assert len(set(ids)) == 40
    wait_until(lambda: store.count() >= 40, 15, "40 turns logged")
    assert store.count() == 40
    assert {t.id for t in store.list_turns(limit=100)} == set(ids)


def test_activation_and_rollback_reach_the_other_replica_within_the_bound(cluster, tiny_model):
    one, two, store = cluster
    _admin(one, "POST", "/versions", json={"id": "v1", "parent": "base",
                                           "model_path": str(tiny_model.gguf_f16)})
    changed = time.monotonic()
    _admin(one, "POST", "/versions/v1/activate")
    activation_s = _propagation_s(changed, two, "v1")
    assert _served_version(store, _chat(two, "after-activation")) == "v1"

    changed = time.monotonic()
    _admin(two, "POST", "/rollback")
    rollback_s = _propagation_s(changed, one, "base")
    assert _served_version(store, _chat(one, "after-rollback")) == "base"
    print(f"propagation: activation {activation_s:.2f}s, rollback {rollback_s:.2f}s "
          f"(follow interval {FOLLOW_S}s)")
    assert max(activation_s, rollback_s) <= FOLLOW_S + LOAD_MARGIN_S


def test_a_conversation_keeps_its_version_on_the_other_replica(cluster):
    one, two, store = cluster
    _admin(one, "POST", "/versions/v1/activate")
    _propagation_s(time.monotonic(), two, "v1")
    assert _served_version(store, _chat(one, "sticky")) == "v1"
    # An activation (not a rollback) keeps begun conversations on their version.
    _admin(one, "POST", "/versions/base/activate")
    _propagation_s(time.monotonic(), two, "base")
    wait_until(lambda: [v["id"] for v in _admin(two, "GET", "/versions").json()["loaded"]]
               == ["base"], 10, "v1 unloaded on replica 2")
    # Replica 2 never saw this conversation: the shared pin has it load v1 for it.
    assert _served_version(store, _chat(two, "sticky", turn=2)) == "v1"
    assert _served_version(store, _chat(two, "fresh")) == "base"
    assert _served_version(store, _chat(one, "sticky", turn=3)) == "v1"


def test_a_store_that_is_down_fails_no_request(cluster, pg_server):  # noqa: F811
    one, two, store = cluster
    pg_server.stop()
    try:
        # New conversations on both replicas: their pins cannot be shared, they are served.
        ids = [_chat(server, f"while-down-{n}") for n, server in enumerate((one, two))]
    finally:
        pg_server.start()
    assert [_served_version(store, i) for i in ids] == ["base", "base"]  # spooled, replayed
