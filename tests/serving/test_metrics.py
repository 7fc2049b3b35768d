"""Prometheus metrics under vLLM's names, scraped from a real server on the tiny model: each is
there with the `model_name` label and moves as requests run — speculative-decoding counters when
prompt-lookup drafting runs, prefix-cache queries and hits on a repeated conversation turn,
running / waiting requests, queue time and KV-cache usage while one long request holds the only
sequence and another queues behind it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clinicloop.serving.metrics import Metrics, kv_cache_usage
from tests.conftest import wait_until

QUESTION = {"role": "user", "content": "I have a sore throat. What should I do?"}
N_CTX = 16384
ANSWER = ("Rest, drink warm fluids and use lozenges or paracetamol for the pain. See a doctor if "
          "you struggle to swallow or breathe, or it lasts over a week.")


@pytest.fixture(scope="module")
def server(server_factory):
    # One sequence at a time, so a second request queues behind a running one; a context long
    # enough that a request generating to its end runs for many seconds (it is closed sooner).
    return server_factory({"CLINICLOOP_ENGINE__SPECULATIVE__MODE": "ngram",
                           "CLINICLOOP_ENGINE__N_PARALLEL": "1",
                           "CLINICLOOP_ENGINE__PREFIX_CACHE_SLOTS": "1",
                           "CLINICLOOP_ENGINE__N_CTX": str(N_CTX)})


class Scrape:
    """One /metrics page, every series of which must carry the served model's name."""

    def __init__(self, server, model: str) -> None:
        text = httpx.get(server.base_url + "/metrics", timeout=10).text
        self.samples: dict[str, list[float]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                assert s.labels.get("model_name") == model, s
                self.samples.setdefault(s.name, []).append(s.value)

    def value(self, name: str) -> float:
        """The value of the one series of sample `name`."""
        assert name in self.samples, f"{name} missing from /metrics"
        (value,) = self.samples[name]
        return value


def _scrape(server, tiny_model) -> Scrape:
    return Scrape(server, tiny_model.name)


def _chat(server, tiny_model, messages, max_tokens=40) -> dict:
    r = httpx.post(server.v1 + "/chat/completions", timeout=60, json={
        "model": tiny_model.name, "messages": messages, "max_tokens": max_tokens,
        "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def test_every_metric_is_there_with_the_model_name(server, tiny_model):
    _chat(server, tiny_model, [QUESTION], max_tokens=4)
    m = _scrape(server, tiny_model)
    for name in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:kv_cache_usage_perc", "vllm:num_requests_running",
                 "vllm:num_requests_waiting", "vllm:request_queue_time_seconds_count",
                 "vllm:request_queue_time_seconds_sum", "vllm:time_to_first_token_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:spec_decode_num_drafts_total"):
        m.value(name)
    assert "vllm:prefix_cache_hit_tokens_total" not in m.samples  # replaced by vLLM's names


def test_spec_decode_and_prefix_cache_counters(server, tiny_model):
    """vLLM counts prefix-cache queries and hits in tokens: every request queries its whole
    prompt; a later turn of a conversation hits the cached earlier one. Drafts are counted as
    prompt lookup proposes them and the target accepts them."""
    _chat(server, tiny_model, [QUESTION])
    before = _scrape(server, tiny_model)
    again = _chat(server, tiny_model, [QUESTION, {"role": "assistant", "content": ANSWER},
                                       QUESTION])
    after = _scrape(server, tiny_model)
    queried = (after.value("vllm:prefix_cache_queries_total")
               - before.value("vllm:prefix_cache_queries_total"))
    hit = after.value("vllm:prefix_cache_hits_total") - before.value("vllm:prefix_cache_hits_total")
    assert queried == again["usage"]["prompt_tokens"]
    assert 0 < hit < queried  # turn 2 continued turn 1; its last prompt token is always fed
    # A continuation that repeats itself (" in in in ..."): prompt lookup drafts from it.
    r = httpx.post(server.v1 + "/completions", timeout=60, json={
        "model": tiny_model.name, "prompt": "fever fever fever fever", "max_tokens": 30,
        "temperature": 0})
    assert r.status_code == 200, r.text
    after = _scrape(server, tiny_model)
    drafts = after.value("vllm:spec_decode_num_drafts_total")
    proposed = after.value("vllm:spec_decode_num_draft_tokens_total")
    accepted = after.value("vllm:spec_decode_num_accepted_tokens_total")
    assert drafts > 0 and 0 < accepted <= proposed


@contextmanager
def _long_stream(server, tiny_model) -> Iterator[httpx.Response]:
    """A streamed request that runs until closed (past EOS, up to the context), once its first
    chunk is in."""
    body = {"model": tiny_model.name, "messages": [QUESTION], "max_tokens": N_CTX - 100,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept: once collected, it would close the response
        next(lines)
        yield r


def test_queue_running_waiting_and_kv_usage(server, tiny_model):
    _chat(server, tiny_model, [QUESTION], max_tokens=4)  # every series exists from here on
    idle = _scrape(server, tiny_model)
    assert idle.value("vllm:num_requests_running") == idle.value("vllm:num_requests_waiting") == 0
    # Nothing runs: an idle slot's cached prefix is free, as vLLM counts its cached blocks.
    assert idle.value("vllm:kv_cache_usage_perc") == 0
    queued_before = idle.value("vllm:request_queue_time_seconds_count")
    waited_before = idle.value("vllm:request_queue_time_seconds_sum")

    queued: list[dict] = []
    behind = threading.Thread(target=lambda: queued.append(
        _chat(server, tiny_model, [QUESTION], max_tokens=4)))
    with _long_stream(server, tiny_model):
        busy = _scrape(server, tiny_model)
        assert busy.value("vllm:num_requests_running") == 1
        # One of the 1 + 1 slots holds the running request's prompt and what it generated so
        # far, so its share grows as the request runs.
        usage = busy.value("vllm:kv_cache_usage_perc")
        assert 0 < usage <= 1 / 2
        wait_until(lambda: _scrape(server, tiny_model).value("vllm:kv_cache_usage_perc") > usage,
                   30, "KV usage growing")
        behind.start()
        wait_until(lambda: _scrape(server, tiny_model).value("vllm:num_requests_waiting") == 1,
                   30, "the second request waiting")
    # The long request was closed and has ended; the queued one was admitted and answered.
    behind.join(60)
    assert queued and queued[0]["choices"][0]["finish_reason"]

    wait_until(lambda: _scrape(server, tiny_model).value("vllm:num_requests_running") == 0, 30,
               "both requests done")
    done = _scrape(server, tiny_model)
    assert done.value("vllm:num_requests_waiting") == 0
    assert done.value("vllm:kv_cache_usage_perc") <= idle.value("vllm:kv_cache_usage_perc")
    assert done.value("vllm:request_queue_time_seconds_count") == queued_before + 2
    # The second waited at least for the scrape that saw it waiting.
    assert done.value("vllm:request_queue_time_seconds_sum") > waited_before


def test_unknown_kv_usage_is_not_exported():
    """An engine that cannot tell its KV usage (an upstream: its own /metrics has it) exports no
    `vllm:kv_cache_usage_perc` rather than a made-up 0."""
    assert kv_cache_usage((0, 0)) is None
    assert kv_cache_usage((30, 120)) == 0.25
    metrics = Metrics()
    metrics.watch(lambda: {"vllm:kv_cache_usage_perc": ("KV-cache usage.", None),
                           "vllm:num_requests_running": ("Requests generating.", 0)},
                  lambda: "m")
    text = metrics.render().decode()
    assert "vllm:kv_cache_usage_perc" not in text and "vllm:num_requests_running{" in text
