"""HealthBench JSONL round trips (byte-identical, key order, unknown fields) and rule checks,
`tool_call` rules on a reply's tool calls among them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from clinicloop.verifier.rubrics import (
    Example,
    RubricItem,
    RuleCheck,
    check_rule,
    read_jsonl,
    write_jsonl,
)
from clinicloop.verifier.scoring import score_example

HEALTHBENCH = Path(__file__).parent / "data" / "healthbench_format.jsonl"

# A row in our own style: keys out of HealthBench order, unknown fields on the row and on an
# item, raw non-ASCII text, a rule item.
OWN_ROW = json.dumps(
    {
        "prompt_id": "own-1",
        "source": {"kind": "simulated", "run": 7},
        "prompt": [{"role": "user", "content": "胸痛两小时"}],
        "rubrics": [
            {"points": 6, "criterion": "Advises emergency care.", "tags": ["axis:accuracy"],
             "weight_note": "red flag"},
            {"criterion": "Says to call 120.", "points": 4, "tags": ["kind:rule"],
             "rule": {"type": "keywords", "keywords": ["120", "急诊"]}},
        ],
        "example_tags": ["theme:emergency_referrals"],
    },
    ensure_ascii=False,
)


def test_healthbench_file_round_trips_byte_identical(tmp_path: Path) -> None:
    examples = list(read_jsonl(HEALTHBENCH))
    assert len(examples) == 3 and all(e.is_canaried for e in examples)
    out = tmp_path / "out.jsonl"
    write_jsonl(out, examples)
    assert out.read_bytes() == HEALTHBENCH.read_bytes()


def test_own_row_round_trips_byte_identical() -> None:
    example = Example.from_line(OWN_ROW + "\n")
    assert example.to_line() == OWN_ROW
    assert example.rubrics[1].is_rule and not example.rubrics[0].is_rule
    assert example.source == {"kind": "simulated", "run": 7}


def test_changed_row_keeps_source_key_order_and_unknown_fields() -> None:
    source = HEALTHBENCH.read_text(encoding="utf-8").splitlines()[1]
    example = Example.from_line(source)
    example.example_tags = [*example.example_tags, "theme:ours"]
    example.rubrics[0].points = 9
    example.reviewed_by = "lead"  # a new key goes after the source's keys
    line = example.to_line()
    assert line != source and line.isascii()  # the source escaped non-ASCII; so does the rewrite
    row, original = json.loads(line), json.loads(source)
    assert list(row) == [*original, "reviewed_by"]
    assert [list(item) for item in row["rubrics"]] == [list(i) for i in original["rubrics"]]
    assert row["rubrics"][0]["points"] == 9 and row["example_tags"][-1] == "theme:ours"
    assert row["ideal_completions_data"] == original["ideal_completions_data"]


def test_changed_own_row_keeps_unknown_item_fields_and_raw_text() -> None:
    example = Example.from_line(OWN_ROW)
    example.rubrics[0].criterion = "Advises emergency care now."
    row = json.loads(example.to_line())
    assert "胸痛" in example.to_line()
    assert list(row) == list(json.loads(OWN_ROW))
    assert row["rubrics"][0] == {"points": 6, "criterion": "Advises emergency care now.",
                                 "tags": ["axis:accuracy"], "weight_note": "red flag"}
    assert row["rubrics"][1]["rule"] == {"type": "keywords", "keywords": ["120", "急诊"]}


def test_example_built_in_code_has_the_healthbench_shape() -> None:
    rule = RuleCheck(type="regex", pattern=r"call (911|120)")
    example = Example(
        prompt=[{"role": "user", "content": "Crushing chest pain."}],
        rubrics=[RubricItem(criterion="Tells to call emergency services.", points=8,
                            tags=["kind:rule", "axis:accuracy"], rule=rule)],
        prompt_id="p1",
    )
    row = json.loads(example.to_line())
    assert list(row) == ["example_tags", "ideal_completions_data", "prompt", "prompt_id",
                         "rubrics", "canary"]
    assert row["rubrics"][0] == {"criterion": "Tells to call emergency services.", "points": 8,
                                 "tags": ["kind:rule", "axis:accuracy"],
                                 "rule": {"type": "regex", "pattern": "call (911|120)"}}
    assert not example.is_canaried
    assert Example.from_line(example.to_line()).to_line() == example.to_line()


@pytest.mark.parametrize("points", [0, 11, -11])
def test_points_out_of_range_are_rejected(points: int) -> None:
    with pytest.raises(ValidationError):
        RubricItem(criterion="x", points=points)


def test_tag_values() -> None:
    item = RubricItem(criterion="x", points=1, tags=["axis:accuracy", "level:cluster",
                                                     "cluster:a:b"])
    assert item.tag_values("axis") == ["accuracy"]
    assert item.tag_values("cluster") == ["a:b"]
    assert item.tag_values("theme") == []


@pytest.mark.parametrize(
    "fields",
    [{"type": "regex"}, {"type": "regex", "pattern": "("}, {"type": "keywords"},
     {"type": "keywords", "keywords": [" "]}, {"type": "exact", "answer": "  "},
     {"type": "tool_call"}, {"type": "tool_call", "name": " "}],
)
def test_rule_without_what_its_type_needs_is_rejected(fields: dict) -> None:
    with pytest.raises(ValidationError):
        RuleCheck(**fields)


@pytest.mark.parametrize(
    ("rule", "response", "met"),
    [
        (RuleCheck(type="regex", pattern=r"call\s+911"), "Please CALL 911 now.", True),
        (RuleCheck(type="regex", pattern=r"^see a doctor"), "You should see a doctor.", False),
        (RuleCheck(type="keywords", keywords=["ER", "emergency room"]),
         "Go to the Emergency\nRoom.", True),
        (RuleCheck(type="keywords", keywords=["er"]), "Drink water; no error.", False),
        (RuleCheck(type="keywords", keywords=["aspirin", "911"], all_of=True),
         "Chew an aspirin.", False),
        (RuleCheck(type="keywords", keywords=["aspirin", "911"], all_of=True),
         "Chew an Aspirin and dial 911.", True),
        (RuleCheck(type="keywords", keywords=["A&E"]), "Go to a&e today.", True),
        (RuleCheck(type="exact", answer="B"), "  b \n", True),
        (RuleCheck(type="exact", answer="B"), "It is B because of the rash.", False),
        (RuleCheck(type="exact", answer="Iron deficiency"),
         "The smear shows microcytes.\n\nAnswer: iron deficiency\n", True),
        (RuleCheck(type="exact", answer="B"), "Reasoning...\n**Final answer:** B", True),
        (RuleCheck(type="exact", answer="B"), "Answer: B\nActually, maybe not.", False),
        (RuleCheck(type="exact", answer="B"), "Answer: C", False),
    ],
)
def test_check_rule(rule: RuleCheck, response: str, met: bool) -> None:
    assert check_rule(rule, response) is met


def call(name: str, arguments: object, call_id: str = "call_1") -> dict:
    """A tool call as the store logs it: arguments as JSON text."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": text}}


INTERACTION = call("check_drug_interaction", {"drug_a": "Warfarin", "drug_b": "ibuprofen",
                                              "detail": {"level": "full", "cite": True}})
BOOKING = call("book_appointment", {"specialty": "cardiology", "days": 2}, "call_2")


@pytest.mark.parametrize(
    ("rule", "calls", "met"),
    [
        (RuleCheck(type="tool_call", name="check_drug_interaction"), [INTERACTION], True),
        (RuleCheck(type="tool_call", name="check_drug_interaction"), [BOOKING], False),
        (RuleCheck(type="tool_call", name="check_drug_interaction"), None, False),
        # Any of parallel calls.
        (RuleCheck(type="tool_call", name="check_drug_interaction"), [BOOKING, INTERACTION], True),
        # Arguments: a subset, strings alike but for case and space, nested objects a subset too.
        (RuleCheck(type="tool_call", name="check_drug_interaction",
                   arguments={"drug_a": " warfarin"}), [INTERACTION], True),
        (RuleCheck(type="tool_call", name="check_drug_interaction",
                   arguments={"drug_a": "aspirin"}), [INTERACTION], False),
        (RuleCheck(type="tool_call", name="check_drug_interaction",
                   arguments={"drug_c": "aspirin"}), [INTERACTION], False),
        (RuleCheck(type="tool_call", name="check_drug_interaction",
                   arguments={"detail": {"cite": True}}), [INTERACTION], True),
        (RuleCheck(type="tool_call", name="check_drug_interaction",
                   arguments={"detail": {"cite": 1}}), [INTERACTION], False),
        (RuleCheck(type="tool_call", name="book_appointment", arguments={"days": 2}),
         [INTERACTION, BOOKING], True),
        (RuleCheck(type="tool_call", name="book_appointment", arguments={"days": "2"}),
         [BOOKING], False),
        # Arguments already parsed (as a chat template gets them) read the same.
        (RuleCheck(type="tool_call", name="book_appointment",
                   arguments={"specialty": "Cardiology"}),
         [{**BOOKING, "function": {"name": "book_appointment",
                                   "arguments": {"specialty": "cardiology"}}}], True),
        # Arguments that are not JSON: the name alone can still be checked, the arguments not.
        (RuleCheck(type="tool_call", name="book_appointment"), [call("book_appointment", "{")],
         True),
        (RuleCheck(type="tool_call", name="book_appointment", arguments={"days": 2}),
         [call("book_appointment", "{")], False),
    ],
)
def test_tool_call_rule(rule: RuleCheck, calls: list[dict] | None, met: bool) -> None:
    # The reply's text never meets a tool_call rule, even when it names the function.
    assert check_rule(rule, f"I will call {rule.name} now.", calls) is met


def test_tool_call_rules_reward_and_penalise_calls_in_the_score() -> None:
    items = [
        RubricItem(criterion="Checks the interaction before advising", points=6,
                   tags=["kind:rule"], rule=RuleCheck(type="tool_call",
                                                      name="check_drug_interaction")),
        RubricItem(criterion="Books an appointment without being asked", points=-4,
                   tags=["kind:rule"], rule=RuleCheck(type="tool_call", name="book_appointment")),
        RubricItem(criterion="Names the bleeding risk", points=4, tags=["kind:rule"],
                   rule=RuleCheck(type="keywords", keywords=["bleeding"])),
    ]
    reply = "Together they raise the risk of bleeding."

    def score(calls: list[dict] | None) -> float | None:
        return score_example(items, [check_rule(i.rule, reply, calls) for i in items])

    assert score(None) == 4 / 10
    assert score([INTERACTION]) == 10 / 10
    assert score([INTERACTION, BOOKING]) == 6 / 10  # the unwanted call costs its 4 points
    assert score([BOOKING]) == 0 / 10


def test_a_tool_call_rule_round_trips_byte_identical() -> None:
    row = json.dumps({
        "prompt": [{"role": "user", "content": "Can I take ibuprofen with warfarin?"}],
        "rubrics": [{"criterion": "Looks the interaction up.", "points": 5, "tags": ["kind:rule"],
                     "rule": {"type": "tool_call", "name": "check_drug_interaction",
                              "arguments": {"drug_a": "warfarin"}}}],
        "prompt_id": "tools-1",
    })
    example = Example.from_line(row)
    assert example.to_line() == row
    rule = example.rubrics[0].rule
    assert rule is not None and rule.arguments == {"drug_a": "warfarin"}
    example.rubrics[0].points = 6  # a changed row keeps the rule as it was written
    assert json.loads(example.to_line())["rubrics"][0]["rule"] == json.loads(row)["rubrics"][0][
        "rule"]
