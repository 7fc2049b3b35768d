"""The Responses API with the official `openai` client against real servers on the tiny model:
`responses.create` streamed and not, reasoning, `previous_response_id` continued from the store
across a restart, GET by id, the 404s, refused fields and hostile input."""

from __future__ import annotations

import json
import sqlite3

import httpx
import openai
import pytest

from tests.conftest import ROOT, start_server, stop_server
from tests.serving import scripted_upstream

KEY, OTHER_KEY = "sk-test-responses", "sk-test-other"
KEYS = {"CLINICLOOP_SERVER__API_KEYS": f'["{KEY}", "{OTHER_KEY}"]'}
DOCTOR = "You are a careful doctor."


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory(KEYS)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key=KEY, max_retries=0)


def _row(db_path, response_id):
    with sqlite3.connect(db_path) as db:
        db.row_factory = sqlite3.Row
        return db.execute("select * from turns where id = ?", (response_id,)).fetchone()


def _create(client, tiny_model, **kwargs):
    return client.responses.create(model=tiny_model.name, temperature=0,
                                   **{"max_output_tokens": 32, **kwargs})


def test_stream_joins_to_the_response_and_events_are_typed(client, tiny_model):
    kwargs = dict(instructions=DOCTOR, input="I have had a fever for three days.")
    full = _create(client, tiny_model, **kwargs)
    assert full.object == "response" and full.id.startswith("resp-")
    assert full.status in ("completed", "incomplete") and full.output_text
    assert full.instructions == DOCTOR and full.model == tiny_model.name
    assert full.usage.total_tokens == full.usage.input_tokens + full.usage.output_tokens > 0
    events = list(_create(client, tiny_model, stream=True, **kwargs))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    terminal = "response.completed" if full.status == "completed" else "response.incomplete"
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", terminal]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == full.output_text
    assert events[-1].response.output_text == full.output_text
    assert events[-1].response.status == full.status
    assert events[-4].text == full.output_text
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")}
    assert item_ids == {events[-1].response.output[0].id}


def test_stream_helper_assembles_the_final_response(client, tiny_model):
    kwargs = dict(input="Hello", max_output_tokens=256)
    full = _create(client, tiny_model, **kwargs)
    assert full.status == "completed", "the greeting ends well within 256 tokens"
    with client.responses.stream(model=tiny_model.name, temperature=0, **kwargs) as stream:
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(texts) == final.output_text == full.output_text
    assert final.id != full.id and final.status == "completed"


def test_reasoning_comes_back_as_a_reasoning_item(client, tiny_model):
    kwargs = dict(input="I have had a cough for a week.", reasoning={"effort": "high"},
                  max_output_tokens=64)
    full = _create(client, tiny_model, **kwargs)
    reasoning = full.output[0]
    assert reasoning.type == "reasoning" and reasoning.content[0].text
    events = list(_create(client, tiny_model, stream=True, **kwargs))
    streamed = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert streamed == reasoning.content[0].text
    assert [item.type for item in events[-1].response.output] == ["reasoning", "message"]
    off = _create(client, tiny_model, input="I have had a cough for a week.",
                  reasoning={"effort": "none"})
    assert [item.type for item in off.output] == ["message"]


def test_get_by_id_returns_the_stored_response(server, client, tiny_model):
    created = _create(client, tiny_model, instructions=DOCTOR, input="My knee hurts.",
                      metadata={"app": "triage"}, store=False)
    got = client.responses.retrieve(created.id)
    assert (got.id, got.status, got.output_text, got.instructions, got.metadata) == (
        created.id, created.status, created.output_text, DOCTOR, {"app": "triage"})
    assert [item.id for item in got.output] == [item.id for item in created.output]
    assert got.usage.output_tokens == created.usage.output_tokens
    assert abs(got.created_at - created.created_at) <= 1
    # `store: false` answers and is logged all the same: this server logs every turn.
    row = _row(server.db_path, created.id)
    assert row["endpoint"] == "responses"
    assert json.loads(row["messages"]) == [{"role": "system", "content": DOCTOR},
                                           {"role": "user", "content": "My knee hurts."}]


def test_stored_text_is_redacted(server, client, tiny_model):
    created = _create(client, tiny_model, input="My name is John Carter and my knee hurts.")
    messages = _row(server.db_path, created.id)["messages"]
    assert "John Carter" not in messages and "[NAME]" in messages
    # A GET, like a continuation, reads what the store holds: the redacted turn.
    assert client.responses.retrieve(created.id).output_text == _row(
        server.db_path, created.id)["response"]


def test_the_404s(server, client, tiny_model):
    mine = _create(client, tiny_model, input="Hello")
    other = openai.OpenAI(base_url=server.v1, api_key=OTHER_KEY, max_retries=0)
    chat = client.chat.completions.create(model=tiny_model.name, max_tokens=4,
                                          messages=[{"role": "user", "content": "Hello"}])
    for who, response_id in [(client, "resp-unknown"), (other, mine.id), (client, chat.id),
                             (client, "x" * 5000), (client, "resp-\x00é")]:
        with pytest.raises(openai.NotFoundError) as err:
            who.responses.retrieve(response_id)
        assert err.value.body["code"] == "response_not_found"
        if len(response_id) > 256:
            continue  # longer than an id may be: a 400 on create
        with pytest.raises(openai.NotFoundError) as err:
            who.responses.create(model=tiny_model.name, input="And?",
                                 previous_response_id=response_id)
        assert err.value.body["param"] == "previous_response_id"


def test_previous_response_id_continues_across_a_restart(tmp_path, tiny_model):
    env = {**KEYS, "CLINICLOOP_ENGINE__MODEL_PATH": str(tiny_model.gguf_q8_0),
           "CLINICLOOP_ENGINE__SERVED_MODEL_NAME": tiny_model.name,
           "CLINICLOOP_MODELS_DIR": str(ROOT / "var" / "models")}
    first = start_server(tmp_path, env)
    try:
        c = openai.OpenAI(base_url=first.v1, api_key=KEY, max_retries=0)
        r1 = _create(c, tiny_model, instructions=DOCTOR, input="I have a headache.")
    finally:
        stop_server(first)
    second = start_server(tmp_path, env)  # same directory: same store, nothing in memory
    try:
        c = openai.OpenAI(base_url=second.v1, api_key=KEY, max_retries=0)
        assert c.responses.retrieve(r1.id).output_text == r1.output_text
        r2 = _create(c, tiny_model, input=[{"role": "user", "content": "It started yesterday."}],
                     previous_response_id=r1.id)
        assert r2.previous_response_id == r1.id and r2.instructions is None
        history = [{"role": "user", "content": "I have a headache."},
                   {"role": "assistant", "content": r1.output_text},
                   {"role": "user", "content": "It started yesterday."}]
        # The model saw the earlier turn and its answer, without the earlier instructions.
        chat = c.chat.completions.create(model=tiny_model.name, messages=history, temperature=0,
                                         max_tokens=32)
        assert r2.output_text == chat.choices[0].message.content
        row1, row2 = _row(second.db_path, r1.id), _row(second.db_path, r2.id)
        assert json.loads(row2["messages"]) == history
        assert row2["conversation_id"] == row1["conversation_id"]
        r3 = _create(c, tiny_model, input="Thanks.", previous_response_id=r2.id,
                     instructions=DOCTOR)
        assert json.loads(_row(second.db_path, r3.id)["messages"]) == [
            {"role": "system", "content": DOCTOR}, *history,
            {"role": "assistant", "content": r2.output_text},
            {"role": "user", "content": "Thanks."}]
    finally:
        stop_server(second)


@pytest.mark.parametrize("field, value", [
    ("max_tool_calls", 1),
    ("include", ["message.output_text.logprobs"]),
    ("background", True),
    ("conversation", "conv_123"),
    ("seed", 7),  # not a Responses field: unknown
])
def test_unhonoured_fields_are_refused_by_name(client, tiny_model, field, value):
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=tiny_model.name, input="Hello", extra_body={field: value})
    assert err.value.body["param"] == field
    assert err.value.body["type"] == "invalid_request_error"


def test_harmless_fields_are_accepted(server, client, tiny_model):
    r = _create(client, tiny_model, input="Hello", max_output_tokens=4, user="u-1",
                safety_identifier="s-1", service_tier="auto", prompt_cache_key="k", store=True,
                truncation="disabled", tools=[], parallel_tool_calls=None,
                text={"format": {"type": "text"}, "verbosity": "medium"})
    assert r.status in ("completed", "incomplete")
    logged = json.loads(_row(server.db_path, r.id)["params"])
    assert "user" not in logged and "safety_identifier" not in logged  # end users' ids


def test_json_object_format_is_honoured(client, tiny_model):
    r = _create(client, tiny_model, input="Give me your answer as JSON.",
                text={"format": {"type": "json_object"}}, max_output_tokens=64)
    if r.status == "completed":
        assert isinstance(json.loads(r.output_text), dict)
    else:
        assert r.output_text.lstrip().startswith("{")


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "temperature": "hot"}, "temperature"),
    ({"input": "x", "temperature": 2.5}, "temperature"),
    ({"input": "x", "top_p": 0}, "top_p"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "max_output_tokens": 2**80}, "max_output_tokens"),
    ({"input": "x", "instructions": ["a"]}, "instructions"),
    ({"input": 42}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input.0.message.content.0.type"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]},
     "input.0.call_id"),  # answers no call
    ({"input": [{"role": "tool", "content": "x"}]}, "input.0.message.role"),
    ({"input": [{"role": "user", "content": "x", "extra": 1}]}, "input.0.message.extra"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
    ({"input": "x", "stream_options": {"include_obfuscation": False}}, None),
    ({"input": "x", "truncation": "auto"}, "truncation"),
    ({"input": "x", "reasoning": {"summary": "auto"}}, "reasoning.summary"),
    ({"input": "x", "reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    ({"input": "x", "text": {"verbosity": "high"}}, "text.verbosity"),
    ({"input": "x", "text": {"format": {"type": "json_schema"}}}, "text.format"),
    ({"input": "x", "metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ({"input": "x", "previous_response_id": "r" * 300}, "previous_response_id"),
    ({"input": "x" * 200_000}, "input"),  # past the context window
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(?=a)b"}}}}}},
     "text.format"),  # a schema the grammar cannot enforce
])
def test_bad_requests_are_400s(server, tiny_model, body, param):
    r = httpx.post(server.v1 + "/responses", json={"model": tiny_model.name, **body}, timeout=60,
                   headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param


def test_a_stream_is_framed_as_openai_sends_it(server, tiny_model):
    with httpx.stream("POST", server.v1 + "/responses", timeout=60,
                      headers={"authorization": f"Bearer {KEY}"},
                      json={"model": tiny_model.name, "input": "Hello", "stream": True,
                            "max_output_tokens": 8}) as r:
        blocks = [b for b in r.read().decode().split("\n\n") if b]
    for block in blocks:
        event, data = block.split("\n")
        assert event == f"event: {json.loads(data.removeprefix('data: '))['type']}"
    assert "[DONE]" not in blocks[-1]


def test_on_an_upstream_engine_a_failure_mid_stream_is_response_failed(server_factory):
    """Over an OpenAI upstream (the scripted one): a response is served, and an upstream that
    fails after the first token ends the stream with `response.failed` naming it."""
    with scripted_upstream.running() as url:
        gateway = server_factory({"CLINICLOOP_ENGINE__KIND": "openai",
                                  "CLINICLOOP_ENGINE__UPSTREAM_URL": url, **KEYS})
        c = openai.OpenAI(base_url=gateway.v1, api_key=KEY, max_retries=0)
        served = c.models.list().data[0].id
        ok = c.responses.create(model=served, input="I have a cough.")
        assert ok.status == "completed" and ok.output_text
        events = list(c.responses.create(model=served, stream=True,
                                         input="I have a cough. @@error_chunk@@"))
    assert [e.type for e in events][-2:] == ["response.output_text.delta", "response.failed"]
    failed = events[-1].response
    assert failed.status == "failed" and "upstream" in failed.error.message
    assert _row(gateway.db_path, failed.id)["status"] == "error"
