"""The patient simulator: shipped scripts, the factual unit, the termination gate on labelled
doctor messages, and `clinicloop verify simulate` end to end on the tiny model (in-process and
over HTTP)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from clinicloop.backends.llamacpp import LlamaCppEngine
from clinicloop.cli import verify_score, verify_simulate
from clinicloop.config import EngineSettings
from clinicloop.store.db import Store
from clinicloop.verifier.client import EngineChatClient
from clinicloop.verifier.patients import load_scripts
from clinicloop.verifier.score_logs import ScoreSummary
from clinicloop.verifier.simulation import SimulationReport
from clinicloop.verifier.simulator import (
    FactualUnit,
    TerminationGate,
    conclusion,
    fallback_reply,
)
from tests.conftest import ROOT, wait_until

# Hand-written doctor messages, labelled by whether a consultation should end on them (a
# diagnosis and a plan, an emergency referral, or a goodbye). Written before the rule was tuned;
# the last two were added after the tiny model's conditional safety-netting showed up.
LABELLED: list[tuple[str, bool]] = [
    ("It sounds like a urinary tract infection. I'll prescribe three days of nitrofurantoin; "
     "drink plenty of water and come back if you get a fever.", True),
    ("You most likely have gastritis. Please avoid alcohol and take omeprazole 20 mg every "
     "morning for four weeks.", True),
    ("These symptoms could be a stroke. Call an ambulance right now.", True),
    ("Your chest pain may be coming from your heart. Go straight to the emergency department "
     "and do not drive yourself.", True),
    ("From what you describe, this is a tension-type headache. Regular sleep, fewer screens and "
     "paracetamol when needed should help; see me again in a month if it doesn't.", True),
    ("I think you have a viral chest infection. Rest, drink fluids, and take paracetamol for "
     "the fever. Take care.", True),
    ("My diagnosis is plantar fasciitis. I recommend calf stretches twice a day and supportive "
     "shoes.", True),
    ("This looks like eczema. Use an emollient several times a day and a mild steroid cream on "
     "the flares.", True),
    ("Thank you for coming in. Goodbye, and I hope you feel better soon.", True),
    ("The pattern fits with migraine with aura, so you should stop the combined pill; I will "
     "refer you to discuss other contraception.", True),
    ("I'm sorry to hear that. When did the pain start?", False),
    ("Do you smoke or drink alcohol?", False),
    ("Could this be related to something you ate? What did you have for lunch?", False),
    ("It sounds like it has been a tough week. Can you tell me more about the headaches?", False),
    ("I recommend we run a few blood tests first. Have you noticed any weight loss?", False),
    ("Before I can say what this is, I need to know whether you have had a fever.", False),
    ("Have you been to the emergency department about this before?", False),
    ("Let me ask a few more questions. Does the pain spread anywhere?", False),
    ("That must be worrying. Is there any family history of heart disease?", False),
    ("Please take a seat and describe the rash for me.", False),
    ("It is probably nothing serious, but I need more information. How long have you had the "
     "cough?", False),
    ("Are you taking any medication, including anything over the counter?", False),
    ("Call emergency services if the pain spreads to your arm. How long has it lasted?", False),
    ("This is most likely reflux. Take omeprazole before breakfast and avoid late meals.", True),
]


@pytest.fixture(scope="module")
def scripts():
    return {s.id: s for s in load_scripts()}


def test_shipped_scripts_validate_and_vary(scripts):
    assert len(scripts) >= 30
    values = list(scripts.values())
    assert sum(s.outcome.red_flag for s in values) >= 8
    assert len({s.specialty for s in values}) >= 12
    assert {s.persona.mbti for s in values} == {
        a + b + c + d for a in "EI" for b in "SN" for c in "TF" for d in "JP"}
    assert {s.persona.income for s in values} == {"low", "middle", "high"}
    assert {s.persona.education for s in values} == {"primary", "secondary", "university"}
    assert all(len(s.record.hidden) >= 2 for s in values)


def check(script, draft: str, doctor: list[str]):
    return asyncio.run(FactualUnit().check(script, draft, doctor, set()))


def test_factual_unit_removes_unasked_finding_and_keeps_asked_one(scripts):
    acs = scripts["cardio-acs"]
    draft = "I smoke about twenty cigarettes a day. My father had a heart attack at fifty-two."
    result = check(acs, draft, ["How long has this been going on?", "Do you smoke?"])
    assert result.reply == "I smoke about twenty cigarettes a day."
    assert [(r.why, r.detail) for r in result.removed] == [("leak", ["family"])]
    assert not result.fallback
    # Asked earlier in the consultation still counts as asked.
    both = check(acs, draft, ["Do you smoke?", "Does heart disease run in your family?"])
    assert both.reply == draft and not both.removed


def test_factual_unit_removes_contradictions(scripts):
    acs = scripts["cardio-acs"]
    draft = ("Yes, I have had a fever. I'm 40 years old. I don't smoke. "
             "The pressure in my chest is still there.")
    result = check(acs, draft, ["Any fever? How old are you? Do you smoke?"])
    assert result.reply == "The pressure in my chest is still there."
    assert [r.detail for r in result.removed] == [
        ["claims fever"], ["says age 40, record 58"], ["denies smoking"]]
    assert all(r.why == "contradiction" for r in result.removed)


def test_garbage_draft_falls_back_to_the_record(scripts):
    acs = scripts["cardio-acs"]
    garbage = "Pelfpular bedtime, avoiding, and avoiding usually help. See a doctor if over fifty."
    smoking = check(acs, garbage, ["Do you smoke?"])
    assert smoking.fallback and "I smoke about twenty cigarettes a day." in smoking.reply
    fever = check(acs, "", ["Have you had a fever?"])
    assert fever.fallback and "No, I haven't had a fever." in fever.reply
    # An unasked finding never appears in a fallback.
    assert "father" not in fever.reply and "smoke" not in fever.reply


def test_fallback_reflects_the_persona(scripts):
    acs = scripts["cardio-acs"]
    poor_feeler = acs.model_copy(update={"persona": acs.persona.model_copy(
        update={"mbti": "INFP", "income": "low", "education": "university"})})
    made: set[str] = set()
    advice = "This is serious. You should have an MRI scan and see a specialist."
    reply = fallback_reply(poor_feeler, advice, made)
    assert reply.startswith("That frightens me.")
    assert "How much will that cost?" in reply and "evidence" in reply
    assert "Okay, I'll do that." in reply
    assert "frightens" not in fallback_reply(poor_feeler, advice, made)  # once per consultation
    extravert = acs.model_copy(update={"persona": acs.persona.model_copy(update={"mbti": "ESTJ"})})
    assert "What treatment" in fallback_reply(extravert, "Where is the pain?", set())


def test_gate_on_labelled_doctor_messages():
    correct = sum((conclusion(text) is not None) == final for text, final in LABELLED)
    accuracy = correct / len(LABELLED)
    assert accuracy >= 0.9, accuracy  # measured 23/24; the miss has no diagnosis cue it knows
    gate = TerminationGate()
    assert asyncio.run(gate.decide("Where does it hurt?", 6, 6)).reason == "budget"
    assert not asyncio.run(gate.decide("Where does it hurt?", 5, 6)).finished
    assert asyncio.run(gate.decide(LABELLED[2][0], 1, 6)).reason == "emergency_referral"


def test_llm_units_return_parsed_verdicts_on_the_tiny_model(tiny_model, scripts):
    async def run() -> tuple[bool | None, bool | None]:
        engine = LlamaCppEngine(EngineSettings(model_path=tiny_model.gguf_q8_0),
                                ROOT / "var" / "models")
        await engine.start()
        try:
            client = EngineChatClient(engine)
            finished = await TerminationGate(client)._ask(LABELLED[0][0], seed=0)
            objects = await FactualUnit(client)._llm_objects(
                scripts["cardio-acs"], "My chest hurts.", set(), seed=0)
            return finished, objects
        finally:
            await engine.close()

    finished, objects = asyncio.run(run())
    assert isinstance(finished, bool) and isinstance(objects, bool)


def _report(out: Path) -> SimulationReport:
    return SimulationReport.model_validate_json((out / "simulate.json").read_text())


def _check_run(report, out: Path, store_url: str, script_ids: list[str]) -> None:
    data = json.loads((out / "simulate.json").read_text())
    m = data["metrics"]
    assert m["consultations"] == len(script_ids) and m["patient_turns"] >= 1
    assert m["privacy_score"] == 1.0  # the factual unit strips every unasked finding
    assert m["fact_score"] == 1.0 and m["termination_accuracy"] == 1.0
    assert 1 <= m["mean_turns"] <= 4
    assert [c["script_id"] for c in data["consultations"]] == script_ids
    store = Store(store_url)
    assert not report.logged_by_doctor and report.stored_turns == m["doctor_turns"]
    for c in report.consultations:
        turns = store.list_turns(conversation_id=c.conversation_id)
        assert c.conversation_id == f"sim-{c.script_id}-{report.run_id}"
        assert len(turns) == len(c.exchanges) >= 1
        for n, turn in enumerate(turns, 1):
            assert turn.endpoint == "chat.completions" and turn.params["simulated"] is True
            assert turn.model_version == report.doctor_model and turn.params["turn"] == n
            assert turn.response == c.exchanges[n - 1].doctor
            assert turn.messages == c.messages[:c.exchanges[n - 1].request_len]
            assert turn.origin == "client"
    store.dispose()


def test_simulate_in_process(tiny_model, tmp_path):
    ids = ["cardio-acs", "gi-reflux"]
    store_url = f"sqlite:///{tmp_path / 'sim.db'}"
    verify_simulate(scripts=2, max_turns=4, store_url=store_url, out=tmp_path, seed=0,
                    script=ids, model=tiny_model.gguf_q8_0)
    report = _report(tmp_path)
    _check_run(report, tmp_path, store_url, ids)
    assert report.doctor_model == report.patient_model == tiny_model.gguf_q8_0.stem


def test_simulate_against_our_server_stores_each_doctor_turn_once(
        server_factory, tiny_model, tmp_path, monkeypatch, capsys):
    # The README's way: the gateway as doctor and patient, simulate and the server on one store.
    monkeypatch.setenv("CLINICLOOP_MODELS_DIR", str(ROOT / "var" / "models"))
    server = server_factory()
    store_url = f"sqlite:///{server.db_path}"
    verify_simulate(server.v1, server.v1, scripts=1, max_turns=3, store_url=store_url,
                    out=tmp_path, seed=1, script=["neuro-stroke"])
    report = _report(tmp_path)
    assert report.doctor_model == report.patient_model == tiny_model.name
    assert report.logged_by_doctor and report.stored_turns == 0
    assert "logged the" in capsys.readouterr().out

    doctor_turns = report.metrics.doctor_turns
    (c,) = report.consultations
    store = Store(store_url)
    wait_until(lambda: len(store.list_turns(limit=1000)) >= doctor_turns + 1, 30, "the log")
    turns = store.list_turns(limit=1000)
    client = [t for t in turns if t.origin == "client"]
    # Once each, logged by the gateway: the doctor's replies, as the consultation went.
    assert [t.response for t in client] == [e.doctor for e in c.exchanges]
    assert len({t.conversation_id for t in client}) == 1
    assert {t.origin for t in turns} == {"client", "service"}  # the patient's model calls
    assert store.count_turns_to_score() == doctor_turns
    store.dispose()

    # Scoring that store (in-process judge) scores each doctor turn once.
    verify_score(store_url=store_url, out=tmp_path / "score.json")
    summary = ScoreSummary.model_validate_json((tmp_path / "score.json").read_text())
    assert summary.n_turns == doctor_turns
