"""Nothing logged is lost: a burst of requests through a real server while its Postgres store is
stopped and started again; every response id arrives in the store exactly once, redacted."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
from sqlalchemy import create_engine, text

from tests.conftest import wait_until
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

    wait_until(lambda: len(stored()) >= BURST, 60, "all records after recovery")
    rows = stored()
    assert sorted(r[0] for r in rows) == sorted(ids) and len(set(ids)) == BURST
    assert not any("Dana" in m or "617-555-0142" in m or "04/02/1971" in m for _, m in rows)
    assert "Dana" not in server.log()
    # The outage really was one: records went through the spool.
    metrics = httpx.get(server.base_url + "/metrics").text
    spooled = [line for line in metrics.splitlines()
               if line.startswith("clinicloop:log_records_spooled{")]
    assert float(spooled[0].split()[-1]) > 0
