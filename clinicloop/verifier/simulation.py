"""Simulated consultations (`clinicloop verify simulate`) between the patient simulator and a
doctor model, stored as conversations, with the run's metrics.

The doctor is any OpenAI-compatible endpoint (our own server, vLLM, a hosted model) and so is the
patient's model; either left unset runs the tiny model in-process. Each doctor turn is stored once,
so `clinicloop verify score` treats simulated consultations like logged ones:
- a doctor that is a clinicloop gateway (its /v1/models cards are `owned_by: clinicloop`) logs the
  turns itself, as client traffic, in its own store; they are not stored again here;
- any other doctor's turns become one `TurnRecord` each in the store
  (`conversation_id = sim-<script id>-<run id>`, params `simulated: true`), written straight with
  `Store.insert_many`, not through the gateway's redacting writer: every word of them is synthetic
  (invented scripts and model output), so there is no PHI to redact.
The patient's model calls are service traffic (`X-Clinicloop-Origin: service`): a gateway serving
them keeps them out of scoring and training.

`run_simulation` writes `<out>/simulate.json` (the run's metrics and every consultation, turn by
turn); `summary` is the short human summary.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field
from tqdm import tqdm

from clinicloop.store.db import Store
from clinicloop.store.records import LoggedChoice, TurnRecord
from clinicloop.verifier.client import ChatClient, HttpChatClient, open_client
from clinicloop.verifier.patients import PatientScript
from clinicloop.verifier.simulator import Consultation, PatientSimulator, SimulatorOptions


class RunMetrics(BaseModel):
    """Scores of one run; a score is None when nothing was there to score."""

    consultations: int
    doctor_turns: int
    patient_turns: int
    privacy_score: float | None = Field(description="Patient turns disclosing no unasked "
                                                    "hidden finding, after the factual unit.")
    fact_score: float | None = Field(description="Patient sentences agreeing with the record, "
                                                 "after the factual unit.")
    draft_privacy_score: float | None = Field(description="The same, on the affective drafts.")
    draft_fact_score: float | None = Field(description="The same, on the affective drafts.")
    termination_accuracy: float | None = Field(description="Gate decisions equal to the oracle.")
    mean_turns: float | None = Field(description="Doctor turns per consultation.")
    fallback_rate: float | None = Field(description="Patient turns answered by the fallback.")
    outcome_hit_rate: float | None
    ended_by: dict[str, int]


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def run_metrics(consultations: list[Consultation]) -> RunMetrics:
    exchanges = [e for c in consultations for e in c.exchanges]
    answered = [e for e in exchanges if e.reply is not None]
    ended: dict[str, int] = {}
    for c in consultations:
        ended[c.ended_by] = ended.get(c.ended_by, 0) + 1
    return RunMetrics(
        consultations=len(consultations), doctor_turns=len(exchanges),
        patient_turns=len(answered),
        privacy_score=_ratio(sum(not e.reply_leaks for e in answered), len(answered)),
        fact_score=_ratio(sum(e.reply_agreeing for e in answered),
                          sum(e.reply_sentences for e in answered)),
        draft_privacy_score=_ratio(sum(not e.draft_leaks for e in answered), len(answered)),
        draft_fact_score=_ratio(sum(e.draft_agreeing for e in answered),
                                sum(e.draft_sentences for e in answered)),
        termination_accuracy=_ratio(sum(e.gate.finished == e.oracle_finished
                                        for e in exchanges), len(exchanges)),
        mean_turns=_ratio(len(exchanges), len(consultations)),
        fallback_rate=_ratio(sum(e.fallback for e in answered), len(answered)),
        outcome_hit_rate=_ratio(sum(c.outcome_hit for c in consultations), len(consultations)),
        ended_by=dict(sorted(ended.items())))


class SimulationReport(BaseModel):
    run_id: str
    created_at: datetime
    seed: int
    doctor_model: str
    patient_model: str
    logged_by_doctor: bool = Field(description="The doctor's server logged the doctor turns in "
                                               "its own store, so this run stored none.")
    stored_turns: int = Field(description="Doctor turns this run wrote to the store.")
    options: SimulatorOptions
    metrics: RunMetrics
    consultations: list[Consultation]


def select_scripts(all_scripts: list[PatientScript], n: int, seed: int,
                   ids: list[str] | None = None) -> list[PatientScript]:
    """The named scripts, or `n` of them drawn with `seed` (in file order)."""
    if ids:
        by_id = {s.id: s for s in all_scripts}
        if missing := [i for i in ids if i not in by_id]:
            raise ValueError(f"unknown patient scripts: {missing}")
        return [by_id[i] for i in ids]
    picked = set(random.Random(seed).sample(range(len(all_scripts)), min(n, len(all_scripts))))
    return [s for i, s in enumerate(all_scripts) if i in picked]


def turn_records(c: Consultation, model: str, run_id: str) -> list[TurnRecord]:
    """One record per doctor turn: the messages the doctor saw and its reply."""
    return [TurnRecord(
        conversation_id=c.conversation_id, created_at=e.at, endpoint="chat.completions",
        model=model, model_version=model, messages=c.messages[:e.request_len],
        choices=[LoggedChoice(index=0, content=e.doctor, finish_reason="stop")],
        params={"simulated": True, "run_id": run_id, "script_id": c.script_id, "turn": n},
        e2e_s=e.doctor_s) for n, e in enumerate(c.exchanges, 1)]


@asynccontextmanager
async def _clients(doctor_url: str | None, patient_url: str | None, doctor_key: str | None,
                   patient_key: str | None, doctor_model: str | None,
                   patient_model: str | None, model_path: Path | None, models_dir: Path,
                   ) -> AsyncIterator[tuple[ChatClient, ChatClient]]:
    async with AsyncExitStack() as stack:
        local: ChatClient | None = None
        if doctor_url is None or patient_url is None:
            # One engine serves both sides: it runs one sequence at a time anyway.
            local = await stack.enter_async_context(
                open_client(gguf=model_path, models_dir=models_dir))
        doctor = patient = local
        if doctor_url:
            # The consultation is what gets scored: the doctor's turns are client traffic.
            doctor = await stack.enter_async_context(open_client(
                doctor_url, api_key=doctor_key, key_option="--doctor-key", origin="client",
                model=doctor_model))
        if patient_url:
            patient = await stack.enter_async_context(open_client(
                patient_url, api_key=patient_key, key_option="--patient-key",
                model=patient_model))
        assert doctor is not None and patient is not None
        yield doctor, patient


async def simulate(doctor_url: str | None, patient_url: str | None, chosen: list[PatientScript],
                   options: SimulatorOptions, store: Store | None, seed: int, *,
                   api_key: str | None = None, patient_key: str | None = None,
                   doctor_model: str | None = None, patient_model: str | None = None,
                   model_path: Path | None = None, models_dir: Path, concurrency: int = 4,
                   progress: bool = True) -> SimulationReport:
    """Consult every chosen script. `store`: where doctor turns go unless the doctor's server
    logs them itself (None: nowhere). `api_key`: the doctor URL's key, `patient_key` the
    patient URL's (None: from the environment, see `client.resolve_key`)."""
    run_id = f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    async with _clients(doctor_url, patient_url, api_key, patient_key, doctor_model,
                        patient_model, model_path, models_dir) as (doctor, patient):
        logged_by_doctor = isinstance(doctor, HttpChatClient) and doctor.logs_traffic
        keep = None if logged_by_doctor else store
        stored = 0
        simulator = PatientSimulator(patient, options)
        slots = asyncio.Semaphore(concurrency)
        bar = tqdm(total=len(chosen), desc="simulate", unit="consultation",
                   disable=not progress)
        consultations: dict[str, Consultation] = {}

        async def one(script: PatientScript) -> None:
            nonlocal stored
            async with slots:
                c = await simulator.consult(script, doctor, f"sim-{script.id}-{run_id}", seed)
            if keep is not None:
                stored += await asyncio.to_thread(keep.insert_many,
                                                  turn_records(c, doctor.model, run_id))
            consultations[script.id] = c
            bar.update()

        try:
            await asyncio.gather(*(one(s) for s in chosen))
        finally:
            bar.close()
        ordered = [consultations[s.id] for s in chosen]
        return SimulationReport(
            run_id=run_id, created_at=datetime.now(UTC), seed=seed, doctor_model=doctor.model,
            patient_model=patient.model, logged_by_doctor=logged_by_doctor, stored_turns=stored,
            options=options, metrics=run_metrics(ordered), consultations=ordered)


def summary(report: SimulationReport) -> str:
    m = report.metrics

    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    return "\n".join([
        f"simulate run {report.run_id}: {m.consultations} consultations, {m.doctor_turns} "
        f"doctor turns, {m.patient_turns} patient turns "
        f"(doctor {report.doctor_model}, patient {report.patient_model})",
        f"privacy {f(m.privacy_score)} (drafts {f(m.draft_privacy_score)})  "
        f"fact {f(m.fact_score)} (drafts {f(m.draft_fact_score)})  "
        f"termination accuracy {f(m.termination_accuracy)}",
        f"mean turns {f(m.mean_turns)}  fallback {f(m.fallback_rate)}  "
        f"outcome hit {f(m.outcome_hit_rate)}  ended by "
        + ", ".join(f"{k} {v}" for k, v in m.ended_by.items()),
    ])


def run_simulation(store_url: str, out: Path, doctor_url: str | None, patient_url: str | None,
                   chosen: list[PatientScript], options: SimulatorOptions, seed: int, *,
                   models_dir: Path, api_key: str | None = None, patient_key: str | None = None,
                   model_path: Path | None = None, progress: bool = True) -> SimulationReport:
    """`simulate` with the store at `store_url` (its schema upgraded first) keeping the doctor
    turns, unless the doctor is a clinicloop gateway, which logs them in its own store; writes
    `<out>/simulate.json`."""
    store = Store(store_url)
    store.migrate()
    try:
        report = asyncio.run(simulate(
            doctor_url, patient_url, chosen, options, store, seed, api_key=api_key,
            patient_key=patient_key, model_path=model_path, models_dir=models_dir,
            progress=progress))
    finally:
        store.dispose()
    out.mkdir(parents=True, exist_ok=True)
    (out / "simulate.json").write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return report
