"""Maintenance windows on real servers (the tiny model): each treatment as clients see it on every
generating route, the drain of a stream in flight, the engine stopped during the window and
serving the same greedy answer after it, the lease closing a forgotten window, and the admin
API's refusals (409, 404, 401/403, hostile bodies).

Two servers: the gateway, and a second tiny server that is its `fallback` (named differently, so
the turns it serves are told apart); the second one's own fallback URL answers nothing."""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import free_port, wait_until

CLIENT_KEY, ADMIN_KEY = "sk-mw-client", "sk-mw-admin"
KEYS = {"CLINICLOOP_SERVER__API_KEYS": f'["{CLIENT_KEY}"]',
        "CLINICLOOP_SERVER__ADMIN_KEYS": f'["{ADMIN_KEY}"]'}
CLIENT = {"authorization": f"Bearer {CLIENT_KEY}"}
FALLBACK_NAME = "cpu-fallback"
QUEUE_MAX = 2
REQUEST_TIMEOUT_S = 4.0
QUESTION = [{"role": "user", "content": "I have had a fever for two days."}]


@pytest.fixture(scope="module")
def fallback(server_factory):
    return server_factory({
        **KEYS, "CLINICLOOP_ENGINE__SERVED_MODEL_NAME": FALLBACK_NAME,
        "CLINICLOOP_SERVER__MAINTENANCE__FALLBACK_URL": f"http://127.0.0.1:{free_port()}/v1"})


@pytest.fixture(scope="module")
def gateway(server_factory, fallback):
    return server_factory({
        **KEYS,
        "CLINICLOOP_SERVER__REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
        "CLINICLOOP_SERVER__MAINTENANCE__QUEUE_MAX": str(QUEUE_MAX),
        "CLINICLOOP_SERVER__MAINTENANCE__FALLBACK_URL": fallback.v1,
        "CLINICLOOP_SERVER__MAINTENANCE__FALLBACK_API_KEY": CLIENT_KEY})


@pytest.fixture(autouse=True)
def no_window_left(request):
    """A failing test must not leave its window open for the next one."""
    yield
    for name in ("gateway", "fallback"):
        if name in request.fixturenames:
            admin(request.getfixturevalue(name), "DELETE")


def admin(server, method: str, path: str = "", key: str | None = ADMIN_KEY,
          **kwargs) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, server.base_url + "/admin/v1/maintenance" + path,
                         headers=headers, timeout=60, **kwargs)


def open_window(server, **body) -> dict:
    r = admin(server, "POST", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def close_window(server) -> dict:
    r = admin(server, "DELETE")
    assert r.status_code == 200, r.text
    return r.json()


def chat(server, stream: bool = False, **body) -> httpx.Response:
    request = {"messages": QUESTION, "max_tokens": 16, "temperature": 0, **body}
    if not stream:
        return httpx.post(server.v1 + "/chat/completions", json=request, headers=CLIENT,
                          timeout=60)
    with httpx.stream("POST", server.v1 + "/chat/completions", json={**request, "stream": True},
                      headers=CLIENT, timeout=60) as response:
        response.read()
        return response


def every_route(server, model: str) -> list[httpx.Response]:
    """One request on each generating route (chat twice: streamed, and pinning a version)."""
    return [
        chat(server),
        chat(server, stream=True),
        chat(server, model=f"{model}@base"),
        httpx.post(server.v1 + "/completions", headers=CLIENT, timeout=60,
                   json={"model": model, "prompt": "A fever is", "max_tokens": 8}),
        httpx.post(server.v1 + "/responses", headers=CLIENT, timeout=60,
                   json={"model": model, "input": "I have a cough.", "max_output_tokens": 16}),
    ]


def metric(server, line_start: str, label: str = "") -> float:
    for line in httpx.get(server.base_url + "/metrics").text.splitlines():
        if line.startswith(line_start) and label in line:
            return float(line.split()[-1])
    raise AssertionError(f"{line_start} {label} not on /metrics")


def requests_total(server, treatment: str) -> float:
    return metric(server, "clinicloop:maintenance_requests_total{", f'treatment="{treatment}"')


def logged(server) -> list[tuple[str, str, str]]:
    with sqlite3.connect(server.db_path) as db:
        return db.execute("select endpoint, model_version, status from turns").fetchall()


def settled_log(server, expected: int) -> list[tuple[str, str, str]]:
    wait_until(lambda: len(logged(server)) >= expected, 15, f"{expected} records")
    return logged(server)


def stats(server) -> dict:
    return httpx.get(server.base_url + "/admin/v1/stats",
                     headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()["maintenance"]


def assert_maintenance_503(response: httpx.Response, code: str, expected_s: float) -> None:
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert (error["code"], error["type"]) == (code, "service_unavailable_error"), error
    assert expected_s - 30 <= int(response.headers["retry-after"]) <= math.ceil(expected_s)


def test_refuse_answers_503_with_retry_after_on_every_route(gateway, tiny_model):
    before, refused_before = len(logged(gateway)), requests_total(gateway, "refused")
    status = open_window(gateway, treatment="refuse", expected_s=600, release_engine=False,
                         reason="nightly refresh")
    assert (status["treatment"], status["engine"], status["reason"]) == (
        "refuse", "serving", "nightly refresh")
    assert metric(gateway, "clinicloop:maintenance_open{") == 1

    for response in every_route(gateway, tiny_model.name):
        assert_maintenance_503(response, "maintenance", 600)
        assert "maintenance window" in response.json()["error"]["message"]
    assert_maintenance_503(httpx.get(gateway.base_url + "/health"), "maintenance", 600)

    summary = close_window(gateway)
    assert (summary["id"], summary["open"], summary["closed_by"]) == (status["id"], False, "admin")
    assert summary["counts"] == {"queued": 0, "fallback": 0, "refused": 5, "queue_full": 0,
                                 "queue_timeouts": 0}
    assert requests_total(gateway, "refused") == refused_before + 5
    assert metric(gateway, "clinicloop:maintenance_open{") == 0
    # Nothing was generated, so nothing is logged: the next answered turn is the next record.
    assert chat(gateway).status_code == 200
    assert len(settled_log(gateway, before + 1)) == before + 1


def test_queued_requests_wait_out_the_stopped_engine_and_get_the_same_answer(gateway):
    greedy = chat(gateway).json()["choices"][0]["message"]["content"]
    before = len(logged(gateway))
    totals = {t: requests_total(gateway, t) for t in ("queued", "queue_full")}
    status = open_window(gateway, treatment="queue", expected_s=120)
    assert status["engine"] == "stop" and status["release_s"] is not None
    health = httpx.get(gateway.base_url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "maintenance"
    assert metric(gateway, "clinicloop:maintenance_engine_released{") == 1
    tokenized = httpx.post(gateway.base_url + "/tokenize", headers=CLIENT, timeout=30,
                           json={"prompt": "fever"})
    assert tokenized.status_code == 503, tokenized.text  # nothing serves while it is stopped

    with ThreadPoolExecutor(QUEUE_MAX) as pool:
        queued = [pool.submit(chat, gateway), pool.submit(chat, gateway, stream=True)]
        wait_until(lambda: stats(gateway)["queue_waiting"] == QUEUE_MAX, 15, "queued")
        assert_maintenance_503(chat(gateway), "maintenance_queue_full", 120)
        assert not any(f.done() for f in queued)
        summary = close_window(gateway)
        answered = [f.result() for f in queued]

    assert summary["engine"] == "serving" and summary["resume_s"] is not None
    assert summary["error"] is None
    assert (summary["counts"]["queued"], summary["counts"]["queue_full"]) == (QUEUE_MAX, 1)
    assert requests_total(gateway, "queued") == totals["queued"] + QUEUE_MAX
    assert requests_total(gateway, "queue_full") == totals["queue_full"] + 1
    assert answered[0].status_code == 200
    assert answered[0].json()["choices"][0]["message"]["content"] == greedy
    lines = [x for x in answered[1].text.splitlines() if x]
    assert answered[1].status_code == 200 and lines[-1] == "data: [DONE]"
    assert not any('"error"' in x for x in lines)
    assert settled_log(gateway, before + QUEUE_MAX)[before:] == [
        ("chat.completions", "base", "ok")] * QUEUE_MAX
    assert httpx.get(gateway.base_url + "/health").json()["status"] == "ok"
    assert metric(gateway, "clinicloop:maintenance_engine_released{") == 0


def test_a_queued_client_that_hangs_up_leaves_and_one_past_its_deadline_gets_503(gateway):
    before = len(logged(gateway))
    open_window(gateway, treatment="queue", release_engine=False)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gateway.v1 + "/chat/completions", headers=CLIENT, json={"messages": QUESTION},
                   timeout=httpx.Timeout(30, read=0.5))
    wait_until(lambda: stats(gateway)["queue_waiting"] == 0, 10, "the hung-up request gone")

    started = time.monotonic()
    timed_out = chat(gateway)
    assert timed_out.status_code == 503 and timed_out.json()["error"]["code"] == "timeout"
    assert time.monotonic() - started >= REQUEST_TIMEOUT_S - 0.5
    counts = close_window(gateway)["counts"]
    assert (counts["queued"], counts["queue_timeouts"]) == (2, 1)
    assert chat(gateway).status_code == 200
    assert len(settled_log(gateway, before + 1)) == before + 1  # neither queued one is logged


def test_fallback_serves_every_route_and_its_turns_are_logged(gateway, fallback, tiny_model):
    before, on_fallback = len(logged(gateway)), len(logged(fallback))
    total = requests_total(gateway, "fallback")
    status = open_window(gateway, treatment="fallback")
    assert status["engine"] == "stop"
    for response in every_route(gateway, tiny_model.name):
        assert response.status_code == 200, response.text
        if not response.headers["content-type"].startswith("text/event-stream"):
            assert response.json()["model"] == tiny_model.name  # the served name, as ever
    assert close_window(gateway)["counts"]["fallback"] == 5
    assert requests_total(gateway, "fallback") == total + 5

    turns = settled_log(gateway, before + 5)[before:]
    assert sorted(turns) == sorted([(endpoint, f"fallback:{FALLBACK_NAME}", "ok") for endpoint in
                                    ("chat.completions",) * 3 + ("completions", "responses")])
    assert len(settled_log(fallback, on_fallback + 5)) == on_fallback + 5  # it served them
    assert chat(gateway).status_code == 200  # the engine serves again


def test_opening_waits_for_a_stream_in_flight_to_finish(gateway):
    first_chunk, done = threading.Event(), threading.Event()
    lines: list[str] = []

    def stream() -> None:
        with httpx.stream("POST", gateway.v1 + "/chat/completions", headers=CLIENT, timeout=60,
                          json={"messages": QUESTION, "max_tokens": 1000, "ignore_eos": True,
                                "stream": True}) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                    first_chunk.set()
        done.set()

    streaming = threading.Thread(target=stream)
    streaming.start()
    assert first_chunk.wait(30)
    assert not done.is_set()
    status = open_window(gateway, treatment="queue")
    # The open answered only after the stream had ended: the engine stopped, yet the stream ran
    # to its length. (Whether this thread has read the last line yet is up to the scheduler.)
    streaming.join(30)
    assert done.is_set()
    assert lines[-1] == "data: [DONE]" and not any('"error"' in x for x in lines)
    assert '"finish_reason":"length"' in lines[-2]
    assert status["drain_s"] > 0 and status["engine"] == "stop"
    close_window(gateway)


def test_a_window_not_renewed_closes_by_itself(gateway):
    status = open_window(gateway, treatment="queue", lease_s=1)
    assert status["lease_expires_at"] - time.time() <= 1
    wait_until(lambda: admin(gateway, "GET").json()["window"] is None, 15, "the lease to run out")
    last = admin(gateway, "GET").json()["history"][-1]
    assert (last["id"], last["closed_by"], last["engine"]) == (
        status["id"], "lease_expired", "serving")
    assert httpx.get(gateway.base_url + "/health").json()["status"] == "ok"
    assert chat(gateway).status_code == 200


def test_one_window_at_a_time_and_404_without_one(gateway):
    for method, path in (("DELETE", ""), ("POST", "/renew"),
                         ("POST", "/resume")):
        r = admin(gateway, method, path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "no_maintenance", r.text
    windows = metric(gateway, "clinicloop:maintenance_windows_total{")
    opened = admin(gateway, "POST", "", json={"treatment": "refuse"})
    assert opened.status_code == 200, opened.text
    status = opened.json()
    assert admin(gateway, "GET", "").json()["window"]["id"] == status["id"]
    again = admin(gateway, "POST", json={"treatment": "queue"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "maintenance_open"

    renewed = admin(gateway, "POST", "/renew", json={"lease_s": 600, "expected_s": 60}).json()
    assert renewed["lease_expires_at"] > status["lease_expires_at"]
    assert abs(renewed["expected_end"] - (time.time() + 60)) < 10
    resumed = admin(gateway, "POST", "/resume").json()
    assert (resumed["id"], resumed["engine"]) == (status["id"], "serving")
    assert httpx.post(gateway.base_url + "/tokenize", headers=CLIENT,
                      json={"prompt": "fever"}).status_code == 200  # the engine serves
    assert_maintenance_503(chat(gateway), "maintenance", 60)  # and the window still refuses
    assert admin(gateway, "GET").json()["window"]["id"] == status["id"]
    assert close_window(gateway)["id"] == status["id"]
    assert admin(gateway, "DELETE").status_code == 404
    assert metric(gateway, "clinicloop:maintenance_windows_total{") == windows + 1


@pytest.mark.parametrize(("key", "status"), [(None, 401), ("sk-wrong", 401), (CLIENT_KEY, 403)])
def test_only_an_admin_key_reaches_the_window(gateway, key, status):
    for method, path in (("GET", ""), ("POST", ""), ("POST", "/renew"), ("POST", "/resume"),
                         ("DELETE", "")):
        r = admin(gateway, method, path, key=key, json={"treatment": "refuse"})
        assert r.status_code == status and "error" in r.json(), (method, path, r.text)
    assert admin(gateway, "GET").json()["window"] is None


HOSTILE_OPEN = [
    '{"treatment": "refuse", "surprise": 1}', '{"treatment": "closed"}', '{"expected_s": -5}',
    '{"expected_s": 0}', '{"expected_s": 1e308}', '{"expected_s": NaN}', '{"expected_s": "60"}',
    '{"lease_s": true}', '{"lease_s": -1}', '{"release_engine": "no"}', '{"reason": 7}',
    '{"reason": "' + "x" * 201 + '"}', "[]", "null", '{"treatment": "refuse"',
]
HOSTILE_RENEW = ['{"lease_s": 0}', '{"expected_s": Infinity}', '{"lease_s": 1e400}',
                 '{"window": 1}', '{"lease_s": [1]}']


def test_hostile_bodies_are_400s_and_open_nothing(gateway):
    def post(path: str, body: str) -> None:
        r = httpx.post(gateway.base_url + "/admin/v1/maintenance" + path, content=body,
                       headers={"authorization": f"Bearer {ADMIN_KEY}",
                                "content-type": "application/json"}, timeout=30)
        assert r.status_code in (400, 422), (body, r.status_code, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text

    for body in HOSTILE_OPEN:
        post("", body)
    assert admin(gateway, "GET").json()["window"] is None
    open_window(gateway, treatment="refuse", release_engine=False)
    for body in HOSTILE_RENEW:
        post("/renew", body)
    close_window(gateway)


def test_a_fallback_that_does_not_answer_opens_no_window(fallback):
    r = admin(fallback, "POST", json={"treatment": "fallback"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "fallback_unavailable", r.text
    assert admin(fallback, "GET").json() == {"window": None, "history": []}
    assert httpx.get(fallback.base_url + "/health").json()["status"] == "ok"
