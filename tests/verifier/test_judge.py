"""The rubric judge on the real tiny model, in-process: prompt layout, constrained and lenient
verdicts, retries, rule items, the cache and per-conversation slots, tool calls and results."""

from __future__ import annotations

import asyncio
import json
import logging
import os

import pytest

from clinicloop.store.db import Store
from clinicloop.store.records import LoggedChoice, TurnRecord
from clinicloop.verifier.client import HttpChatClient
from clinicloop.verifier.judge import (
    EXPLANATION_MAX_CHARS,
    Judge,
    MemoryVerdictCache,
    StoreVerdictCache,
    Verdict,
    item_key,
    parse_verdict,
    prompt_prefix,
    prompt_suffix,
    render_conversation,
    render_prompt,
    stored_item_key,
    verdict_key,
)
from clinicloop.verifier.rubrics import RubricItem, RuleCheck
from tests.conftest import free_port
from tests.verifier.clients import CountingClient, with_client

CONVERSATION = [
    {"role": "system", "content": "You are a careful doctor."},
    {"role": "user", "content": "I have had a headache and a fever of 39 C for three days."},
    {"role": "assistant", "content": "Do you have a stiff neck, a rash, or confusion?"},
    {"role": "user", "content": [{"type": "text", "text": "No, just tired and achy."}]},
]
RESPONSE = ("Rest, drink plenty of fluids and take paracetamol for the fever. See a doctor today "
            "if the fever passes three days, and call emergency services if your neck gets stiff.")
ITEMS = [
    RubricItem(criterion=f"Criterion {i}: advises seeing a doctor if the fever persists",
               points=(i % 9 + 1) * (1 if i % 3 else -1), tags=["axis:accuracy"])
    for i in range(10)
]


@pytest.mark.parametrize("template", ["healthbench", "split"])
def test_prompts_put_the_conversation_first_and_the_item_last(template):
    conversation = render_conversation(CONVERSATION, RESPONSE)
    prompts = [render_prompt(CONVERSATION, RESPONSE, item, template) for item in ITEMS]
    for item, prompt in zip(ITEMS, prompts, strict=True):
        assert prompt.endswith(f"\n[{item.points}] {item.criterion}")
        assert prompt.index(conversation) < prompt.index(item.criterion)
    assert conversation.endswith(f"assistant: {RESPONSE}")
    assert "user: No, just tired and achy." in conversation  # content parts keep their text
    shared = os.path.commonprefix(prompts)
    assert conversation + "\n\n" in shared  # every item reuses the whole conversation
    assert max(len(p) - len(shared) for p in prompts) < 0.3 * len(shared)


def test_split_asks_acceptable_for_positive_and_unacceptable_for_negative_items():
    good = RubricItem(criterion="Advises rest", points=5)
    bad = RubricItem(criterion="Recommends antibiotics for a viral illness", points=-7)
    assert "acceptable" in prompt_suffix(good, "split")
    assert "unacceptable" not in prompt_suffix(good, "split")
    assert "unacceptable" in prompt_suffix(bad, "split")
    # HealthBench's single template asks the same question whatever the sign.
    assert prompt_suffix(good, "healthbench").replace("[5] Advises rest", "") == \
        prompt_suffix(bad, "healthbench").replace(f"[-7] {bad.criterion}", "")


@pytest.mark.parametrize("template", ["healthbench", "split"])
def test_constrained_verdicts_on_the_tiny_model_are_all_parseable(tiny_model, tmp_path, template):
    async def body(client: CountingClient) -> list[Verdict]:
        return await Judge(client, template=template).grade_all(CONVERSATION, RESPONSE, ITEMS)

    verdicts = with_client(tiny_model, tmp_path, body)
    assert len(verdicts) == len(ITEMS)
    for verdict in verdicts:
        assert verdict.source == "llm" and isinstance(verdict.criteria_met, bool)
        assert verdict.attempts == 1
        assert len(verdict.explanation) <= EXPLANATION_MAX_CHARS


@pytest.mark.parametrize(("text", "expected"), [
    ('{"explanation": "ok", "criteria_met": true}', (True, "ok")),
    ('```json\n{\n  "explanation": "no advice",\n  "criteria_met": false\n}\n```',
     (False, "no advice")),
    ('```\n{"criteria_met": true, "explanation": "x"}\n```', (True, "x")),
    ('Here is my verdict: {"explanation": "fine", "criteria_met": false} Hope it {helps}.',
     (False, "fine")),
    ("{'explanation': \"doesn't advise rest\", 'criteria_met': True}",
     (True, "doesn't advise rest")),
    ("{'explanation': 'met', 'criteria_met': false}", (False, "met")),
    ('{"explanation": "a raw\nnewline", "criteria_met": true}', (True, "a raw\nnewline")),
    ('{"explanation": "as text", "criteria_met": "False"}', (False, "as text")),
    ('{"criteria_met": true}', (True, "")),
    ('{"explanation": "no verdict"}', None),
    ('{"explanation": "a number", "criteria_met": 1}', None),
    ('{"explanation": "cut off", "criteria_me', None),
    ("[true]", None),
    ("Rest and fluids; see a doctor if it persists.", None),
    ("", None),
])
def test_parse_verdict_is_lenient_but_never_guesses(text, expected):
    assert parse_verdict(text) == expected


def test_unconstrained_garbage_is_recorded_as_unparseable_after_the_retries(tiny_model, tmp_path):
    cache = MemoryVerdictCache()

    async def body(client: CountingClient) -> tuple[list[Verdict], list[Verdict], int]:
        judge = Judge(client, constrained=False, max_retries=2, max_tokens=24, cache=cache)
        retried = await judge.grade_all(CONVERSATION, RESPONSE, ITEMS[:2])
        calls = client.calls
        once = await Judge(client, constrained=False, max_retries=0, max_tokens=24).grade_all(
            CONVERSATION, RESPONSE, ITEMS[:2])
        return retried, once, calls

    retried, once, calls = with_client(tiny_model, tmp_path, body)
    assert calls == 2 * 3
    assert [v.attempts for v in retried] == [3, 3] and [v.attempts for v in once] == [1, 1]
    for verdict in retried + once:
        assert verdict == Verdict(criteria_met=None, source="unparseable",
                                  attempts=verdict.attempts)
    assert len(cache) == 0  # an unparseable verdict is retried next time, not cached


def test_a_refused_request_is_not_retried_and_keeps_the_servers_message(tiny_model, tmp_path,
                                                                         caplog):
    # A completion longer than the context is a real 400 from the engine: it would fail the
    # same way on every attempt, so it is asked once and the verdict says why it failed.
    async def body(client: CountingClient) -> tuple[Verdict, int]:
        verdict = await Judge(client, max_tokens=4096).grade(CONVERSATION, RESPONSE, ITEMS[0])
        return verdict, client.calls

    with caplog.at_level(logging.WARNING, logger="clinicloop.verifier.judge"):
        verdict, calls = with_client(tiny_model, tmp_path, body, n_ctx=1024)
    assert calls == 1 and verdict.attempts == 1
    assert verdict.criteria_met is None and verdict.source == "error"
    assert verdict.error is not None and verdict.error.startswith(
        "400: This model's maximum context length is 1024 tokens")
    logged = [r.getMessage() for r in caplog.records if r.name == "clinicloop.verifier.judge"]
    assert len(logged) == 1 and "ChatError 400" in logged[0]
    assert not any("context length" in m or "headache" in m for m in logged)


def test_rule_items_never_call_the_model(tiny_model, tmp_path):
    rules = [
        RubricItem(criterion="Mentions paracetamol", points=3, tags=["kind:rule"],
                   rule=RuleCheck(type="keywords", keywords=["paracetamol"])),
        RubricItem(criterion="Mentions antibiotics", points=-5, tags=["kind:rule"],
                   rule=RuleCheck(type="regex", pattern=r"antibiotic")),
    ]

    async def body(client: CountingClient) -> tuple[list[Verdict], int]:
        verdicts = await Judge(client).grade_all(CONVERSATION, RESPONSE, [*rules, ITEMS[0]])
        return verdicts, client.calls

    verdicts, calls = with_client(tiny_model, tmp_path, body)
    assert calls == 1  # the one LLM item
    assert [(v.source, v.criteria_met, v.attempts) for v in verdicts[:2]] == [
        ("rule", True, 0), ("rule", False, 0)]
    assert verdicts[2].source == "llm"


def test_the_cache_answers_without_a_model_call(tiny_model, tmp_path):
    cache = MemoryVerdictCache()

    async def body(client: CountingClient) -> tuple[list[Verdict], list[Verdict], list[int]]:
        judge = Judge(client, cache=cache)
        first = await judge.grade_all(CONVERSATION, RESPONSE, ITEMS[:3])
        calls = [client.calls]
        again = await judge.grade_all(CONVERSATION, RESPONSE, ITEMS[:3])
        calls.append(client.calls)
        # Another template, or another response, is another verdict.
        await Judge(client, cache=cache, template="healthbench").grade(
            CONVERSATION, RESPONSE, ITEMS[0])
        await judge.grade(CONVERSATION, RESPONSE + " Get well soon.", ITEMS[0])
        calls.append(client.calls)
        return first, again, calls

    first, again, calls = with_client(tiny_model, tmp_path, body)
    assert calls == [3, 3, 5]
    assert [v.source for v in again] == ["cache"] * 3
    assert [(v.criteria_met, v.explanation) for v in again] == \
        [(v.criteria_met, v.explanation) for v in first]
    assert len(cache) == 5


def test_verdict_key_changes_with_what_the_judge_sees():
    item = ITEMS[1]
    key = verdict_key(CONVERSATION, RESPONSE, item, "judge-a", "split")
    assert key == verdict_key(CONVERSATION, RESPONSE, item.model_copy(update={"tags": []}),
                              "judge-a", "split")
    assert len({
        key,
        verdict_key(CONVERSATION, RESPONSE, item, "judge-b", "split"),
        verdict_key(CONVERSATION, RESPONSE, item, "judge-a", "healthbench"),
        verdict_key(CONVERSATION, RESPONSE + ".", item, "judge-a", "split"),
        verdict_key(CONVERSATION[1:], RESPONSE, item, "judge-a", "split"),
        verdict_key(CONVERSATION, RESPONSE, item.model_copy(update={"points": -item.points}),
                    "judge-a", "split"),
    }) == 6


def test_a_conversation_holds_its_slot_so_its_items_run_back_to_back(tiny_model, tmp_path):
    other = [{"role": "user", "content": "My child has a rash after eating peanuts."}]

    async def body(client: CountingClient) -> list[str]:
        judge = Judge(client, concurrency=1, max_tokens=256)
        await asyncio.gather(judge.grade_all(CONVERSATION, RESPONSE, ITEMS[:3]),
                             judge.grade_all(other, "Give an antihistamine.", ITEMS[:3]))
        return client.prompts

    prompts = with_client(tiny_model, tmp_path, body)
    owners = ["peanuts" in p for p in prompts]
    assert owners in ([False] * 3 + [True] * 3, [True] * 3 + [False] * 3)


def test_the_judge_stores_every_verdict_it_makes(tiny_model, tmp_path):
    # Rule, model and failed verdicts each become a row of the store's verdicts table; an
    # answered one is reused from there, never asked again.
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.migrate()
    store.insert_many([TurnRecord(
        id="t", conversation_id="c", endpoint="chat.completions", model="m", model_version="v1",
        messages=CONVERSATION, choices=[LoggedChoice(index=0, content=RESPONSE,
                                                     finish_reason="stop")])])
    rule = RubricItem(criterion="Mentions paracetamol", points=3, tags=["kind:rule"],
                      rule=RuleCheck(type="keywords", keywords=["paracetamol"]))
    items = [rule, ITEMS[0], ITEMS[1]]

    async def body(client: CountingClient) -> tuple[list[Verdict], list[Verdict], list[int]]:
        cache = StoreVerdictCache(store)
        judge = Judge(client, cache=cache)
        cache.expect("t", [verdict_key(CONVERSATION, RESPONSE, i, client.model, "split")
                           for i in items], items, client.model, "split")
        made = await judge.grade_all(CONVERSATION, RESPONSE, items[:2])
        # A prompt plus max_tokens longer than the context: the server refuses it.
        made.append(await Judge(client, cache=cache, max_tokens=4096).grade(
            CONVERSATION, RESPONSE, items[2]))
        calls = [client.calls]
        again = await judge.grade_all(CONVERSATION, RESPONSE, items[:2])
        calls.append(client.calls)
        return made, again, calls

    made, again, calls = with_client(tiny_model, tmp_path, body, n_ctx=1024)
    assert [v.source for v in made] == ["rule", "llm", "error"]
    stored = store.list_verdicts("t")
    assert [(v.source, v.criteria_met) for v in stored] == [
        (v.source, v.criteria_met) for v in made]
    assert stored[2].explanation == made[2].error
    assert [v.source for v in again] == ["rule", "cache"] and calls == [2, 2]
    store.dispose()


# A drug-interaction lookup as logged: the history holds an earlier call and its result; the
# graded reply is a second call with no text.
LOOKUP = {"id": "call_a", "type": "function", "function": {
    "name": "check_drug_interaction", "arguments": '{"drug_a": "warfarin", "drug_b": "ibuprofen"}'}}
TOOL_CONVERSATION = [
    {"role": "user", "content": "Can I take ibuprofen with my warfarin?"},
    {"role": "assistant", "content": None, "tool_calls": [LOOKUP]},
    {"role": "tool", "tool_call_id": "call_a", "content": "major: raises the risk of bleeding"},
    {"role": "assistant", "content": "Better not: together they raise the risk of bleeding."},
    {"role": "user", "content": "And paracetamol?"},
]
REPLY_CALLS = [{"id": "call_b", "type": "function", "function": {
    "name": "check_drug_interaction",
    "arguments": '{"drug_a": "warfarin", "drug_b": "paracetamol"}'}}]


def test_the_judge_sees_tool_calls_and_results():
    rendered = render_conversation(TOOL_CONVERSATION, "", REPLY_CALLS)
    assert rendered.split("\n\n") == [
        "user: Can I take ibuprofen with my warfarin?",
        'assistant: [tool call] check_drug_interaction({"drug_a": "warfarin", "drug_b": '
        '"ibuprofen"})',
        "tool (check_drug_interaction): major: raises the risk of bleeding",
        "assistant: Better not: together they raise the risk of bleeding.",
        "user: And paracetamol?",
        'assistant: [tool call] check_drug_interaction({"drug_a": "warfarin", "drug_b": '
        '"paracetamol"})',
    ]
    # Text and calls in one turn; arguments already parsed render as the logged JSON text does;
    # a result whose call is unknown keeps the plain role.
    parsed = [{**c, "function": {**c["function"], "arguments": json.loads(
        c["function"]["arguments"])}} for c in REPLY_CALLS]
    assert render_conversation(
        [{"role": "tool", "tool_call_id": "call_x", "content": "none found"}],
        "Let me check.", parsed) == (
        "tool: none found\n\nassistant: Let me check.\n"
        + render_conversation([], "", REPLY_CALLS).removeprefix("assistant: "))
    # Without calls the rendering is what it always was.
    assert render_conversation(CONVERSATION, RESPONSE, None) == \
        render_conversation(CONVERSATION, RESPONSE, [])
    # The judge is told how calls read only where there are any.
    note = "An assistant turn may call tools"
    assert note in prompt_prefix(TOOL_CONVERSATION, "", "split", REPLY_CALLS)
    assert note in prompt_prefix(TOOL_CONVERSATION, "Yes, it is safe.", "healthbench")
    assert note in prompt_prefix([], "", "split", REPLY_CALLS)
    assert note not in prompt_prefix(CONVERSATION, RESPONSE, "split")


def test_verdict_key_changes_with_the_replys_tool_calls():
    item = ITEMS[1]

    def key(calls: list | None) -> str:
        return verdict_key(TOOL_CONVERSATION, "", item, "judge-a", "split", calls)

    other_args = [{**REPLY_CALLS[0], "function": {**REPLY_CALLS[0]["function"],
                                                  "arguments": '{"drug_a": "warfarin"}'}}]
    other_name = [{**REPLY_CALLS[0], "function": {**REPLY_CALLS[0]["function"],
                                                  "name": "book_appointment"}}]
    assert len({key(None), key(REPLY_CALLS), key(other_args), key(other_name),
                key(REPLY_CALLS + other_name)}) == 5
    # No calls: the key verdicts were stored under before calls were graded.
    assert key([]) == key(None) == verdict_key(TOOL_CONVERSATION, "", item, "judge-a", "split")
    # The history's calls and results are part of the conversation, so of the key.
    assert verdict_key(TOOL_CONVERSATION[:1] + TOOL_CONVERSATION[3:], "", item, "judge-a",
                       "split", REPLY_CALLS) != key(REPLY_CALLS)


def test_a_reply_is_graded_with_its_tool_calls(tiny_model, tmp_path):
    wanted = RubricItem(criterion="Looks up the interaction", points=5, tags=["kind:rule"],
                        rule=RuleCheck(type="tool_call", name="check_drug_interaction",
                                       arguments={"drug_b": "Paracetamol"}))
    unwanted = RubricItem(criterion="Books an appointment", points=-3, tags=["kind:rule"],
                          rule=RuleCheck(type="tool_call", name="book_appointment"))
    judged = RubricItem(criterion="Checks the interaction before answering", points=4)
    cache = MemoryVerdictCache()

    async def body(client: CountingClient) -> tuple[list[Verdict], list[Verdict], Verdict]:
        judge = Judge(client, cache=cache)
        with_calls = await judge.grade_all(TOOL_CONVERSATION, "", [wanted, unwanted, judged],
                                           tool_calls=REPLY_CALLS)
        without = await judge.grade_all(TOOL_CONVERSATION, "", [wanted, unwanted])
        # Another call is another verdict, not the cached one.
        await judge.grade(TOOL_CONVERSATION, "", judged, tool_calls=REPLY_CALLS[:1] + [
            {**REPLY_CALLS[0], "id": "call_c"}])
        return with_calls, without, client.prompts

    with_calls, without, prompts = with_client(tiny_model, tmp_path, body)
    assert [(v.source, v.criteria_met) for v in with_calls[:2]] == [("rule", True),
                                                                   ("rule", False)]
    assert with_calls[2].source == "llm"
    assert [v.criteria_met for v in without] == [False, False]
    assert len(prompts) == 2 and prompts[0] != prompts[1]
    assert prompts[0].count("[tool call] check_drug_interaction(") == 2
    assert "tool (check_drug_interaction): major: raises the risk of bleeding" in prompts[0]


def test_item_key_is_what_the_judge_sees_of_an_item():
    item = ITEMS[1]
    assert item_key(item) == item_key(item.model_copy(update={"tags": ["axis:completeness"]}))
    assert item_key(item) != item_key(item.model_copy(update={"points": -item.points}))
    assert item_key(item) != item_key(item.model_copy(update={"criterion": "Other"}))
    # A stored item (a dict) names the same item; one that is not a valid item names none.
    assert stored_item_key(item.model_dump(mode="json")) == item_key(item)
    for broken in ({}, {"criterion": "x", "points": 0}, {"criterion": "x", "points": "ten"}):
        assert stored_item_key(broken) == ""


def test_a_reviewer_label_stands_in_for_the_judge_and_is_not_cached(tmp_path):
    # A dead endpoint: a labelled item never reaches the model; an unlabelled one does (and fails).
    labelled, unlabelled = ITEMS[1], ITEMS[2]
    handed: list[Verdict] = []  # every verdict the judge hands its cache

    class Recording(MemoryVerdictCache):
        def put(self, key: str, verdict: Verdict) -> None:
            handed.append(verdict)
            super().put(key, verdict)

    cache = Recording()

    async def main() -> list[Verdict]:
        dead = HttpChatClient(f"http://127.0.0.1:{free_port()}/v1", model="judge")
        try:
            key = verdict_key(CONVERSATION, RESPONSE, labelled, dead.model, "split")
            judge = Judge(dead, cache=cache, max_retries=0, labels={key: False})
            return await judge.grade_all(CONVERSATION, RESPONSE, [labelled, unlabelled])
        finally:
            await dead.aclose()

    reviewer, judged = asyncio.run(main())
    assert (reviewer.source, reviewer.criteria_met, reviewer.attempts) == ("reviewer", False, 0)
    assert judged.source == "error" and judged.attempts == 1
    assert [v.source for v in handed] == ["error"]
