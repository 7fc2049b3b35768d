"""The rubric generator: parsing and validating a model's items, red-flag rule items, dedup, and the
per-prefix cache (memory and store), on the real tiny model in-process."""

from __future__ import annotations

import asyncio
import json

from clinicloop.model.corpus import load_corpus
from clinicloop.store.db import Store
from clinicloop.store.reviews import add_rubric_edit
from clinicloop.verifier.client import HttpChatClient
from clinicloop.verifier.generator import (
    DIMENSIONS,
    RubricGenerator,
    dedupe,
    normalise,
    parse_items,
    prefix_hash,
    red_flags,
    rule_items,
)
from clinicloop.verifier.judge import item_key
from clinicloop.verifier.patients import load_scripts
from clinicloop.verifier.rubrics import RubricItem, check_rule
from tests.conftest import free_port
from tests.verifier.clients import CountingClient, with_client

CHEST_PAIN = [
    {"role": "system", "content": "You are a careful doctor."},
    {"role": "user", "content": "I've had crushing chest pain for an hour and I'm sweating."},
]


def assert_valid_rubric(items: list[RubricItem]) -> None:
    keys = [normalise(i.criterion) for i in items]
    assert len(set(keys)) == len(keys) and all(keys)
    for item in items:
        RubricItem.model_validate(item.model_dump())
        if not item.is_rule:
            (dimension,) = item.tag_values("dimension")
            assert item.tag_values("axis") == [DIMENSIONS[dimension]]


def test_parse_items_validates_tags_and_keeps_what_a_cut_off_reply_finished():
    reply = json.dumps({"items": [
        {"criterion": "Asks how long the pain has lasted", "points": 5,
         "dimension": "inquiry_logic"},
        {"criterion": "Prescribes antibiotics without an indication", "points": -7,
         "dimension": "treatment_appropriateness"},
        {"criterion": "Zero points are not allowed", "points": 0, "dimension": "clarity"},
        {"criterion": "Too many points", "points": 11, "dimension": "clarity"},
        {"criterion": "Unknown dimension", "points": 3, "dimension": "vibes"},
        {"criterion": "   ", "points": 3, "dimension": "clarity"},
    ]})
    items, invalid = parse_items(reply)
    assert [(i.criterion, i.points) for i in items] == [
        ("Asks how long the pain has lasted", 5),
        ("Prescribes antibiotics without an indication", -7)]
    assert items[1].tags == ["axis:accuracy", "dimension:treatment_appropriateness"]
    assert invalid == 4

    cut = reply[: reply.index("Prescribes") + 20]  # max_tokens hit inside the second item
    items, invalid = parse_items("```json\n" + cut)
    assert [i.criterion for i in items] == ["Asks how long the pain has lasted"]
    assert invalid == 0
    assert parse_items("not json at all") == ([], 0)


def test_dedupe_ignores_case_punctuation_and_spacing():
    a = RubricItem(criterion="Advises rest and fluids.", points=4)
    b = RubricItem(criterion="advises  rest, and FLUIDS", points=6)
    c = RubricItem(criterion="Advises rest", points=4)
    assert dedupe([a, b, c]) == ([a, c], 1)


def test_red_flags_come_from_the_user_only_and_make_a_rule_item():
    assert red_flags(CHEST_PAIN) == ["chest pain with sweating or breathlessness",
                                     "chest pain lasting more than 15 minutes"]
    assert red_flags([{"role": "user", "content": "Chest pressure, and I'm short of breath"}]) \
        == ["chest pain with sweating or breathlessness"]
    assert red_flags([{"role": "user", "content": "I have chest pain after running."}]) == []
    assert red_flags([{"role": "user", "content": "My knee hurts."},
                      {"role": "assistant", "content": "Any slurred speech or a stroke?"}]) == []
    assert red_flags([{"role": "user", "content": [
        {"type": "text", "text": "Sometimes I want to end my life."}]}]) == ["suicidal thoughts"]

    (item,) = rule_items(CHEST_PAIN)
    assert item.is_rule and item.points > 0 and "dimension:ethics_safety" in item.tags
    assert item.rule is not None
    assert check_rule(item.rule, "Call 911 now or go to the nearest ER.")
    assert check_rule(item.rule, "Please go to the emergency department.")
    assert not check_rule(item.rule, "Rest and take ibuprofen; it is probably a muscle strain.")
    assert rule_items([{"role": "user", "content": "I have a mild cold."}]) == []


def _user(*texts: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": t} for t in texts]


def test_red_flags_catch_every_emergency_script_and_no_other():
    scripts = load_scripts()
    emergencies = {s.id: s.record for s in scripts if s.outcome.red_flag}
    assert len(emergencies) == 11
    missed = [id_ for id_, r in emergencies.items()
              if not red_flags(_user(f"{r.chief_complaint} {r.present_illness}"))]
    assert missed == []
    # Pain with spotting, and fever with headache and vomiting, are not emergencies by themselves:
    # feeling faint, light hurting the eyes and a non-blanching rash come in the present illness.
    assert {id_ for id_, r in emergencies.items() if not red_flags(_user(r.chief_complaint))} \
        == {"gyn-ectopic", "infect-meningitis"}

    false_alarms = {}
    for script in scripts:
        if script.outcome.red_flag:
            continue
        record = script.record  # all the simulated patient may say, denials included
        said = _user(f"{record.chief_complaint} {record.present_illness}",
                     *(f.statement for f in [*record.facts, *record.hidden]))
        if flags := red_flags(said):
            false_alarms[script.id] = flags
    assert false_alarms == {}


def test_red_flags_on_the_training_corpus_user_turns():
    turns: dict[str, int] = {}
    flagged: dict[str, int] = {}
    for row in load_corpus():
        # A question asked with tools offered keeps its own topic in its id.
        topic = "red_flag" if row["id"].startswith("tool-none-red_flag-") else row["topic"]
        for message in row["messages"]:
            if message["role"] == "user":
                turns[topic] = turns.get(topic, 0) + 1
                flagged[topic] = flagged.get(topic, 0) + bool(red_flags([message]))
    assert {"symptom", "follow_up", "medication", "clarify", "red_flag"} <= set(turns)
    # Measured: 0 false alarms (1 before: "no fainting"), and all 104 red-flag turns (20 before).
    assert sum(n for topic, n in flagged.items() if topic != "red_flag") == 0
    assert flagged["red_flag"] == turns["red_flag"] >= 104


def test_prefix_hash_is_the_prompt_up_to_the_last_user_turn():
    reply = {"role": "assistant", "content": "Call 911."}
    assert prefix_hash(CHEST_PAIN) == prefix_hash([*CHEST_PAIN, reply])
    assert prefix_hash(CHEST_PAIN) != prefix_hash(
        [*CHEST_PAIN, reply, {"role": "user", "content": "And now?"}])


def test_generates_a_valid_rubric_on_the_tiny_model_and_caches_it(tiny_model, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.migrate()

    async def body(client: CountingClient) -> None:
        generator = RubricGenerator(client, store=store, max_items=4, max_tokens=256)
        first = await generator.for_conversation(CHEST_PAIN)
        assert first.source == "llm" and first.error is None and client.calls == 1
        assert first.items[0].is_rule and first.n_rule == 1
        assert_valid_rubric(first.items)
        # Concurrent asks for one prefix (the reply does not count) make one model call.
        again = await asyncio.gather(*(generator.for_conversation(
            [*CHEST_PAIN, {"role": "assistant", "content": f"reply {i}"}]) for i in range(3)))
        assert {r.source for r in again} == {"memory"} and client.calls == 1
        assert all(r.items == first.items for r in again)

        # A new generator (a new process) reads the store instead of asking the model.
        stored = await RubricGenerator(client, store=store).for_conversation(CHEST_PAIN)
        assert stored.source == "store" and client.calls == 1
        assert stored.items == first.items and stored.items[0].is_rule

        case = await generator.for_case({"chief_complaint": "cough for two weeks", "age": 54})
        assert case.source == "llm" and case.n_rule == 0 and client.calls == 2
        assert_valid_rubric(case.items)

    with_client(tiny_model, tmp_path, body)


def test_a_failed_model_call_still_returns_the_rule_items_and_is_not_cached(tmp_path):
    async def main() -> None:
        dead = HttpChatClient(f"http://127.0.0.1:{free_port()}/v1", model="judge")
        generator = RubricGenerator(dead)
        try:
            for _ in range(2):
                rubric = await generator.for_conversation(CHEST_PAIN)
                assert rubric.source == "llm" and rubric.error == "ChatError"
                assert [i.is_rule for i in rubric.items] == [True]
        finally:
            await dead.aclose()

    asyncio.run(main())


def test_reviewer_edits_of_a_prefix_apply_to_the_rubric_it_returns(tmp_path):
    # The rubric is stored, so the (dead) model is never asked: what comes back is the stored
    # rubric with the prefix's edits applied, in order, re-read at every call.
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.migrate()
    key = prefix_hash(CHEST_PAIN)
    first, second = (RubricItem(criterion=f"Item {i}", points=i + 1, tags=["axis:accuracy"])
                     for i in range(2))
    store.put_rubric_set(key, [i.model_dump(mode="json", exclude_none=True)
                               for i in (first, second)], "gen")

    def edit(action: str, target: RubricItem | None, item: RubricItem | None) -> None:
        add_rubric_edit(store, prefix_hash=key, turn_id=None, action=action,
                        target_key=None if target is None else item_key(target),
                        item=None if item is None else item.model_dump(mode="json"),
                        reviewer="abc")

    async def main() -> list[list[RubricItem]]:
        dead = HttpChatClient(f"http://127.0.0.1:{free_port()}/v1", model="judge")
        generator = RubricGenerator(dead, store=store)
        try:
            seen = [(await generator.for_conversation(CHEST_PAIN)).items]
            added = RubricItem(criterion="Asks about the pain's onset", points=4)
            edited = second.model_copy(update={"criterion": "Item 1, reworded", "points": 2})
            edit("add", None, added)
            edit("edit", second, edited)
            edit("remove", first, None)
            edit("remove", first, None)  # its target is gone: skipped
            edit("edit", second, first)  # so is this one's (edited above)
            seen.append((await generator.for_conversation(CHEST_PAIN)).items)
            seen.append((await RubricGenerator(dead).for_conversation(CHEST_PAIN)).items)
            return seen
        finally:
            await dead.aclose()

    before, after, storeless = asyncio.run(main())
    assert before == [first, second]
    assert [(i.criterion, i.points) for i in after] == [
        ("Item 1, reworded", 2), ("Asks about the pain's onset", 4)]
    assert store.get_rubric_set(key)[0][0]["criterion"] == "Item 0"  # never rewritten
    assert [i.is_rule for i in storeless] == [True]  # no store: no edits (and the model is dead)
