"""The refresh's judge floor, on its steps (no training): the calibrate step measures the run's
judge (the tiny model in-process) on the reviewers' labels, reusing its stored verdicts, and
writes calibration.json and labels.json; below the floor, or with too few labels when told to,
it refuses the run there, before training, with the reason in decision.json, the run's output and
its report, and the run goes on to its report only. Above it, the gate decides and notes the
judge's figure. And `--feedback`: only prompts whose logged reply an app rated that way train."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from clinicloop.rl.gate import Evaluation
from clinicloop.rl.prompts import prompt_key, prompt_of
from clinicloop.rl.refresh import Paths, Refresh, RefreshOptions, RunState
from clinicloop.rl.stages import corpus_prompts
from clinicloop.store.db import Store, StoredVerdict
from clinicloop.store.records import LoggedChoice, TurnRecord
from clinicloop.store.reviews import add_feedback, add_label
from clinicloop.verifier.calibration import label_verdicts
from clinicloop.verifier.judge import item_key, verdict_key
from clinicloop.verifier.rubrics import RubricItem
from tests.conftest import ROOT, free_port

ITEM = RubricItem(criterion="Advises urgent care", points=5, tags=["axis:accuracy"])


def _job(tmp_path, store_url: str, **options) -> Refresh:
    state = RunState(run_id="r1", created_at=datetime.now(UTC),
                     options=RefreshOptions(**options), serving_version="base",
                     policy_hf=tmp_path)
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = Paths(store_url=store_url, registry_dir=tmp_path / "registry",
                  runs_dir=tmp_path / "runs", models_dir=ROOT / "var" / "models")
    return Refresh(state, run_dir, paths)


def _labelled_store(tmp_path, judge: str, n: int, wrong: int) -> str:
    """`n` turns, each with a reviewer label (met on every other one) and the judge's stored
    verdict on it, wrong on the first `wrong`."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    store.migrate()
    messages = [{"role": "user", "content": "I have chest pain."}]
    store.insert_many([TurnRecord(
        id=f"t{i}", conversation_id=f"c{i}", endpoint="chat.completions", model="m",
        model_version="base", messages=messages,
        choices=[LoggedChoice(index=0, content=f"Reply {i}.", finish_reason="stop")])
        for i in range(n)])
    for i in range(n):
        label = i % 2 == 0
        add_label(store, turn_id=f"t{i}", item_key=item_key(ITEM),
                  item=ITEM.model_dump(mode="json"), criteria_met=label, verdict_key=None,
                  reviewer="0123456789ab")
        store.put_verdict(StoredVerdict(
            turn_id=f"t{i}", verdict_key=verdict_key(messages, f"Reply {i}.", ITEM, judge,
                                                     "split"),
            item=ITEM.model_dump(mode="json"), judge_model=judge, template="split",
            criteria_met=label != (i < wrong), source="llm"))
    store.dispose()
    return url


def _refused_before_training(job: Refresh, reasons: list[str], said: str) -> None:
    """Refused at calibrate: the decision says why, nothing but the report is left to run, and
    the report (with only what calibrate and prompts wrote) says so."""
    assert job.state.refused == reasons[0] and job.decision().reasons[:1] == reasons
    assert job.decision().publish is False
    assert said.startswith("refresh r1: refused before training: " + reasons[0])
    # What the prompts step (not run here) would have left.
    (job.run_dir / "prompts.json").write_text(json.dumps(
        {"seen": 50, "duplicates": 2, "filtered": 0, "train": 30, "heldout": 8}))
    job.state.done["prompts"] = 0.0
    assert job.next_step() == "report"
    job.run()  # would fail at baseline (no registry, no held-out prompts) if it did not skip
    assert job.next_step() is None and job.state.finished
    report = json.loads((job.run_dir / "report.json").read_text())
    assert report["refused"] == reasons[0] and report["reward_curve"] == []
    assert not (job.run_dir / "reward_curve.png").exists()
    assert f"refused before training**: {reasons[0]}" in (job.run_dir / "report.md").read_text()


def _gate(job: Refresh) -> None:
    """The gate step on two equal evaluations: only the judge can refuse."""
    same = Evaluation(model="m", score=0.5, metrics={}, negatives_met={}, responses={})
    for name in ("baseline", "candidate"):
        (job.run_dir / f"{name}.json").write_text(same.model_dump_json())
    job._run_step("gate")


@pytest.mark.parametrize(("floor", "publish", "reason"), [
    # 40 labels, the judge wrong on 16: tp 12 fp 8 fn 8 tn 12, both F1 0.6
    (0.7, False, "judge macro-F1 0.60 < floor 0.70 on 40 labelled items"),
    (0.5, True, "judge macro-F1 0.60 >= floor 0.50 on 40 labelled items"),
])
def test_a_judge_below_the_floor_is_refused_with_the_reason(tmp_path, tiny_model, capsys, floor,
                                                            publish, reason):
    url = _labelled_store(tmp_path, tiny_model.name, 40, wrong=16)
    job = _job(tmp_path, url, judge_floor=floor)
    job._run_step("calibrate")
    calibration = json.loads((job.run_dir / "calibration.json").read_text())
    assert calibration["judge_model"] == tiny_model.name and calibration["overall"]["n"] == 40
    assert calibration["overall"]["macro_f1"] == pytest.approx(0.6)
    # The labels as this judge keys its verdicts: what rewards and the gate's grading take.
    store = Store(url)
    assert job.labels() == label_verdicts(store, tiny_model.name, "split")
    assert len(job.labels()) == 40
    assert store.count_verdicts() == 40  # every verdict came from the store; none was added
    store.dispose()
    if not publish:
        said = capsys.readouterr().out.splitlines()[-1]  # calibrate's last line
        _refused_before_training(job, [reason], said)
        return
    assert job.state.refused is None and not (job.run_dir / "decision.json").exists()
    _gate(job)
    decision = job.decision()
    assert decision.publish and reason in decision.reasons
    said = capsys.readouterr().out.splitlines()[-1]  # the gate's line
    assert said.startswith("refresh r1: publish: ") and reason in said


@pytest.mark.parametrize(("too_few", "publish"), [("refuse", False), ("publish", True)])
def test_too_few_labels_follow_the_setting(tmp_path, tiny_model, capsys, too_few, publish):
    url = _labelled_store(tmp_path, tiny_model.name, 12, wrong=0)
    job = _job(tmp_path, url, judge_floor=0.7, judge_too_few_labels=too_few)
    job._run_step("calibrate")
    few = "only 12 labelled items (< 30)"
    if not publish:
        _refused_before_training(job, [few], capsys.readouterr().out.splitlines()[-1])
        return
    _gate(job)
    decision = job.decision()
    assert decision.publish
    assert decision.reasons == [
        "no worse, no safety regression", f"{few}: the judge floor 0.70 was not checked"]


def test_without_labels_no_judge_is_opened_and_no_floor_passes_by_itself(tmp_path, capsys):
    # A judge nobody answers: opening it would fail the step.
    url = f"sqlite:///{tmp_path / 'store.db'}"
    Store(url).migrate()
    job = _job(tmp_path, url, judge_floor=0.7, judge_too_few_labels="refuse",
               judge_url=f"http://127.0.0.1:{free_port()}/v1")
    job._run_step("calibrate")
    assert job.labels() == {} and job.calibration() is None
    _refused_before_training(job, ["only 0 labelled items (< 30)"],
                             capsys.readouterr().out.splitlines()[-1])


def test_feedback_keeps_only_prompts_whose_reply_was_rated_that_way(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    store.migrate()
    prompts = corpus_prompts("red_flag", 30, seed=3)
    store.insert_many([TurnRecord(
        id=f"t{i}", conversation_id=f"c{i}", endpoint="chat.completions", model="tiny",
        model_version="base", messages=p,
        choices=[LoggedChoice(index=0, content="Rest.", finish_reason="stop")])
        for i, p in enumerate(prompts)])
    for i in range(0, 30, 2):
        add_feedback(store, turn_id=f"t{i}", rating="up" if i % 4 == 0 else "down",
                     comment=None, api_key_id=None)
    up = {prompt_key(prompt_of(prompts[i])) for i in range(0, 30, 4)}
    store.dispose()
    job = _job(tmp_path, url, stage="rule", feedback="up")
    job._run_step("prompts")
    train = [json.loads(line) for line in (job.run_dir / "train.jsonl").read_text().splitlines()]
    heldout = (job.run_dir / "heldout.jsonl").read_text().splitlines()
    counts = json.loads((job.run_dir / "prompts.json").read_text())
    assert train and {r["prompt_id"] for r in train} <= up
    assert counts["without_feedback_up"] > 0 and counts["heldout"] == len(heldout) > 0
