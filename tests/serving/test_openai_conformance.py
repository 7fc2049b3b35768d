"""The official `openai` client against a real server on the tiny model: the OpenAI behaviour the
design lists (streaming, usage, finish_reason, logprobs, response_format, errors)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

PROMPT = [{"role": "user", "content": "I have had a fever and a cough for three days."}]


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


def _stream_text(client, **kwargs):
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                        for c in chunks if c.choices)
    return chunks, content, reasoning


def test_models_lists_the_served_model(client, tiny_model):
    assert [m.id for m in client.models.list().data] == [tiny_model.name]


@pytest.mark.parametrize("thinking_mode", ["off", "on"])
def test_stream_joins_to_non_streamed_text(client, tiny_model, thinking_mode):
    kwargs = dict(model=tiny_model.name, messages=PROMPT, temperature=0, seed=7, max_tokens=48,
                  extra_body={"chat_template_kwargs": {"thinking_mode": thinking_mode}})
    full = client.chat.completions.create(**kwargs)
    _, content, reasoning = _stream_text(client, **kwargs)
    message = full.choices[0].message
    assert content == message.content
    assert reasoning == (getattr(message, "reasoning_content", None) or "")
    assert message.content or reasoning
    if thinking_mode == "on":
        assert reasoning, "thinking on: the reasoning comes back as reasoning_content"
    else:
        assert not reasoning


def test_finish_reason_only_in_last_chunk_and_usage_chunk(client, tiny_model):
    chunks, _, _ = _stream_text(client, model=tiny_model.name, messages=PROMPT, max_tokens=16,
                                temperature=0, stream_options={"include_usage": True})
    *body, usage_chunk = chunks
    assert usage_chunk.choices == []
    u = usage_chunk.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens and u.completion_tokens > 0
    assert all(c.usage is None for c in body)
    reasons = [c.choices[0].finish_reason for c in body]
    assert reasons[-1] in ("stop", "length") and all(r is None for r in reasons[:-1])


def test_stream_ends_with_done(server, tiny_model):
    with httpx.stream("POST", server.v1 + "/chat/completions", json={
        "model": tiny_model.name, "messages": PROMPT, "max_tokens": 8, "stream": True,
    }) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_stream_options_without_stream_is_400(client, tiny_model):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=tiny_model.name, messages=PROMPT,
                                       stream_options={"include_usage": True})
    body = err.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "stream_options" in body["error"]["message"]


def test_top_logprobs_over_limit_is_400_and_server_still_serves(client, tiny_model):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=tiny_model.name, messages=PROMPT, logprobs=True,
                                       top_logprobs=21)
    ok = client.chat.completions.create(model=tiny_model.name, messages=PROMPT, max_tokens=4)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_logprobs(client, tiny_model):
    r = client.chat.completions.create(model=tiny_model.name, messages=PROMPT, max_tokens=6,
                                       temperature=0, logprobs=True, top_logprobs=3)
    items = r.choices[0].logprobs.content
    assert len(items) == r.usage.completion_tokens
    for item in items:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        # Greedy: the sampled token is the most likely one.
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-4)
    assert "".join(i.token for i in items) == r.choices[0].message.content


def test_n_seed_stop_and_max_completion_tokens(client, tiny_model):
    kwargs = dict(model=tiny_model.name, messages=PROMPT, temperature=1.0, seed=3, n=2,
                  max_completion_tokens=12)
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1]
    assert a.usage.completion_tokens <= 24
    greedy = client.chat.completions.create(model=tiny_model.name, messages=PROMPT,
                                            temperature=0, max_tokens=40)
    text = greedy.choices[0].message.content
    word = text.split()[2]
    stopped = client.chat.completions.create(model=tiny_model.name, messages=PROMPT,
                                             temperature=0, max_tokens=40, stop=[word])
    assert stopped.choices[0].message.content == text[:text.index(word)]
    assert stopped.choices[0].finish_reason == "stop"
    cut = client.chat.completions.create(model=tiny_model.name, messages=PROMPT, temperature=0,
                                         max_completion_tokens=2)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 2


def test_response_format_json_object_and_schema(client, tiny_model):
    r = client.chat.completions.create(
        model=tiny_model.name, messages=PROMPT, max_tokens=64, temperature=0,
        response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict | list)
    schema = {"type": "object", "properties": {"criteria_met": {"type": "boolean"},
              "explanation": {"type": "string", "maxLength": 20}},
              "required": ["explanation", "criteria_met"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=tiny_model.name, messages=PROMPT, max_tokens=128, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "v", "schema": schema}})
    verdict = json.loads(r.choices[0].message.content)
    assert set(verdict) == {"explanation", "criteria_met"}
    assert isinstance(verdict["criteria_met"], bool)
    # Sampled free text inside a JSON string is still strict JSON: no raw control characters
    # (llama-cpp-python's schema grammar let newlines through; 5 of these 8 broke before).
    note = {"type": "object", "properties": {"note": {
        "type": "string", "minLength": 60, "maxLength": 250}}, "required": ["note"]}
    sampled = client.chat.completions.create(
        model=tiny_model.name, max_tokens=400,
        messages=[{"role": "user", "content": "I have a fever and a cough."}],
        temperature=1.0, seed=1, n=8,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": note}})
    for choice in sampled.choices:
        assert list(json.loads(choice.message.content, strict=True)) == ["note"]


def test_completions_stream_and_not(client, tiny_model):
    kwargs = dict(model=tiny_model.name, prompt="<|im_start|>user\nI feel dizzy.<|im_end|>\n",
                  max_tokens=24, temperature=0, seed=1)
    full = client.completions.create(**kwargs)
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs)
                       if c.choices)
    assert streamed == full.choices[0].text and full.usage.completion_tokens > 0
    lp = client.completions.create(logprobs=2, **kwargs).choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)


def test_prompt_longer_than_context_is_400(client, tiny_model):
    long = [{"role": "user", "content": "fever " * 4000}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=tiny_model.name, messages=long, max_tokens=4)
    assert err.value.response.json()["error"]["code"] == "context_length_exceeded"


def test_validation_and_unknown_route_errors_are_openai_shaped(server):
    r = httpx.post(server.v1 + "/chat/completions", json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server.v1 + "/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = httpx.get(server.base_url + "/v1/nope")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
