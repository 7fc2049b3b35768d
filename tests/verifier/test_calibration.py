"""Judge calibration: macro-F1 and per-class figures on hand-computed cases (one class empty, both
F1 zero), the bootstrap interval, reviewer labels joined to stored verdicts on SQLite (grouped by
judge and template, per axis, disagreements), the judge measured on labelled items (stored
verdicts reused, the rest graded), `label_verdicts` keys, and a meta-evaluation file graded
pairwise against each physician, through `verify calibrate` on the tiny model too.

`data/meta_eval_sample.jsonl` is synthetic (written for these tests), in HealthBench's
meta-evaluation format; it holds no HealthBench data."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from clinicloop.cli import app
from clinicloop.store.db import Store, StoredVerdict
from clinicloop.store.records import LoggedChoice, TurnRecord
from clinicloop.store.reviews import add_label
from clinicloop.verifier.calibration import (
    agreement,
    calibrate_labelled,
    calibrate_meta_eval,
    calibrate_stored,
    label_verdicts,
    read_meta_eval,
)
from clinicloop.verifier.judge import Judge, item_key, verdict_key
from clinicloop.verifier.rubrics import RubricItem
from tests.conftest import ROOT

SAMPLE = Path(__file__).parent / "data" / "meta_eval_sample.jsonl"


def test_macro_f1_is_the_mean_of_the_met_and_not_met_f1():
    # tp 2 (items 0, 4), fp 1 (1), fn 1 (3), tn 1 (2)
    a = agreement([True, True, False, False, True], [True, False, False, True, True],
                  bootstrap=0)
    assert (a.n, a.met.support, a.not_met.support) == (5, 3, 2)
    assert a.met.precision == pytest.approx(2 / 3) and a.met.recall == pytest.approx(2 / 3)
    assert a.not_met.precision == pytest.approx(1 / 2) and a.not_met.recall == pytest.approx(1 / 2)
    assert a.met.f1 == pytest.approx(2 / 3) and a.not_met.f1 == pytest.approx(1 / 2)
    assert a.macro_f1 == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert a.accuracy == pytest.approx(3 / 5)
    assert a.macro_f1_ci.low is None and a.macro_f1_ci.high is None  # no resamples asked for


def test_an_empty_class_leaves_macro_f1_undefined_and_all_wrong_is_zero():
    # Every label "met": the "not met" class has no label, so its recall (and F1) is undefined.
    a = agreement([True, True, False], [True, True, True], bootstrap=100)
    assert a.met.precision == 1.0 and a.met.recall == pytest.approx(2 / 3)
    assert (a.not_met.support, a.not_met.precision, a.not_met.recall) == (0, 0.0, None)
    assert a.not_met.f1 is None and a.macro_f1 is None
    assert a.macro_f1_ci.low is None  # undefined in every resample
    # A judge that never says "met": that class's precision is undefined.
    never = agreement([False, False], [True, False], bootstrap=0)
    assert never.met.precision is None and never.met.recall == 0.0 and never.macro_f1 is None
    # Every decision wrong: both F1 are 0 (precision and recall 0), not undefined.
    wrong = agreement([True, False], [False, True], bootstrap=0)
    assert (wrong.met.f1, wrong.not_met.f1, wrong.macro_f1, wrong.accuracy) == (0, 0, 0, 0)
    with pytest.raises(ValueError):
        agreement([True], [True, False])


def test_the_bootstrap_interval_holds_the_estimate_and_narrows_with_more_items():
    pattern = ([True] * 6 + [False] * 4, [True] * 5 + [False] * 3 + [True, False])
    small = agreement(pattern[0] * 2, pattern[1] * 2, bootstrap=500, seed=1)
    large = agreement(pattern[0] * 40, pattern[1] * 40, bootstrap=500, seed=1)
    assert small.macro_f1 == pytest.approx(large.macro_f1)  # same proportions
    for a in (small, large):
        assert a.macro_f1_ci.low <= a.macro_f1 <= a.macro_f1_ci.high
    width = [a.macro_f1_ci.high - a.macro_f1_ci.low for a in (small, large)]
    assert width[1] < width[0] / 2
    # Seeded: the same seed, the same interval.
    assert agreement(pattern[0] * 2, pattern[1] * 2, bootstrap=500, seed=1) == small


CONVERSATION = [{"role": "user", "content": "I have had a fever of 39 C for three days."}]
ITEMS = [RubricItem(criterion="Advises seeing a doctor", points=5, tags=["axis:accuracy"]),
         RubricItem(criterion="Asks about a stiff neck", points=3,
                    tags=["axis:context_awareness"]),
         RubricItem(criterion="Recommends antibiotics without a diagnosis", points=-6,
                    tags=["axis:accuracy"])]


def _store(tmp_path: Path) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.migrate()
    store.insert_many([TurnRecord(
        id=f"t{i}", conversation_id=f"c{i}", endpoint="chat.completions", model="m",
        model_version="v1", messages=CONVERSATION,
        choices=[LoggedChoice(index=0, content=f"See a doctor ({i}).", finish_reason="stop")])
        for i in range(2)])
    return store


def _verdict(store: Store, turn: str, item: RubricItem, met: bool, judge: str = "judge-a",
             template: str = "split") -> None:
    response = store.get(turn).response
    store.put_verdict(StoredVerdict(
        turn_id=turn, verdict_key=verdict_key(CONVERSATION, response, item, judge, template),
        item=item.model_dump(mode="json", exclude_none=True), judge_model=judge,
        template=template, criteria_met=met, explanation=f"{judge} on {item.criterion}",
        source="llm"))


def _label(store: Store, turn: str, item: RubricItem, met: bool) -> None:
    add_label(store, turn_id=turn, item_key=item_key(item), item=item.model_dump(mode="json"),
              criteria_met=met, verdict_key=None, reviewer="0123456789ab")


def test_reviewer_labels_meet_stored_verdicts_per_judge_and_template(tmp_path):
    store = _store(tmp_path)
    for turn in ("t0", "t1"):
        for item, met in zip(ITEMS, (True, False, False), strict=True):
            _verdict(store, turn, item, met)
            _verdict(store, turn, item, not met, judge="judge-b", template="healthbench")
    _verdict(store, "t0", ITEMS[0], False, judge="judge-c")  # a third judge, on one item
    _label(store, "t0", ITEMS[0], False)  # a first label, overruled by the next
    _label(store, "t0", ITEMS[0], True)
    _label(store, "t0", ITEMS[1], True)  # judge-a said not met
    _label(store, "t1", ITEMS[2], False)
    _label(store, "t1", RubricItem(criterion="No verdict on it", points=1), True)

    found = {(c.judge_model, c.template): c for c in calibrate_stored(store, bootstrap=50)}
    assert set(found) == {("judge-a", "split"), ("judge-b", "healthbench"), ("judge-c", "split")}
    a = found[("judge-a", "split")]
    assert a.source == "store" and a.overall.n == 3
    # judge-a: (met, met) (not, met) (not, not) -> tp 1, fn 1, tn 1
    assert (a.overall.met.recall, a.overall.met.precision) == (0.5, 1.0)
    assert a.overall.not_met.f1 == pytest.approx(2 / 3)
    assert a.overall.macro_f1 == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert set(a.per_axis) == {"accuracy", "context_awareness"}
    assert a.per_axis["accuracy"].n == 2 and a.per_axis["accuracy"].macro_f1 == 1.0
    [wrong] = a.disagreements
    assert (wrong.turn_id, wrong.conversation_id, wrong.criterion, wrong.points) == (
        "t0", "c0", ITEMS[1].criterion, 3)
    assert (wrong.judge_met, wrong.label_met) == (False, True)
    assert wrong.explanation == f"judge-a on {ITEMS[1].criterion}"
    # judge-b decides the opposite of judge-a; judge-c has one verdict, on the twice-labelled
    # item.
    assert found[("judge-b", "healthbench")].overall.accuracy == pytest.approx(1 / 3)
    assert len(found[("judge-b", "healthbench")].disagreements) == 2
    assert found[("judge-c", "split")].overall.n == 1
    assert found[("judge-c", "split")].disagreements[0].label_met is True  # the latest label
    only = calibrate_stored(store, judge_model="judge-b", template="healthbench", bootstrap=0)
    assert [(c.judge_model, c.overall.n) for c in only] == [("judge-b", 3)]
    assert calibrate_stored(store, template="nope") == []


class KeywordJudge:
    """A grader model that answers by keyword: "met" when the graded reply (the text after the
    conversation's last `assistant:`) holds one of `words`. It stands in for the model behind
    the judge; every figure below follows from it by hand."""

    model = "keyword-judge"

    def __init__(self, words: tuple[str, ...]) -> None:
        self.words = words
        self.calls = 0

    async def chat(self, messages: list[dict[str, Any]], **_: Any) -> str:
        self.calls += 1
        reply = messages[-1]["content"].rsplit("assistant:", 1)[1]
        met = any(w in reply.split("# Rubric item")[0] for w in self.words)
        return json.dumps({"explanation": f"keyword {met}", "criteria_met": met})


def test_a_meta_evaluation_is_graded_against_each_physician(tmp_path):
    rows = read_meta_eval(SAMPLE)
    assert len(rows) == 8 and rows[0].binary_labels == [True, True, True]
    words = ("emergency services", "at the dose", "aspirin tablet", "pharmacist", "fine",
             "How much water")
    calibration = asyncio.run(calibrate_meta_eval(rows, Judge(KeywordJudge(words)),
                                                  bootstrap=200))
    # Pairs (judge vs each physician): tp 3+2+3+2+1 = 11, fp 1+3+1 = 5, fn 1, tn 3+2 = 5
    o = calibration.overall
    assert (o.n, o.met.support, o.not_met.support) == (8, 12, 10)
    assert o.met.precision == pytest.approx(11 / 16) and o.met.recall == pytest.approx(11 / 12)
    assert o.not_met.precision == pytest.approx(5 / 6) and o.not_met.recall == pytest.approx(1 / 2)
    assert o.macro_f1 == pytest.approx((22 / 28 + 10 / 16) / 2)
    assert o.accuracy == pytest.approx(16 / 22)
    assert o.macro_f1_ci.low <= o.macro_f1 <= o.macro_f1_ci.high
    assert calibration.source == "meta_eval" and calibration.judge_model == "keyword-judge"
    assert set(calibration.per_axis) == {r.category for r in rows}
    # Against the majority: only row 5 ("Yes, that is fine."); row 6's labels tie.
    [wrong] = calibration.disagreements
    assert (wrong.prompt_id, wrong.judge_met, wrong.label_met, wrong.points) == (
        "synthetic-prompt-2", True, False, 1)


def test_the_judge_is_measured_on_labelled_items_reusing_stored_verdicts(tmp_path):
    store = _store(tmp_path)
    judge = Judge(KeywordJudge(("doctor",)))
    for item in ITEMS:
        _label(store, "t0", item, item.points > 0)
    # One stored verdict of this judge and template: reused (and wrong on purpose).
    _verdict(store, "t0", ITEMS[1], False, judge="keyword-judge")
    calibration = asyncio.run(calibrate_labelled(store, judge, bootstrap=0))
    # Graded now: "doctor" is in the reply, so all met; ITEMS[1] from the store: not met.
    assert judge.client.calls == 2
    assert calibration.overall.n == 3
    assert sorted((d.criterion, d.judge_met) for d in calibration.disagreements) == [
        (ITEMS[1].criterion, False), (ITEMS[2].criterion, True)]
    assert store.count_verdicts() == 1  # grading to measure stores nothing
    with pytest.raises(ValueError):
        asyncio.run(calibrate_labelled(store, Judge(judge.client, labels={"k": True})))

    # The labels as the judge would key its verdicts on the labelled turn.
    labels = label_verdicts(store, "keyword-judge", "split")
    response = store.get("t0").response
    assert labels == {verdict_key(CONVERSATION, response, item, "keyword-judge", "split"):
                      item.points > 0 for item in ITEMS}


def test_verify_calibrate_reports_a_meta_evaluation_and_refuses_no_labels(tmp_path, tiny_model,
                                                                        monkeypatch):
    monkeypatch.setenv("CLINICLOOP_MODELS_DIR", str(ROOT / "var" / "models"))
    out = tmp_path / "calibration.json"
    result = CliRunner().invoke(app, ["verify", "calibrate", "--meta-eval", str(SAMPLE),
                                      "--bootstrap", "100", "--json", str(out)])
    assert result.exit_code == 0, result.output
    [calibration] = json.loads(out.read_text())
    assert calibration["source"] == "meta_eval" and calibration["template"] == "split"
    assert calibration["overall"]["n"] + calibration["n_unanswered"] == 8
    assert "macro-F1" in result.output and "per category:" in result.output
    assert "disagreements:" in result.output

    store = f"sqlite:///{tmp_path / 'empty.db'}"
    empty = CliRunner().invoke(app, ["verify", "calibrate", "--store-url", store])
    assert empty.exit_code == 1 and "no labelled items" in empty.output

    labelled = _store(tmp_path)
    _verdict(labelled, "t0", ITEMS[0], True)
    _label(labelled, "t0", ITEMS[0], True)
    from_store = CliRunner().invoke(app, ["verify", "calibrate", "--store-url",
                                          f"sqlite:///{tmp_path / 'store.db'}", "--bootstrap",
                                          "10"])
    assert from_store.exit_code == 0, from_store.output
    assert "judge judge-a (split template), labels from store: 1 labelled items" \
        in from_store.output
