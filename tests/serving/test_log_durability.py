"""Nothing logged is lost: a burst of requests through a real server while its Postgres store is
stopped and started again, every response id arrives in the store exactly once, redacted; and a
record the store cannot take stops no other record from being logged."""

from __future__ import annotations

import os
import signal
import sqlite3
from concurrent.futures import ThreadPoolExecutor

import httpx
from sqlalchemy import create_engine, text

from tests.conftest import report_to_harness, wait_until
from tests.postgres import pg_server, pg_url  # noqa: F401  (fixtures)

BURST = 60
PHI_TEXT = "I'm Dana Whitfield, DOB 04/02/1971, phone 617-555-0142. My ankle is swollen."


def test_store_outage_mid_burst_loses_nothing(server_factory, pg_server, pg_url):  # noqa: F811
    server = server_factory({
        "CLINICLOOP_STORE__URL": pg_url,
        "CLINICLOOP_STORE__RETRY_INTERVAL_S": "0.2",
        "CLINICLOOP_SERVER__MAX_WAITING": str(BURST),
    })

    def ask(i: int) -> str:
        r = httpx.post(server.v1 + "/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": f"{PHI_TEXT} (request {i})"}],
            "max_tokens": 8})
        assert r.status_code == 200, r.text
        return r.json()["id"]

    db = create_engine(pg_url)

    def stored() -> list[tuple[str, str]]:
        with db.connect() as c:
            return [tuple(row) for row in c.execute(text("select id, messages::text from turns"))]

    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(ask, range(BURST // 3)))
        wait_until(lambda: len(stored()) == len(ids), 20, "first third stored")
        db.dispose()
        pg_server.stop()  # the database goes away in the middle of the burst
        ids += pool.map(ask, range(BURST // 3, 2 * BURST // 3))
        pg_server.start()
        ids += pool.map(ask, range(2 * BURST // 3, BURST))

    try:
        wait_until(lambda: len(stored()) >= BURST, 60, "all records after recovery")
    finally:
        rows = stored()
        lost = set(ids) - {r[0] for r in rows}
        report_to_harness({"fault": "store down mid-burst", "answered": len(ids),
                           "stored": len(rows), "rows_lost": len(lost)})
    assert sorted(r[0] for r in rows) == sorted(ids) and len(set(ids)) == BURST
    assert not any("Dana" in m or "617-555-0142" in m or "04/02/1971" in m for _, m in rows)
    assert "Dana" not in server.log()
    # The outage really was one: records went through the spool.
    metrics = httpx.get(server.base_url + "/metrics").text
    spooled = [line for line in metrics.splitlines()
               if line.startswith("clinicloop:log_records_spooled{")]
    assert float(spooled[0].split()[-1]) > 0


def test_a_record_too_nested_to_store_stops_no_logging(server_factory):
    """A request whose record the store cannot take (`chat_template_kwargs` 600 levels deep: JSON
    takes it, the store's row conversion does not) must cost that record alone: the turns before
    and after it are stored, it is stored or set aside (or the request refused), and the server
    still shuts down promptly on SIGTERM."""
    server = server_factory()
    deep: dict = {}
    for _ in range(600):
        deep = {"a": deep}

    def ask(i: int, **extra) -> httpx.Response:
        return httpx.post(server.v1 + "/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": f"My knee hurts (request {i})."}],
            "max_tokens": 4, **extra})

    with ThreadPoolExecutor(4) as pool:
        before = [r.json()["id"] for r in pool.map(ask, range(8))]
        hostile = ask(8, chat_template_kwargs=deep)
        after = [r.json()["id"] for r in pool.map(ask, range(9, 17))]
    assert hostile.status_code in (200, 400, 422), hostile.text

    def stored() -> set[str]:
        with sqlite3.connect(server.db_path) as db:
            return {row[0] for row in db.execute("select id from turns")}

    wait_until(lambda: set(before + after) <= stored(), 30, "the other turns stored")
    if hostile.status_code == 200:
        dead_letter = server.db_path.parent / "spool.dead.jsonl"
        hostile_id = hostile.json()["id"]
        wait_until(lambda: hostile_id in stored() or (
            dead_letter.exists() and hostile_id in dead_letter.read_text()), 30,
            "the nested record stored or set aside")
    metrics = httpx.get(server.base_url + "/metrics").text
    assert "clinicloop:log_records_dead_lettered{" in metrics
    os.killpg(server.proc.pid, signal.SIGTERM)
    server.proc.wait(20)  # uvicorn re-raises the signal once it has shut down
    assert "Application shutdown complete" in server.log()
