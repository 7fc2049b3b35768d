"""The maintenance window's state machine without HTTP: the real `Maintenance` over a real
`Admission`, as in an app given its own engine (nothing to release: `kept`). The treatments as
clients see them, the drain and the engine's release are tested on real servers in
test_maintenance.py."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from clinicloop.config import MaintenanceSettings
from clinicloop.serving.admin.protocol import MaintenanceOpen, MaintenanceRenew
from clinicloop.serving.admission import Admission
from clinicloop.serving.errors import OpenAIError
from clinicloop.serving.maintenance import Maintenance
from clinicloop.serving.metrics import Metrics
from tests.conftest import until


def _maintenance(admission: Admission | None = None, **settings) -> tuple[Maintenance, Metrics]:
    metrics = Metrics()
    return Maintenance(MaintenanceSettings(**settings), admission=admission or Admission(4, 4),
                       versions=None, metrics=metrics, model=lambda: "tiny",
                       request_timeout_s=30,
                       max_waiting=4), metrics


async def _refused(call) -> OpenAIError:
    with pytest.raises(OpenAIError) as refused:
        await call()
    return refused.value


def test_fallback_without_a_url_opens_nothing():
    async def main():
        m, _ = _maintenance()
        error = await _refused(lambda: m.open(MaintenanceOpen(treatment="fallback")))
        assert (error.status, error.code) == (400, "fallback_not_configured")
        assert m.window is None and m.windows_opened == 0 and not m.history

    asyncio.run(main())


def test_an_unrenewed_lease_closes_the_window_and_lets_the_queue_go():
    async def main():
        m, metrics = _maintenance()
        m.start()
        try:
            status = await m.open(MaintenanceOpen(treatment="queue", lease_s=0.5))
            assert status.open and status.engine == "kept"
            queued = asyncio.create_task(m.admit(time.perf_counter() + 30))
            await until(lambda: m.queue_waiting == 1, 5, "a request queued")
            renewed = await m.renew(MaintenanceRenew(lease_s=0.3))
            assert renewed.lease_expires_at < status.lease_expires_at  # the new lease counts
            assert await asyncio.wait_for(queued, 5) is None  # then admitted as usual
            assert m.window is None and m.queue_waiting == 0
            (summary,) = m.history
            assert summary.closed_by == "lease_expired" and summary.counts.queued == 1
            assert summary.closed_at >= renewed.lease_expires_at - 0.05
            text = metrics.render().decode()
            assert ('clinicloop:maintenance_requests_total{model_name="tiny",treatment="queued"}'
                    ' 1.0') in text
            assert 'clinicloop:maintenance_windows_total{model_name="tiny"} 1.0' in text
        finally:
            await m.shutdown()

    asyncio.run(main())


def test_each_refusal_is_a_503_counted_in_its_window():
    async def main():
        m, _ = _maintenance(queue_max=0)
        await m.open(MaintenanceOpen(treatment="refuse", expected_s=90))
        error = await _refused(lambda: m.admit(time.perf_counter() + 30))
        assert (error.status, error.code) == (503, "maintenance")
        assert error.headers is not None and 89 <= int(error.headers["retry-after"]) <= 90
        await m.close()

        await m.open(MaintenanceOpen(treatment="queue", expected_s=0.2))
        error = await _refused(lambda: m.admit(time.perf_counter() + 30))
        assert (error.status, error.code) == (503, "maintenance_queue_full")
        assert error.headers == {"retry-after": "1"}  # at least 1, past the expected end too
        await m.close()

        m.settings.queue_max = 1
        await m.open(MaintenanceOpen(treatment="queue"))
        error = await _refused(lambda: m.admit(time.perf_counter() + 0.1))
        assert (error.status, error.code) == (503, "timeout")
        assert m.queue_waiting == 0
        summary = await m.close()
        assert summary.counts.model_dump() == {"queued": 1, "fallback": 0, "refused": 0,
                                               "queue_full": 0, "queue_timeouts": 1}
        assert [w.counts.refused for w in m.history] == [1, 0, 0]
        assert m.stats()["requests"] == {"queued": 1, "fallback": 0, "refused": 1,
                                         "queue_full": 1, "queue_timeout": 1}

    asyncio.run(main())


def test_requests_that_do_not_drain_in_time_close_the_window_unreleased():
    async def main():
        admission = Admission(1, 1)
        await admission.acquire()  # a request in flight that outlasts the drain
        m, _ = _maintenance(admission, drain_timeout_s=0.2)
        error = await _refused(lambda: m.open(MaintenanceOpen(treatment="refuse")))
        assert (error.status, error.code) == (409, "drain_timeout")
        assert m.window is None
        (summary,) = m.history
        assert summary.closed_by == "drain_timeout" and summary.engine == "serving"
        assert summary.error and "did not finish" in summary.error
        admission.release()
        status = await m.open(MaintenanceOpen(treatment="refuse"))  # drained now: opens
        assert status.drain_s is not None and status.drain_s < 0.2
        assert math.isclose(status.expected_end - status.opened_at, 3600, abs_tol=1)

    asyncio.run(main())
