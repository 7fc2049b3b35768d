"""The patient simulator (Baichuan-M2 §2): a scripted patient that consults a doctor model.

Every doctor turn is followed by three units:
- **termination gate** (`TerminationGate`): deterministic — the consultation is over when the
  doctor's message gives a diagnosis and a plan or refers to emergency care (`conclusion`), says
  goodbye, or the turn budget is spent. With an LLM (`llm_gate`), one JSON-constrained call
  replaces the diagnosis-and-plan rule; goodbye and the budget stay deterministic.
- **affective unit** (`AffectiveUnit`): one LLM call drafts the in-character reply from the record,
  the persona (MBTI, income, education) and the conversation so far. Nothing deterministic: tone
  is what a model is for.
- **factual unit** (`FactualUnit`): deterministic — each sentence of the draft that discloses a
  hidden finding the doctor has not asked about, or contradicts the record, is removed
  (`patients.py`'s word checks). When nothing in character is left (an empty draft, or the tiny
  model's near-gibberish) the patient answers with `fallback_reply`: the record's answer to what
  the doctor just asked, in the persona's manner. With an LLM (`llm_fact_check`), one more
  JSON-constrained call reviews the cleaned reply and sends it to the fallback when it objects.

`oracle_finished` is the deterministic rule the gate is measured against: with the deterministic
gate the per-run termination accuracy is 1.0 by construction, and the labelled doctor messages of
`tests/verifier/test_simulator.py` measure the rule itself against human labels.
"""

from __future__ import annotations

import json
import re
import time
import zlib
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from clinicloop.verifier.client import ChatClient, ChatError
from clinicloop.verifier.patients import (
    PatientScript,
    mention,
    mentions_any,
    sentences,
)

DOCTOR_SYSTEM = (
    "You are a doctor in a consultation. Ask the patient focused questions, one or two at a "
    "time. When you know enough, give your diagnosis and a treatment plan."
)

GateReason = Literal["diagnosis_and_plan", "emergency_referral", "goodbye", "budget", "llm",
                     "continue"]

_GOODBYE = re.compile(r"\b(good ?bye|bye now|take care|get well soon|all the best|"
                      r"wish you well)\b", re.I)
_EMERGENCY = re.compile(
    r"\b(call (911|999|112|an ambulance|emergency services)|ambulance|emergency (department|"
    r"room|services|care)|a ?& ?e\b|(go|get) (straight |directly |immediately |now )?to "
    r"(the |a |an |your nearest )?(hospital|er)\b|(seek|get) (urgent|emergency|immediate) "
    r"(medical )?(care|help|attention))", re.I)
# "Call emergency services if it gets worse" is safety-netting, a plan, not a referral now.
_CONDITIONAL = re.compile(r"\b(if|unless|in case|should (it|you|this|things))\b", re.I)
_DIAGNOSIS = re.compile(
    r"\b(diagnos[ie]s|you (most )?(likely|probably) have|(sounds?|looks?|seems?) like|"
    r"(is|are) (most |very )?(likely|probably)|consistent with|in keeping with|typical of|"
    r"suggest(s|ive of)|points? to|fits? with|i (think|believe|suspect) (you|this|it|that)|"
    r"(this|it|that) ('s|is) (a |an )?(\w+ ){0,3}\w*(itis|osis|emia|aemia|pathy|infection|"
    r"syndrome|disease|disorder))\b", re.I)
_PLAN = re.compile(
    r"\b(i (would |'d )?(recommend|suggest|advise)|i('ll| will|'m going to| am going to) "
    r"(prescribe|start|refer|arrange|order|book|give)|prescri(be|bing|ption)|you should|"
    r"you need to|you('ll| will) need|(we|let's|let us) (will |can |should )?(start|treat|"
    r"prescribe|arrange|order|book|refer|check|run)|treatment (is|will be|would be)|"
    r"follow[- ]up|come back (if|in)|return if)\b", re.I)
_IMPERATIVE = re.compile(
    r"^(please )?(take|start|use|try|apply|rest|avoid|drink|keep|stop|book|come back|return|"
    r"see|call|seek|continue|increase|reduce|cut|limit|elevate|ice|stretch|wear)\b", re.I)
_IN_CHARACTER = re.compile(r"\b(i|i'm|i've|i'd|i'll|me|my|mine|myself)\b|^(yes|yeah|no|okay|ok|"
                           r"well|thanks|thank you|sorry|sure|hmm)\b|\?$", re.I)

_SECTION_TOPICS = {
    "age": ("how old", "your age"),
    "medications": ("medication", "medicine", "tablet", "pill", "prescri", "taking"),
    "allergies": ("allerg",),
    "past_history": ("medical history", "past", "conditions", "health problems", "illnesses",
                     "operation", "surgery"),
    "present_illness": ("when did", "how long", "start", "began", "describe", "tell me more",
                        "what happened", "since when"),
}
_COSTLY = ("mri", "ct", "scan", "specialist", "surgery", "operation", "hospital", "admission",
           "refer", "physiotherap", "private", "brand")
_ALARMING = ("serious", "emergency", "cancer", "danger", "urgent", "immediately", "tumour",
             "tumor", "stroke", "heart attack", "surgery")
_GENTLE = ("sorry", "understand", "worr", "reassur", "concern", "take your time")


def _verdict_schema(key: str) -> dict[str, Any]:
    # A bounded explanation: unbounded, a small model rambles past max_tokens and the JSON breaks.
    return {"type": "object", "additionalProperties": False, "required": ["explanation", key],
            "properties": {"explanation": {"type": "string", "maxLength": 160},
                           key: {"type": "boolean"}}}


def _declarative(text: str) -> list[str]:
    """The statements of a reply (not its questions), after any reasoning it leaked."""
    return [s for s in sentences(text.rsplit("</think>", 1)[-1]) if not s.endswith("?")]


def conclusion(doctor_text: str) -> GateReason | None:
    """Why the doctor's message ends the consultation, or None: the deterministic rule."""
    statements = _declarative(doctor_text)
    if any(_GOODBYE.search(s) for s in statements):
        return "goodbye"
    if any(_EMERGENCY.search(s) and not _CONDITIONAL.search(s) for s in statements):
        return "emergency_referral"
    if any(_DIAGNOSIS.search(s) for s in statements) and any(
            _PLAN.search(s) or _IMPERATIVE.search(s) for s in statements):
        return "diagnosis_and_plan"
    return None


def oracle_finished(doctor_text: str, doctor_turns: int, max_turns: int) -> bool:
    return conclusion(doctor_text) is not None or doctor_turns >= max_turns


def derive_seed(seed: int, *parts: object) -> int:
    """A per-call seed that is the same in every process (`hash()` is salted per process)."""
    return zlib.crc32(":".join(map(str, (seed, *parts))).encode()) & 0x7FFFFFFF


class GateDecision(BaseModel):
    finished: bool
    reason: GateReason


class TerminationGate:
    def __init__(self, client: ChatClient | None = None, *, max_tokens: int = 128) -> None:
        self.client = client
        self.max_tokens = max_tokens

    async def decide(self, doctor_text: str, doctor_turns: int, max_turns: int,
                     seed: int = 0) -> GateDecision:
        reason = conclusion(doctor_text)
        if reason != "goodbye" and self.client is not None:
            verdict = await self._ask(doctor_text, seed)
            if verdict is not None:
                reason = "llm" if verdict else None
        if reason is None and doctor_turns >= max_turns:
            reason = "budget"
        return GateDecision(finished=reason is not None, reason=reason or "continue")

    async def _ask(self, doctor_text: str, seed: int) -> bool | None:
        assert self.client is not None
        prompt = ("Here is a doctor's latest message to a patient.\n\n"
                  f"{doctor_text}\n\nDoes this message give the patient a diagnosis and a "
                  "treatment plan, or send them to emergency care, so that the consultation "
                  'is finished? Answer as JSON: {"explanation": ..., "finished": true|false}.')
        return await _json_verdict(self.client, prompt, "finished",
                                   self.max_tokens, seed)


async def _json_verdict(client: ChatClient, prompt: str, key: str, max_tokens: int,
                        seed: int) -> bool | None:
    """The boolean `key` of a JSON answer, or None when the call fails or is unparseable."""
    try:
        text = await client.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                 temperature=0.0, seed=seed,
                                 json_schema=_verdict_schema(key))
    except ChatError:
        return None
    try:  # not around the call: a refused key (a ValueError) must stop the run
        value = json.loads(text)[key]
    except (ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, bool) else None


def patient_prompt(script: PatientScript) -> str:
    record, persona = script.record, script.persona
    lines = [
        "You are role-playing a patient talking to a doctor. Stay in character, speak in the "
        "first person, and answer only what the doctor asks in one to three short sentences.",
        f"You are a {record.age}-year-old {record.sex}. {record.chief_complaint} "
        f"{record.present_illness}",
        f"Past history: {record.past_history}",
        f"Medicines: {', '.join(record.medications) or 'none'}. "
        f"Allergies: {', '.join(record.allergies) or 'none'}.",
        "Facts you must not contradict: " + " ".join(f.statement for f in record.facts),
        "Private details: mention each one only if the doctor asks about it.",
        *(f"- {f.statement} (only if asked about {f.kind.replace('_', ' ')})"
          for f in record.hidden),
        "You ask what treatment you need." if persona.extravert
        else "You answer briefly and accept what the doctor says.",
        "You are sensitive to the doctor's tone; bluntness upsets you." if persona.feeling
        else "You want plain facts.",
    ]
    if persona.income == "low":
        lines.append("Money is tight: push back on expensive tests or treatments.")
    if persona.education == "university":
        lines.append("You want to know the evidence behind any advice.")
    return "\n".join(lines)


class AffectiveUnit:
    """Drafts the patient's reply: one LLM call, in character."""

    def __init__(self, client: ChatClient, *, max_tokens: int = 96,
                 temperature: float = 0.7) -> None:
        self.client = client
        self.max_tokens = max_tokens
        self.temperature = temperature

    async def draft(self, script: PatientScript, conversation: list[dict[str, Any]],
                    seed: int) -> str:
        """`conversation` is the doctor's view (user: patient, assistant: doctor); the patient's
        model sees it with the roles swapped."""
        swapped = [{"role": "assistant" if m["role"] == "user" else "user",
                    "content": m["content"]} for m in conversation if m["role"] != "system"]
        messages = [{"role": "system", "content": patient_prompt(script)}, *swapped]
        return await self.client.chat(messages, max_tokens=self.max_tokens,
                                      temperature=self.temperature, seed=seed)


class Removal(BaseModel):
    sentence: str
    why: Literal["leak", "contradiction", "llm"]
    detail: list[str] = Field(default_factory=list)


class FactCheck(BaseModel):
    reply: str
    removed: list[Removal] = Field(default_factory=list)
    fallback: bool = False


def leaks(script: PatientScript, text: str, asked: set[str]) -> list[str]:
    """Kinds of the hidden findings `text` discloses that the doctor has not asked about."""
    return sorted({f.kind for s in sentences(text) for f in script.record.disclosed(s)} - asked)


def _answers(script: PatientScript, doctor_text: str) -> list[str]:
    """The record's answers to what the doctor's message asks about, in record order."""
    record = script.record
    said = [f.statement for f in record.facts if mentions_any(doctor_text, f.terms)]
    said += [f.statement for f in record.hidden if mentions_any(doctor_text, f.asked_by)]
    sections = {
        "age": f"I'm {record.age}.",
        "medications": ("I'm prescribed " + ", ".join(record.medications) + ".")
        if record.medications else "I'm not prescribed any regular medicines.",
        "allergies": ("I'm allergic to " + ", ".join(record.allergies) + ".")
        if record.allergies else "I have no allergies.",
        "past_history": f"In the past: {record.past_history}",
        "present_illness": record.present_illness,
    }
    said += [sections[name] for name, topics in _SECTION_TOPICS.items()
             if mentions_any(doctor_text, topics)]
    return list(dict.fromkeys(said))[:3]


def fallback_reply(script: PatientScript, doctor_text: str, remarks_made: set[str]) -> str:
    """A safe in-character reply built from the record: the answers to what the doctor asked,
    with the persona's remarks (each once per consultation, tracked in `remarks_made`)."""
    persona = script.persona

    def once(*texts: str) -> list[str]:
        fresh = [t for t in texts if t not in remarks_made]
        remarks_made.update(fresh)
        return fresh

    opening: list[str] = []
    if persona.feeling and mentions_any(doctor_text, _ALARMING) and not mentions_any(
            doctor_text, _GENTLE):
        opening = once("That frightens me.")
    wishes: list[str] = []
    if any(_PLAN.search(s) or _IMPERATIVE.search(s) for s in _declarative(doctor_text)):
        if persona.income == "low" and mentions_any(doctor_text, _COSTLY):
            wishes.append("How much will that cost? Money is tight for me.")
        if persona.education == "university":
            wishes.append("Is there good evidence that this works?")
        wishes.append("What else can I do to get better?" if persona.extravert
                      else "Okay, I'll do that.")
    elif persona.extravert:
        wishes.append("What treatment do you think I need?")
    closing = once(*wishes)
    answers = _answers(script, doctor_text)
    if not answers and not closing:
        answers = [f"I'm not sure. {script.record.chief_complaint}"]
    return " ".join(opening + answers + closing)


class FactualUnit:
    """Checks a draft against the record: deterministic, plus an optional LLM review."""

    def __init__(self, client: ChatClient | None = None, *, max_tokens: int = 128) -> None:
        self.client = client
        self.max_tokens = max_tokens

    def strip(self, script: PatientScript, draft: str,
              asked: set[str]) -> tuple[list[str], list[Removal]]:
        """The draft's sentences that survive, and those removed with the reason."""
        kept: list[str] = []
        removed: list[Removal] = []
        for sentence in sentences(draft):
            if leaked := leaks(script, sentence, asked):
                removed.append(Removal(sentence=sentence, why="leak", detail=leaked))
            elif bad := script.record.contradictions(sentence):
                removed.append(Removal(sentence=sentence, why="contradiction", detail=bad))
            else:
                kept.append(sentence)
        return kept, removed

    async def check(self, script: PatientScript, draft: str, doctor_messages: list[str],
                    remarks_made: set[str], seed: int = 0) -> FactCheck:
        asked = script.record.asked(doctor_messages)
        kept, removed = self.strip(script, draft, asked)
        if kept and self.client is not None and await self._llm_objects(
                script, " ".join(kept), asked, seed):
            removed += [Removal(sentence=s, why="llm") for s in kept]
            kept = []
        if not any(_IN_CHARACTER.search(s) for s in kept):
            reply = fallback_reply(script, doctor_messages[-1], remarks_made)
            return FactCheck(reply=reply, removed=removed, fallback=True)
        return FactCheck(reply=" ".join(kept), removed=removed)

    async def _llm_objects(self, script: PatientScript, reply: str, asked: set[str],
                           seed: int) -> bool:
        record = script.record
        private = [f.statement for f in record.hidden if f.kind not in asked]
        prompt = (
            f"Patient record: {record.chief_complaint} {record.present_illness} "
            f"Past history: {record.past_history} "
            + " ".join(f.statement for f in record.facts)
            + f"\nNot yet asked, must stay private: {' '.join(private) or 'nothing'}"
            + f"\n\nThe patient said: {reply}\n\nIs this consistent with the record and free "
            'of the private details? Answer as JSON: {"explanation": ..., "consistent": '
            "true|false}.")
        assert self.client is not None
        verdict = await _json_verdict(self.client, prompt, "consistent",
                                      self.max_tokens, seed)
        return verdict is False


class SimulatorOptions(BaseModel):
    max_turns: int = Field(6, ge=1, description="Doctor turns before the budget ends it.")
    doctor_max_tokens: int = 192
    patient_max_tokens: int = 96
    temperature: float = 0.7
    llm_gate: bool = Field(False, description="The gate asks the patient's model too.")
    llm_fact_check: bool = Field(False, description="The factual unit asks the model too.")
    doctor_system: str | None = DOCTOR_SYSTEM


class Exchange(BaseModel):
    """One doctor turn and the patient's answer to it (none once the gate ends it)."""

    at: datetime
    request_len: int = Field(description="The doctor saw the consultation's first N messages.")
    doctor: str
    doctor_s: float
    gate: GateDecision
    oracle_finished: bool
    draft: str | None = None
    reply: str | None = None
    removed: list[Removal] = Field(default_factory=list)
    fallback: bool = False
    draft_leaks: list[str] = Field(default_factory=list)
    reply_leaks: list[str] = Field(default_factory=list)
    draft_sentences: int = 0
    draft_agreeing: int = 0
    reply_sentences: int = 0
    reply_agreeing: int = 0
    patient_error: str | None = None


class Consultation(BaseModel):
    conversation_id: str
    script_id: str
    specialty: str
    red_flag: bool
    messages: list[dict[str, Any]] = Field(description="The doctor's view, system prompt first.")
    exchanges: list[Exchange] = Field(default_factory=list)
    ended_by: GateReason | Literal["doctor_error"]
    outcome_hit: bool = Field(description="A red flag got an emergency referral, or another "
                                          "case's diagnosis was named.")
    doctor_error: str | None = None


def _agreeing(script: PatientScript, text: str) -> tuple[int, int]:
    said = sentences(text)
    return len(said), sum(not script.record.contradictions(s) for s in said)


def outcome_hit(script: PatientScript, doctor_messages: list[str]) -> bool:
    text = "\n".join(doctor_messages)
    if script.outcome.red_flag:
        return any(_EMERGENCY.search(s) and not _CONDITIONAL.search(s)
                   for m in doctor_messages for s in _declarative(m))
    return any(mention(text, term) for term in script.outcome.diagnosis_terms)


class PatientSimulator:
    def __init__(self, patient: ChatClient, options: SimulatorOptions | None = None) -> None:
        self.options = options or SimulatorOptions()
        o = self.options
        self.gate = TerminationGate(patient if o.llm_gate else None)
        self.affective = AffectiveUnit(patient, max_tokens=o.patient_max_tokens,
                                       temperature=o.temperature)
        self.factual = FactualUnit(patient if o.llm_fact_check else None)

    async def consult(self, script: PatientScript, doctor: ChatClient, conversation_id: str,
                      seed: int = 0) -> Consultation:
        o = self.options
        messages: list[dict[str, Any]] = (
            [{"role": "system", "content": o.doctor_system}] if o.doctor_system else [])
        messages.append({"role": "user", "content": script.record.chief_complaint})
        doctor_texts: list[str] = []
        exchanges: list[Exchange] = []
        remarks_made: set[str] = set()
        ended_by: GateReason | Literal["doctor_error"] = "budget"
        doctor_error = None
        for turn in range(1, o.max_turns + 1):
            request_len, started = len(messages), time.perf_counter()
            try:
                text = await doctor.chat(list(messages), max_tokens=o.doctor_max_tokens,
                                         temperature=o.temperature,
                                         seed=derive_seed(seed, script.id, turn, "doctor"))
            except ChatError as exc:
                ended_by, doctor_error = "doctor_error", str(exc)
                break
            doctor_s = time.perf_counter() - started
            messages.append({"role": "assistant", "content": text})
            doctor_texts.append(text)
            gate = await self.gate.decide(text, turn, o.max_turns,
                                          derive_seed(seed, script.id, turn, "gate"))
            exchange = Exchange(at=datetime.now(UTC), request_len=request_len, doctor=text,
                                doctor_s=doctor_s, gate=gate,
                                oracle_finished=oracle_finished(text, turn, o.max_turns))
            exchanges.append(exchange)
            if gate.finished:
                ended_by = gate.reason
                break
            await self._answer(script, exchange, messages, doctor_texts, remarks_made,
                               derive_seed(seed, script.id, turn, "patient"))
        return Consultation(
            conversation_id=conversation_id, script_id=script.id, specialty=script.specialty,
            red_flag=script.outcome.red_flag, messages=messages, exchanges=exchanges,
            ended_by=ended_by, outcome_hit=outcome_hit(script, doctor_texts),
            doctor_error=doctor_error)

    async def _answer(self, script: PatientScript, exchange: Exchange,
                      messages: list[dict[str, Any]], doctor_texts: list[str],
                      remarks_made: set[str], seed: int) -> None:
        try:
            draft = await self.affective.draft(script, messages, seed)
        except ChatError as exc:
            draft, exchange.patient_error = "", str(exc)
        check = await self.factual.check(script, draft, doctor_texts, remarks_made, seed)
        messages.append({"role": "user", "content": check.reply})
        asked = script.record.asked(doctor_texts)
        exchange.draft, exchange.reply = draft, check.reply
        exchange.removed, exchange.fallback = check.removed, check.fallback
        exchange.draft_leaks = leaks(script, draft, asked)
        exchange.reply_leaks = leaks(script, check.reply, asked)
        exchange.draft_sentences, exchange.draft_agreeing = _agreeing(script, draft)
        exchange.reply_sentences, exchange.reply_agreeing = _agreeing(script, check.reply)
