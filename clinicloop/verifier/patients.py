"""Patient scripts for the simulator, and the deterministic checks of patient text against them.

A script is an invented case (no real patient data): a medical record with hidden findings the
patient reveals only when asked, a persona (MBTI type, income, education) and the outcome that
should end the consultation. The shipped scripts are written by `scripts/make_patient_scripts.py`.

The checks work on words, not meaning, which is what lets them run on every turn and judge even a
tiny model's output:
- a term is *mentioned* when a run of words starts with it (`cough` matches `coughing`, at most
  four extra letters on the last word), and *negated* when a negation word (`no`, `not`,
  `haven't`, ...) comes up to five words before it in the same clause (a leading "No," counts
  for the clause after it);
- a sentence *contradicts* the record when it affirms a fact the record says is absent, negates one
  it says is present or denies a hidden finding, or states another age;
- a sentence *discloses* a hidden finding when it mentions one of the finding's `reveals` terms;
  the doctor *asked* about it once any doctor message mentions one of its `asked_by` terms.
A script whose own text fails these checks does not load, so the record, its fact statements and
its hidden findings agree with each other by construction.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

SCRIPTS_PATH = Path(__file__).parent / "data" / "patient_scripts.jsonl"

NEGATIONS = frozenset({
    "no", "not", "never", "without", "none", "nor", "neither", "nothing", "deny", "denies",
    "don't", "dont", "doesn't", "doesnt", "didn't", "didnt", "haven't", "havent", "hasn't",
    "hasnt", "hadn't", "isn't", "aren't", "wasn't", "weren't", "can't", "cannot", "won't",
})
_NEGATION_WINDOW = 5
_SUFFIX_SLACK = 4
_WORD = re.compile(r"[a-z0-9']+")
_CLAUSE = re.compile(r"[,;:()]|\b(?:but|though|although|however|except)\b")
# "No, my vision is fine.": a leading answer particle negates the clause after its comma.
_LEADING_NO = re.compile(r"^\s*(no|nope)\s*,\s*", re.I)
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_AGE = re.compile(r"\b(?:i am|i'm|im|aged?)\s+(\d{1,3})\b(?!\s*(?:kg|kilo|cm|percent|%|times))"
                  r"|\b(\d{1,3})[- ](?:years?|yrs?)[- ]old\b")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(text.strip()) if s.strip()]


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def _match_at(words: list[str], i: int, term: list[str]) -> bool:
    last = len(term) - 1
    if i + last >= len(words) or words[i:i + last] != term[:last]:
        return False
    word = words[i + last]
    return word.startswith(term[last]) and len(word) - len(term[last]) <= _SUFFIX_SLACK


def mention(text: str, term: str) -> Literal["affirmed", "negated"] | None:
    """How `text` mentions `term`: affirmed if any clause mentions it without a negation."""
    term_words = _words(term)
    found: Literal["affirmed", "negated"] | None = None
    for clause in _CLAUSE.split(_LEADING_NO.sub("no ", text)):
        words = _words(clause)
        for i in range(len(words)):
            if _match_at(words, i, term_words):
                if NEGATIONS.isdisjoint(words[max(0, i - _NEGATION_WINDOW):i]):
                    return "affirmed"
                found = "negated"
    return found


def mentions_any(text: str, terms: Iterable[str]) -> bool:
    return any(mention(text, term) for term in terms)


class Fact(BaseModel):
    """A checkable statement of the record: whether the patient has something."""

    terms: list[str] = Field(min_length=1, description="Words that name it, e.g. fever.")
    present: bool
    statement: str = Field(description="What the patient says when asked about it.")


class HiddenFinding(BaseModel):
    """A private detail the patient reveals only when the doctor asks about it."""

    kind: str = Field(description="What it is about: smoking, travel, family history, ...")
    statement: str = Field(description="What the patient says once asked.")
    asked_by: list[str] = Field(min_length=1, description="Doctor words that count as asking.")
    reveals: list[str] = Field(min_length=1, description="Patient words that disclose it.")


class MedicalRecord(BaseModel):
    age: int = Field(ge=0, le=120)
    sex: Literal["female", "male"]
    chief_complaint: str = Field(description="The patient's opening line, first person.")
    present_illness: str
    past_history: str
    medications: list[str] = Field(default_factory=list)
    allergies: list[str] = Field(default_factory=list)
    facts: list[Fact] = Field(default_factory=list)
    hidden: list[HiddenFinding] = Field(default_factory=list)

    def contradictions(self, sentence: str) -> list[str]:
        """What in the record `sentence` contradicts, one line each (empty: it agrees)."""
        found: list[str] = []
        for fact in self.facts:
            said = [m for m in (mention(sentence, t) for t in fact.terms) if m]
            if fact.present and "negated" in said and "affirmed" not in said:
                found.append(f"denies {fact.terms[0]}")
            elif not fact.present and "affirmed" in said:
                found.append(f"claims {fact.terms[0]}")
        for finding in self.hidden:
            said = [m for m in (mention(sentence, t) for t in finding.reveals) if m]
            if "negated" in said and "affirmed" not in said:
                found.append(f"denies {finding.kind}")
        for match in _AGE.finditer(sentence.lower()):
            age = int(match.group(1) or match.group(2))
            if age != self.age:
                found.append(f"says age {age}, record {self.age}")
        return found

    def disclosed(self, sentence: str) -> list[HiddenFinding]:
        return [f for f in self.hidden if mentions_any(sentence, f.reveals)]

    def asked(self, doctor_messages: Iterable[str]) -> set[str]:
        """Kinds of the hidden findings any of the doctor's messages asked about."""
        text = "\n".join(doctor_messages)
        return {f.kind for f in self.hidden if mentions_any(text, f.asked_by)}


class Persona(BaseModel):
    mbti: str = Field(pattern=r"^[EI][SN][TF][JP]$",
                      description="E asks about treatment, I accepts passively; F minds tone.")
    income: Literal["low", "middle", "high"] = Field(description="low resists costly options.")
    education: Literal["primary", "secondary", "university"] = Field(
        description="university wants the evidence behind advice.")

    @property
    def extravert(self) -> bool:
        return self.mbti[0] == "E"

    @property
    def feeling(self) -> bool:
        return self.mbti[2] == "F"


class Outcome(BaseModel):
    """What should end the consultation."""

    diagnosis: str
    diagnosis_terms: list[str] = Field(min_length=1,
                                       description="Words that name it in the doctor's reply.")
    plan: str
    red_flag: bool = Field(description="An emergency: the right plan is urgent care.")


class PatientScript(BaseModel):
    id: str = Field(pattern=r"^[a-z0-9-]+$")
    specialty: str
    record: MedicalRecord
    persona: Persona
    outcome: Outcome

    @model_validator(mode="after")
    def _consistent(self) -> PatientScript:
        record = self.record
        kinds = [f.kind for f in record.hidden]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"{self.id}: hidden finding kinds repeat: {kinds}")
        visible = [record.chief_complaint, record.present_illness, record.past_history]
        visible += [f.statement for f in record.facts]
        for text in visible:
            for sentence in sentences(text):
                if bad := record.contradictions(sentence):
                    raise ValueError(f"{self.id}: {sentence!r} contradicts the record: {bad}")
            if leaked := record.disclosed(text):
                raise ValueError(f"{self.id}: {text!r} discloses {[f.kind for f in leaked]}")
        for fact in record.facts:
            if not mentions_any(fact.statement, fact.terms):
                raise ValueError(f"{self.id}: {fact.statement!r} names none of {fact.terms}")
        for finding in record.hidden:
            if finding not in record.disclosed(finding.statement):
                raise ValueError(f"{self.id}: {finding.statement!r} does not disclose itself")
            if bad := record.contradictions(finding.statement):
                raise ValueError(f"{self.id}: {finding.statement!r} contradicts {bad}")
        return self


def load_scripts(path: Path = SCRIPTS_PATH) -> list[PatientScript]:
    with path.open(encoding="utf-8") as f:
        return [PatientScript.model_validate_json(line) for line in f if line.strip()]
