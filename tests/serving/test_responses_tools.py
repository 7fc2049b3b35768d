"""Function tools in the Responses API, with the official `openai` client against real servers:
calls forced by `tool_choice` on the tiny model (the grammar makes it call), streamed as the
client assembles them, a result sent back through `previous_response_id` across a restart and
as items passed back, GET of a stored call, the 400s; text and a call together over an upstream."""

from __future__ import annotations

import json
import sqlite3

import openai
import pytest

from clinicloop.model.corpus import TOOLS
from tests.conftest import ROOT, start_server, stop_server
from tests.serving import scripted_upstream

KEY = "sk-test-responses-tools"
KEYS = {"CLINICLOOP_SERVER__API_KEYS": f'["{KEY}"]'}
# The corpus's tools in this API's flat shape, and one whose schema bounds every argument.
DRUG_LOOKUP, BOOKING = ({"type": "function", **tool["function"]} for tool in TOOLS)
FOLLOW_UP = {"type": "function", "name": "schedule_follow_up",
             "description": "Schedule a follow-up visit.",
             "parameters": {"type": "object", "properties": {
                 "days": {"type": "integer", "minimum": 1, "maximum": 30},
                 "urgency": {"type": "string", "enum": ["routine", "soon", "urgent"]},
             }, "required": ["days", "urgency"], "additionalProperties": False}}
QUESTION = "Can I take ibuprofen together with warfarin?"
BOOK = "Please book me a dermatology appointment."
FORCE_FOLLOW_UP = {"type": "function", "name": "schedule_follow_up"}
RESULT = json.dumps({"booked": True, "when": "Tuesday 9:00"})


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory(KEYS)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key=KEY, max_retries=0)


def _create(client, tiny_model, **kwargs):
    return client.responses.create(model=tiny_model.name, temperature=0,
                                   **{"max_output_tokens": 120, **kwargs})


def _messages(db_path, response_id):
    with sqlite3.connect(db_path) as db:
        return json.loads(db.execute("select messages from turns where id = ?",
                                     (response_id,)).fetchone()[0])


def test_a_named_function_is_called_and_streamed_as_the_client_assembles_it(client,
                                                                              tiny_model):
    kwargs = dict(input=QUESTION, tools=[DRUG_LOOKUP, FOLLOW_UP], tool_choice=FORCE_FOLLOW_UP)
    full = _create(client, tiny_model, **kwargs)
    assert full.status == "completed"
    [call] = full.output  # a reply that only calls has no message item
    assert call.type == "function_call" and call.name == "schedule_follow_up"
    assert call.status == "completed" and call.call_id.startswith("chatcmpl-tool-")
    assert call.id == "fc" + full.id.removeprefix("resp") + "-0"
    args = json.loads(call.arguments)
    assert set(args) == {"days", "urgency"} and 1 <= args["days"] <= 30
    assert args["urgency"] in ("routine", "soon", "urgent")
    assert full.output_text == ""
    assert [t.name for t in full.tools] == ["check_drug_interaction", "schedule_follow_up"]
    assert full.tool_choice.name == "schedule_follow_up" and full.parallel_tool_calls

    events = list(_create(client, tiny_model, stream=True, **kwargs))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    # How many fragments depends on the event loop: tokens that arrive while it is busy go out as
    # one delta (release as written: test_streamed_arguments_are_the_model_text_released_...).
    assert deltas, "arguments arrive as deltas"
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     *["response.function_call_arguments.delta"] * len(deltas),
                     "response.function_call_arguments.done", "response.output_item.done",
                     "response.completed"]
    added, done, final = events[2].item, events[-2].item, events[-1].response
    assert (added.type, added.arguments, added.status) == ("function_call", "", "in_progress")
    # Greedy: the stream joins to the same call (call ids are fresh per response).
    assert "".join(deltas) == events[-3].arguments == done.arguments == call.arguments
    assert added.id == done.id == final.output[0].id == events[-3].item_id
    assert [(i.type, i.name, i.arguments) for i in final.output] == [
        ("function_call", "schedule_follow_up", call.arguments)]

    with client.responses.stream(model=tiny_model.name, temperature=0, max_output_tokens=120,
                                 **kwargs) as stream:
        streamed = [e for e in stream]
        final = stream.get_final_response()
    assert [e.snapshot for e in streamed
            if e.type == "response.function_call_arguments.delta"][-1] == call.arguments
    assert [(i.type, i.name, i.arguments) for i in final.output] == [
        ("function_call", "schedule_follow_up", call.arguments)]


def test_required_with_parallel_calls_off_makes_one_call(client, tiny_model):
    response = _create(client, tiny_model, input=QUESTION, tools=[BOOKING, FOLLOW_UP],
                       tool_choice="required", parallel_tool_calls=False)
    assert response.status == "completed"
    [call] = response.output
    assert call.type == "function_call"
    assert call.name in ("book_appointment", "schedule_follow_up")
    assert isinstance(json.loads(call.arguments), dict)
    assert response.tool_choice == "required" and response.parallel_tool_calls is False


def test_reasoning_then_a_forced_call_are_two_items_in_order(client, tiny_model):
    kwargs = dict(input=QUESTION, tools=[FOLLOW_UP], tool_choice="required",
                  parallel_tool_calls=False, reasoning={"effort": "high"}, max_output_tokens=300)
    full = _create(client, tiny_model, **kwargs)
    reasoning, call = full.output
    assert reasoning.type == "reasoning" and "<tool_call>" not in reasoning.content[0].text
    assert call.type == "function_call" and call.name == "schedule_follow_up"
    events = list(_create(client, tiny_model, stream=True, **kwargs))
    added = [(e.output_index, e.item.type) for e in events
             if e.type == "response.output_item.added"]
    assert added == [(0, "reasoning"), (1, "function_call")]
    kinds = [e.type for e in events]
    # The reasoning item is done before the call's item is added.
    assert kinds.index("response.output_item.done") < kinds.index(
        "response.function_call_arguments.delta")
    assert [(i.type, getattr(i, "arguments", None)) for i in events[-1].response.output] == [
        ("reasoning", None), ("function_call", call.arguments)]


def test_a_call_cut_short_is_an_incomplete_item(client, tiny_model):
    kwargs = dict(input=QUESTION, tools=[FOLLOW_UP], tool_choice="required",
                  parallel_tool_calls=False)
    whole = _create(client, tiny_model, **kwargs)
    # Ten tokens short of the whole call: inside its arguments.
    cut = _create(client, tiny_model, max_output_tokens=whole.usage.output_tokens - 10,
                  **kwargs)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    [call] = cut.output
    assert call.type == "function_call" and call.status == "incomplete"
    assert whole.output[0].arguments.startswith(call.arguments) and call.arguments
    assert call.arguments != whole.output[0].arguments
    events = list(_create(client, tiny_model, stream=True,
                          max_output_tokens=whole.usage.output_tokens - 10, **kwargs))
    assert events[-1].type == "response.incomplete"
    assert events[-2].type == "response.output_item.done"
    assert (events[-2].item.status, events[-2].item.arguments) == ("incomplete", call.arguments)


def test_get_returns_the_stored_call(client, tiny_model):
    created = _create(client, tiny_model, input=QUESTION, tools=[FOLLOW_UP],
                      tool_choice="required", parallel_tool_calls=False)
    got = client.responses.retrieve(created.id)
    assert got.output == created.output and got.output[0].type == "function_call"
    assert (got.tools, got.tool_choice, got.parallel_tool_calls) == (
        created.tools, "required", False)


def test_a_result_continues_through_previous_response_id_across_a_restart(tmp_path, tiny_model):
    env = {**KEYS, "CLINICLOOP_ENGINE__MODEL_PATH": str(tiny_model.gguf_q8_0),
           "CLINICLOOP_ENGINE__SERVED_MODEL_NAME": tiny_model.name,
           "CLINICLOOP_MODELS_DIR": str(ROOT / "var" / "models")}
    first = start_server(tmp_path, env)
    try:
        c = openai.OpenAI(base_url=first.v1, api_key=KEY, max_retries=0)
        r1 = _create(c, tiny_model, input=BOOK, tools=[BOOKING],
                     tool_choice={"type": "function", "name": "book_appointment"})
    finally:
        stop_server(first)
    assert r1.status == "completed"
    [call] = r1.output
    second = start_server(tmp_path, env)  # same store, nothing in memory
    try:
        c = openai.OpenAI(base_url=second.v1, api_key=KEY, max_retries=0)
        answer = {"type": "function_call_output", "call_id": call.call_id, "output": RESULT}
        r2 = _create(c, tiny_model, previous_response_id=r1.id, input=[answer],
                     tools=[BOOKING], tool_choice="none")
        assert r2.status in ("completed", "incomplete") and r2.output_text
        history = [
            {"role": "user", "content": BOOK},
            {"role": "assistant", "content": "", "tool_calls": [{
                "id": call.call_id, "type": "function",
                "function": {"name": "book_appointment", "arguments": call.arguments}}]},
            {"role": "tool", "tool_call_id": call.call_id, "content": RESULT},
        ]
        # The model saw the call and its result, as a chat client would have sent them.
        assert _messages(second.db_path, r2.id) == history
        chat = c.chat.completions.create(model=tiny_model.name, messages=history,
                                         temperature=0, max_tokens=120,
                                         tools=TOOLS[1:], tool_choice="none")
        assert r2.output_text == chat.choices[0].message.content
        # Without the store: the call item passed back as the client returned it.
        r3 = _create(c, tiny_model, input=[{"role": "user", "content": BOOK}, *r1.output,
                                           answer],
                     tools=[BOOKING], tool_choice="none")
        assert _messages(second.db_path, r3.id) == history
        assert r3.output_text == r2.output_text
    finally:
        stop_server(second)


def test_an_assistant_message_and_its_calls_are_one_turn(server, client, tiny_model):
    calls = [{"type": "function_call", "call_id": f"call-{i}", "name": "book_appointment",
              "arguments": json.dumps({"specialty": "dermatology", "day": day})}
             for i, day in enumerate(("Monday", "Friday"))]
    r = _create(client, tiny_model, max_output_tokens=8, input=[
        {"role": "user", "content": "Book me a dermatologist."},
        {"type": "reasoning", "summary": []},
        {"role": "assistant", "content": "Let me check both days."}, *calls,
        *({"type": "function_call_output", "call_id": f"call-{i}",
           "output": [{"type": "input_text", "text": "booked"}]} for i in range(2))])
    assert _messages(server.db_path, r.id) == [
        {"role": "user", "content": "Book me a dermatologist."},
        {"role": "assistant", "content": "Let me check both days.", "tool_calls": [
            {"id": c["call_id"], "type": "function",
             "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]},
        {"role": "tool", "tool_call_id": "call-0", "content": "booked"},
        {"role": "tool", "tool_call_id": "call-1", "content": "booked"},
    ]


@pytest.mark.parametrize("fields, param, named", [
    ({"tools": [DRUG_LOOKUP], "tool_choice": {"type": "function", "name": "order_pizza"}},
     "tool_choice", "order_pizza"),
    ({"tool_choice": "required"}, "tool_choice", "tools"),
    ({"tools": [{"type": "web_search"}]}, "tools", "web_search"),
    ({"tools": [DRUG_LOOKUP, {"type": "file_search", "vector_store_ids": ["vs"]}]}, "tools",
     "file_search"),
    ({"tools": [DRUG_LOOKUP, DRUG_LOOKUP]}, "tools", "unique"),
    ({"tools": [{**DRUG_LOOKUP, "name": "bad name!"}]}, "tools.0.name", "pattern"),
    ({"tools": [DRUG_LOOKUP], "tool_choice": {"type": "allowed_tools", "mode": "auto",
                                              "tools": []}}, "tool_choice", "allowed_tools"),
    ({"tools": [DRUG_LOOKUP], "max_tool_calls": 2}, "max_tool_calls", "parallel_tool_calls"),
    ({"input": [{"type": "function_call_output", "call_id": "call-x", "output": "{}"}]},
     "input.0.call_id", "call-x"),
    ({"input": [{"role": "user", "content": "Hi"}, {"type": "function_call", "call_id": "c",
                                                     "name": "f", "arguments": "[1]"}]},
     "input.1.function_call.arguments", "JSON object"),
    ({"input": [{"type": "function_call_output", "call_id": "c",
                 "output": [{"type": "input_image", "image_url": "x"}]}]},
     "input.0.function_call_output.output.0.type", "input_text"),
])
def test_what_cannot_be_honoured_is_a_400_naming_it(client, tiny_model, fields, param, named):
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=tiny_model.name, max_output_tokens=8,
                                extra_body={"input": QUESTION, **fields})
    assert (err.value.body["param"] or "").startswith(param), err.value.body
    assert named in err.value.body["message"], err.value.body


def test_on_an_upstream_text_then_a_call_are_two_items_in_order(server_factory):
    """The scripted upstream answers "Hello", then a call whose arguments come in three
    fragments, as vLLM's hermes parser streams them."""
    with scripted_upstream.running() as url:
        gateway = server_factory({"CLINICLOOP_ENGINE__KIND": "openai",
                                  "CLINICLOOP_ENGINE__UPSTREAM_URL": url, **KEYS})
        c = openai.OpenAI(base_url=gateway.v1, api_key=KEY, max_retries=0)
        kwargs = dict(model=c.models.list().data[0].id, tools=[DRUG_LOOKUP],
                      input=f"{QUESTION} @@tool_calls@@")
        full = c.responses.create(**kwargs)
        events = list(c.responses.create(stream=True, **kwargs))
    message, call = full.output
    assert (message.type, full.output_text) == ("message", "Hello")
    assert (call.type, call.name, call.call_id) == ("function_call", "check_drug_interaction",
                                                    "chatcmpl-tool-up1")
    assert json.loads(call.arguments) == {"drug_a": "ibuprofen", "drug_b": "warfarin"}
    kinds = [e.type for e in events]
    assert kinds[kinds.index("response.output_item.done"):] == [
        "response.output_item.done", "response.output_item.added",
        *["response.function_call_arguments.delta"] * 3,
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    assert [e.output_index for e in events if e.type == "response.output_item.added"] == [0, 1]
    streamed = events[-1].response
    assert streamed.output_text == "Hello"
    assert [(i.type, getattr(i, "call_id", None), getattr(i, "arguments", None))
            for i in streamed.output] == [("message", None, None),
                                          ("function_call", call.call_id, call.arguments)]
