"""The medical dialogue corpus the tiny model is trained on, generated from templates.

Every row is synthetic: hand-written conditions, medicines and emergency situations combined with
patient phrasings, so the shipped file carries no real patient data; `scripts/make_corpus.py`
writes it, byte for byte the same each time. Answers stay at one to three sentences because a
model of a few hundred thousand parameters can learn the ChatML format of short answers, not long
ones. This module reads the shipped file and holds what rows and their system prompts are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypedDict

CORPUS_PATH = Path(__file__).parent / "data" / "medical_dialogues.jsonl"

SYSTEM_PROMPTS: tuple[str | None, ...] = (
    "You are a careful medical assistant. Give short, safe advice and say when to seek "
    "emergency care.",
    "You are a doctor answering patient questions briefly and kindly.",
    None,
)


class Message(TypedDict):
    role: str
    content: str


class Dialogue(TypedDict):
    id: str
    topic: str
    messages: list[Message]
    reasoning: str


def system_messages(i: int) -> list[Message]:
    """The system prompt of the i-th dialogue (none for some), as messages."""
    prompt = SYSTEM_PROMPTS[i % len(SYSTEM_PROMPTS)]
    return [] if prompt is None else [{"role": "system", "content": prompt}]


def load_corpus(path: Path = CORPUS_PATH) -> list[Dialogue]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
