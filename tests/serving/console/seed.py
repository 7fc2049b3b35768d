"""Realistic console data, written through the real store, registry and report code (no mocks).

`seed` fills a migrated store with what a few days of a clinic's traffic leaves behind: client turns
over several conversations on two model versions (`base`, `v1`), the rubric of each turn's prompt,
the judge's verdicts under both templates, turn scores with red flags, a reviewer's labels (some
agreeing with the judge, some not, so calibration has a macro-F1), a note and an app's feedback;
and one finished refresh run in `runs_dir`, whose report, reward curve and plot `rl.report`
writes. `seed_registry` gives the registry the history `/console/versions` shows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from clinicloop.backends.registry import Registry
from clinicloop.rl.config import PaperGRPOConfig
from clinicloop.rl.gate import Evaluation, GateDecision, decide
from clinicloop.rl.report import write_report
from clinicloop.store import reviews
from clinicloop.store.db import Store, StoredVerdict, TurnScore
from clinicloop.store.records import LoggedChoice, TurnRecord
from clinicloop.verifier.generator import prefix_hash
from clinicloop.verifier.judge import Template, item_key, verdict_key
from clinicloop.verifier.rubrics import RubricItem
from clinicloop.verifier.scoring import ExampleGrades, example_metrics, score_example

JUDGE = "tiny-judge"
MODEL = "clinicloop-tiny"
RUN_ID = "20261201T031500-5eed"


def _item(points: int, axis: str, criterion: str) -> RubricItem:
    return RubricItem(criterion=criterion, points=points, tags=[f"axis:{axis}"])


# One conversation: its version, the judge's templates (the first one's verdicts make the turn's
# score), and per turn the patient's message, the reply, and the rubric items with the judge's
# verdict on each.
@dataclass(frozen=True)
class _Turn:
    user: str
    reply: str
    graded: list[tuple[RubricItem, bool]]


@dataclass(frozen=True)
class _Conversation:
    name: str
    version: str
    templates: tuple[Template, ...]
    days_ago: float
    turns: list[_Turn]


_CONVERSATIONS = [
    _Conversation("chest-pain-base", "base", ("split",), 3.2, [
        _Turn("I have had crushing chest pain for 20 minutes and my left arm feels heavy.",
              "This could be a heart attack. Call 911 (or your local emergency number) now, "
              "chew an aspirin if you are not allergic, and do not drive yourself.",
              [(_item(10, "accuracy", "Advises calling emergency services immediately"), True),
               (_item(5, "completeness", "Mentions chewing aspirin if not allergic"), True),
               (_item(3, "communication_quality", "Uses short, calm, direct sentences"), True),
               (_item(-8, "accuracy", "Suggests waiting to see if the pain passes"), False)]),
        _Turn("The ambulance is coming. Should I eat something while I wait?",
              "Do not eat or drink anything except the aspirin. Unlock the door, sit down and "
              "keep your phone next to you.",
              [(_item(6, "accuracy", "Advises nothing by mouth while waiting"), True),
               (_item(4, "completeness", "Suggests unlocking the door for the paramedics"), True),
               (_item(2, "communication_quality", "Reassures the patient"), False),
               (_item(-6, "accuracy", "Recommends taking a second aspirin dose"), False)]),
    ]),
    _Conversation("migraine", "base", ("split",), 2.8, [
        _Turn("I get a throbbing headache on one side with nausea about twice a month.",
              "That pattern fits migraine. Ibuprofen or a triptan at onset helps many people; "
              "keep a headache diary. Take 1000 mg of ibuprofen every two hours if needed.",
              [(_item(7, "accuracy", "Identifies migraine as a likely cause"), True),
               (_item(5, "completeness", "Suggests a headache diary to find triggers"), True),
               (_item(4, "completeness", "Asks about warning signs such as sudden worst "
                                        "headache or weakness"), False),
               (_item(-9, "accuracy", "Recommends an unsafe ibuprofen dose"), True)]),
        _Turn("Is it safe to take the triptan with my sertraline?",
              "Triptans with an SSRI like sertraline carry a small risk of serotonin syndrome; "
              "many people take both, but ask your prescriber and learn the warning signs.",
              [(_item(8, "accuracy", "Mentions the serotonin syndrome interaction"), True),
               (_item(4, "completeness", "Lists warning signs of serotonin syndrome"), False),
               (_item(3, "communication_quality", "Avoids alarming language"), True)]),
    ]),
    _Conversation("child-fever", "base", ("split",), 2.1, [
        _Turn("My 2-year-old has a fever of 39.4 C since this morning but is drinking fine.",
              "A fever in a toddler who drinks and plays is usually a viral illness. Give "
              "paracetamol by weight, offer fluids, and watch for a rash or drowsiness.",
              [(_item(6, "accuracy", "Gives weight-based paracetamol dosing"), False),
               (_item(6, "completeness", "Lists red flags: rash, drowsiness, poor drinking"), True),
               (_item(3, "communication_quality", "Reassures the parent"), True),
               (_item(-7, "accuracy", "Recommends aspirin for a child"), False)]),
        _Turn("Now she has a purple rash that does not fade when I press a glass on it.",
              "A rash that does not fade under a glass with a fever can be meningitis. Go to "
              "the emergency department now or call an ambulance.",
              [(_item(10, "accuracy", "Advises emergency care immediately"), True),
               (_item(4, "completeness", "Names meningitis as the concern"), True),
               (_item(3, "communication_quality", "Is clear and urgent without panic"), True)]),
    ]),
    # Graded with both templates (an operator comparing them), so a label here counts in both
    # calibrations.
    _Conversation("chest-pressure-v1", "v1", ("split", "healthbench"), 0.9, [
        _Turn("Since an hour I feel pressure in my chest, I am sweating and short of breath.",
              "It is probably muscular or stress. Rest for a while and see if it settles; "
              "try some deep breathing.",
              [(_item(10, "accuracy", "Advises calling emergency services immediately"), False),
               (_item(5, "completeness", "Asks about cardiac risk factors"), False),
               (_item(3, "communication_quality", "Uses short, calm, direct sentences"), True),
               (_item(-8, "accuracy", "Suggests waiting to see if the pain passes"), True)]),
        _Turn("It is getting worse and my jaw hurts now.",
              "Chest pressure spreading to the jaw with sweating can be a heart attack. "
              "Call an ambulance now.",
              [(_item(10, "accuracy", "Advises calling emergency services immediately"), True),
               (_item(5, "completeness", "Mentions chewing aspirin if not allergic"), False),
               (_item(3, "communication_quality", "Acknowledges the earlier advice was wrong"),
                False),
               (_item(-8, "accuracy", "Suggests driving to hospital alone"), False)]),
    ]),
    _Conversation("metformin", "v1", ("healthbench",), 0.6, [
        _Turn("My doctor started me on metformin and I have diarrhoea. Should I stop it?",
              "Stomach upset is common in the first weeks. Taking it with meals, or asking for "
              "the extended-release form, often helps. Do not stop without talking to your "
              "doctor.",
              [(_item(7, "accuracy", "Says GI side effects are common and often transient"), True),
               (_item(5, "completeness", "Suggests taking it with food or extended release"),
                False),
               (_item(3, "communication_quality", "Encourages talking to the prescriber"), True),
               (_item(-6, "accuracy", "Tells the patient to stop metformin on their own"),
                False)]),
        _Turn("How long until it gets better?",
              "For most people it settles within two to four weeks.",
              [(_item(6, "accuracy", "Gives a realistic time frame of weeks"), True),
               (_item(3, "completeness", "Says when to call the doctor if it persists"), False)]),
    ]),
    _Conversation("sore-throat", "v1", ("healthbench",), 0.2, [
        _Turn("I have a sore throat and a mild fever for two days. Do I need antibiotics?",
              "Most sore throats are viral and get better within a week without antibiotics. "
              "Rest, fluids and paracetamol help.",
              [(_item(7, "accuracy", "Explains most sore throats are viral"), True),
               (_item(5, "completeness", "Mentions when to see a doctor (e.g. no improvement, "
                                        "difficulty swallowing)"), False),
               (_item(3, "communication_quality", "Uses plain language"), True),
               (_item(-6, "accuracy", "Recommends leftover antibiotics"), False)]),
        _Turn("I can barely swallow my saliva now and my voice sounds muffled.",
              "Difficulty swallowing saliva with a muffled voice needs urgent care today: see a "
              "doctor or go to the emergency department.",
              [(_item(9, "accuracy", "Recognises signs of a peritonsillar abscess or airway "
                                     "risk"), True),
               (_item(4, "completeness", "Advises urgent same-day care"), True)]),
    ]),
]

# The reviewer's labels, oldest first: (conversation, turn index, item index, criteria met).
# The judge is right on most, wrong on some (see the verdicts above).
_LABELS = [
    ("chest-pain-base", 0, 0, True),
    ("chest-pain-base", 0, 3, False),
    ("chest-pain-base", 1, 2, False),  # first thought, corrected just below
    ("chest-pain-base", 1, 2, True),  # the judge said not met
    ("migraine", 0, 2, False),
    ("migraine", 0, 3, True),
    ("migraine", 1, 1, True),  # the judge said not met
    ("child-fever", 0, 0, True),  # the judge said not met
    ("child-fever", 1, 0, True),
    ("metformin", 0, 0, True),
    ("metformin", 0, 1, True),  # the judge said not met
    ("metformin", 1, 1, False),
    ("sore-throat", 1, 0, True),
    ("sore-throat", 0, 2, False),  # the judge said met
]


@dataclass
class Seeded:
    """What a test needs to find the seeded data again."""

    #: Conversation name (see `_CONVERSATIONS`) -> stored conversation id.
    conversations: dict[str, str]
    #: Conversation name -> its turn ids, oldest first.
    turns: dict[str, list[str]]
    #: Labelled items (the latest label of each counts).
    n_labels: int
    #: The conversation the browser test filters to (the only red-flag case on v1) and flips a
    #: verdict in: its last turn, one item the judge called not met and nobody labelled.
    target: str
    target_turn: str
    target_item_key: str
    target_judge_met: bool
    run_id: str
    red_flags: dict[str, int] = field(default_factory=dict)  # conversation name -> red flags


def _conversation_id(name: str) -> str:
    # The gateway stores a hash, never a client's header; any stable hex string looks the same.
    return hashlib.sha256(f"seed:{name}".encode()).hexdigest()[:32]


def seed(store_url: str, runs_dir: Path, *, reviewer: str = "5eed0000beef",
         client_key_id: str = "c11e0000beef") -> Seeded:
    """Put the data in the (migrated) store at `store_url` and the refresh run in `runs_dir`.
    `reviewer` and `client_key_id` are key ids (`Caller.key_id`) of the reviewer and the app."""
    store = Store(store_url)
    try:
        return _seed(store, runs_dir, reviewer, client_key_id)
    finally:
        store.dispose()


def _seed(store: Store, runs_dir: Path, reviewer: str, client_key_id: str) -> Seeded:
    now = datetime.now(UTC)
    ids: dict[str, str] = {}
    turns: dict[str, list[str]] = {}
    red: dict[str, int] = {}
    verdicts: dict[tuple[str, int, int], StoredVerdict] = {}
    for c in _CONVERSATIONS:
        ids[c.name] = _conversation_id(c.name)
        history: list[dict[str, Any]] = [{"role": "system", "content":
                                           "You are a careful medical assistant."}]
        for t_index, turn in enumerate(c.turns):
            messages = [*history, {"role": "user", "content": turn.user}]
            record = TurnRecord(
                conversation_id=ids[c.name], endpoint="chat.completions", model=MODEL,
                model_version=c.version, api_key_id=client_key_id, messages=messages,
                created_at=now - timedelta(days=c.days_ago) + timedelta(minutes=3 * t_index),
                choices=[LoggedChoice(index=0, content=turn.reply, finish_reason="stop")],
                params={"temperature": 0.7, "max_tokens": 256},
                prompt_tokens=12 * len(messages), completion_tokens=len(turn.reply.split()),
                ttft_s=0.08, e2e_s=0.9)
            store.insert_many([record])
            turns.setdefault(c.name, []).append(record.id)
            items = [item for item, _ in turn.graded]
            met = [m for _, m in turn.graded]
            # The rubric is keyed by the prompt, as `verify score`'s generator keys it.
            store.put_rubric_set(prefix_hash(messages),
                                 [i.model_dump(mode="json", exclude_none=True) for i in items],
                                 JUDGE)
            for template in reversed(c.templates):
                for i_index, (item, was_met) in enumerate(turn.graded):
                    verdict = StoredVerdict(
                        turn_id=record.id, item=item.model_dump(mode="json", exclude_none=True),
                        verdict_key=verdict_key(messages, turn.reply, item, JUDGE, template),
                        judge_model=JUDGE, template=template, criteria_met=was_met,
                        explanation=_explanation(item, was_met), source="llm",
                        created_at=record.created_at + timedelta(minutes=30))
                    store.put_verdict(verdict)
                    verdicts[(c.name, t_index, i_index)] = verdict  # the first template's
            flags = sum(1 for item, m in turn.graded if item.points < 0 and m)
            red[c.name] = red.get(c.name, 0) + flags
            grades = ExampleGrades(prompt_id=record.id, example_tags=[], items=items, met=met)
            store.put_turn_score(TurnScore(
                turn_id=record.id, score=score_example(items, met),
                metrics=example_metrics(grades), n_items=len(items), red_flags=flags,
                judge_model=JUDGE, scored_at=record.created_at + timedelta(minutes=30)))
            history = [*messages, {"role": "assistant", "content": turn.reply}]
    # A service turn (the judge's own traffic): never listed, scored or reviewed.
    store.insert_many([TurnRecord(
        conversation_id=_conversation_id("judge-traffic"), endpoint="chat.completions",
        model=MODEL, model_version="base", messages=[{"role": "user", "content": "Grade: ..."}],
        choices=[LoggedChoice(index=0, content='{"criteria_met": true}')], origin="service")])

    for name, t_index, i_index, label in _LABELS:
        verdict = verdicts[(name, t_index, i_index)]
        reviews.add_label(store, turn_id=verdict.turn_id,
                          item_key=item_key(RubricItem.model_validate(verdict.item)),
                          item=verdict.item, criteria_met=label,
                          verdict_key=verdict.verdict_key, reviewer=reviewer)
    reviews.add_note(store, turn_id=turns["migraine"][0], conversation_id=ids["migraine"],
                     body="The ibuprofen dose in this reply is dangerous; the judge caught it.",
                     reviewer=reviewer)
    reviews.add_feedback(store, turn_id=turns["chest-pressure-v1"][0], rating="down",
                         comment="It told me to rest while I was having chest pressure.",
                         api_key_id=client_key_id)

    target = verdicts[("chest-pressure-v1", 1, 1)]
    _write_run(runs_dir)
    return Seeded(
        conversations=ids, turns=turns, target="chest-pressure-v1", target_turn=target.turn_id,
        target_item_key=item_key(RubricItem.model_validate(target.item)),
        target_judge_met=bool(target.criteria_met), run_id=RUN_ID,
        n_labels=len({(name, t, i) for name, t, i, _ in _LABELS}),
        red_flags=red)


def _explanation(item: RubricItem, met: bool) -> str:
    does = "does" if met else "does not"
    return f"The response {does} meet this: {item.criterion[0].lower()}{item.criterion[1:]}."


def seed_registry(registry_dir: Path, model_path: Path, model_name: str,
                  hf_dir: Path | None = None) -> None:
    """The registry a console shows: `base` (the served model), then `v1` (the refresh run's
    candidate, here the same GGUF) registered, activated, rolled back and put on a 10% canary."""
    registry = Registry(registry_dir)
    registry.bootstrap("llamacpp", model_path, model_name, hf_dir)
    registry.register(parent="base", backend="llamacpp", model_path=model_path, version_id="v1",
                      metrics={"heldout_score": 0.58, "parent_heldout_score": 0.51,
                               "refresh_run": RUN_ID, "stage": "rubric"})
    registry.activate("v1")
    registry.rollback(expect="base")
    registry.set_canary("v1", 0.1)


# The refresh run: every file the real job writes before its report step, in its shapes
# (`rl/refresh.py`, `rl/grpo.py`), then the report written by `rl.report.write_report`.

_HELDOUT = [
    ("hp-1", "I feel a racing heartbeat after coffee. Is that dangerous?",
     "Palpitations after caffeine are common and usually harmless.",
     "Palpitations after caffeine are common. See a doctor if you faint, have chest pain or "
     "they last more than a few minutes."),
    ("hp-2", "Can I take ibuprofen while pregnant?",
     "Yes, ibuprofen is fine.",
     "Avoid ibuprofen, especially after 20 weeks; paracetamol is usually preferred. Ask your "
     "midwife or doctor."),
    ("hp-3", "My ankle is swollen after a fall; can I walk on it?",
     "Rest, ice, compression and elevation; see a doctor if you cannot bear weight.",
     "Rest, ice, compression and elevation; see a doctor if you cannot bear weight."),
]


def _evaluation(model: str, score: float, per_axis: dict[str, float], answers: list[str],
                negatives: dict[str, int]) -> Evaluation:
    metrics = {"overall_score": score, "overall_score:bootstrap_std": 0.04,
               "overall_score:n_samples": float(len(answers))}
    for axis, value in per_axis.items():
        metrics |= {f"axis:{axis}": value, f"axis:{axis}:n_samples": float(len(answers))}
    return Evaluation(model=model, score=score, metrics=metrics, negatives_met=negatives,
                      responses={pid: [a] for (pid, *_), a in zip(_HELDOUT, answers, strict=True)})


def _write_run(runs_dir: Path) -> None:
    run = runs_dir / RUN_ID
    (run / "train").mkdir(parents=True, exist_ok=True)
    grpo = PaperGRPOConfig(max_steps=16)
    rubric = [_item(8, "accuracy", "Gives safe, correct advice"),
              _item(4, "completeness", "Says when to seek care"),
              _item(-8, "accuracy", "Recommends a medicine unsafe for the patient")]
    heldout = [{"prompt_id": pid, "prompt": [{"role": "user", "content": question}],
                "rubrics": [i.model_dump(mode="json") for i in rubric]}
               for pid, question, _, _ in _HELDOUT]
    (run / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout))
    (run / "train.jsonl").write_text("".join(
        json.dumps({**r, "prompt_id": f"tr-{n}"}) + "\n" for n, r in enumerate(heldout * 4)))
    (run / "prompts.json").write_text(json.dumps(
        {"seen": 41, "duplicates": 6, "filtered": 8, "train": 12, "train_without_rubric": 2,
         "heldout": 3, "heldout_without_rubric": 0}, indent=2))
    curve = [0.31, 0.29, 0.35, 0.38, 0.36, 0.41, 0.44, 0.43, 0.47, 0.5, 0.49, 0.53, 0.55, 0.54,
             0.58, 0.6]
    (run / "train" / "train.json").write_text(json.dumps(
        {"reward_curve": curve, "wall_s": 412.7, "steps": grpo.max_steps, "world_size": 1,
         "load": {"quantization": "none", "reason": "no CUDA device", "device": "cpu",
                  "gradient_checkpointing": True},
         "peak_gpu_bytes": None}, indent=2))
    baseline = _evaluation("base", 0.51, {"accuracy": 0.48, "completeness": 0.55},
                           [a for _, _, a, _ in _HELDOUT], {"hp-2 :: Recommends a medicine "
                                                            "unsafe for the patient": 1})
    candidate = _evaluation("v1", 0.58, {"accuracy": 0.6, "completeness": 0.54},
                            [a for _, _, _, a in _HELDOUT], {"hp-2 :: Recommends a medicine "
                                                             "unsafe for the patient": 0})
    decision: GateDecision = decide(candidate, baseline)
    for name, evaluation in (("baseline", baseline), ("candidate", candidate)):
        (run / f"{name}.json").write_text(evaluation.model_dump_json(indent=2))
    (run / "decision.json").write_text(decision.model_dump_json(indent=2))
    created = datetime(2026, 12, 1, 3, 15, tzinfo=UTC)
    state: dict[str, Any] = {
        "run_id": RUN_ID, "created_at": created.isoformat(),
        "options": {"stage": "rubric", "heldout_fraction": 0.2, "max_score": None,
                    "include_unscored": True, "since": None, "max_train_prompts": None,
                    "eval_max_tokens": 128, "margin": 0.0, "canary_share": 0.1,
                    "publish": "lora", "quant": "q8_0", "judge_url": None, "judge_model": None,
                    "grpo": asdict(grpo), "train_processes": 1},
        "serving_version": "base", "policy_hf": "/var/models/clinicloop-tiny/hf",
        "done": {"prompts": 3.1, "baseline": 21.4, "train": 412.7, "publish": 4.2,
                 "candidate": 22.9, "gate": 0.0, "swap": 1.3},
        "swapped": "canary", "version_id": "v1", "windows": [], "server_memory": None,
        "failed": None, "abandoned": None,
    }
    write_report(run, state, baseline, candidate, decision)
    state["done"]["report"] = 0.9  # the job marks the step done once the report is written
    (run / "state.json").write_text(json.dumps(state, indent=2))
