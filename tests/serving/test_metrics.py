"""Prometheus metrics under vLLM's names, scraped from a real server: the speculative-decoding
counters move when prompt-lookup drafting runs, and prefix reuse is counted."""

from __future__ import annotations

import re

import httpx


def _counter(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)}_total{{[^}}]*}} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match[1])


def test_spec_decode_and_prefix_cache_counters(server_factory, tiny_model):
    server = server_factory({"CLINICLOOP_ENGINE__SPECULATIVE__MODE": "ngram"})
    answer = ("Rest, drink warm fluids and use lozenges or paracetamol for the pain. See a doctor "
              "if you struggle to swallow or breathe, or it lasts over a week.")
    question = {"role": "user", "content": "I have a sore throat. What should I do?"}
    for messages in ([question], [question, {"role": "assistant", "content": answer}, question]):
        r = httpx.post(server.v1 + "/chat/completions", timeout=60, json={
            "model": tiny_model.name, "messages": messages, "max_tokens": 40,
            "temperature": 0})
        assert r.status_code == 200, r.text
    text = httpx.get(server.base_url + "/metrics").text
    drafts = _counter(text, "vllm:spec_decode_num_drafts")
    proposed = _counter(text, "vllm:spec_decode_num_draft_tokens")
    accepted = _counter(text, "vllm:spec_decode_num_accepted_tokens")
    assert drafts > 0 and 0 < accepted <= proposed
    assert _counter(text, "vllm:prefix_cache_hit_tokens") > 0  # turn 2 continued turn 1
