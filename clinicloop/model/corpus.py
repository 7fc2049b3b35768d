"""The medical dialogue corpus the tiny model is trained on, generated from templates.

Every row is synthetic: hand-written conditions, medicines and emergency situations combined with
patient phrasings, so the shipped file carries no real patient data; `scripts/make_corpus.py`
writes it, byte for byte the same each time. Answers stay at one to three sentences because a
model of a few hundred thousand parameters can learn the ChatML format of short answers, not long
ones. A share of rows offers two tools (`TOOLS`, OpenAI shape): the assistant calls one and
answers from its result, or answers a question the tools do not fit without calling. This module
reads the shipped file and holds what rows, their system prompts and the tools are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NotRequired, TypedDict

CORPUS_PATH = Path(__file__).parent / "data" / "medical_dialogues.jsonl"

SYSTEM_PROMPTS: tuple[str | None, ...] = (
    "You are a careful medical assistant. Give short, safe advice and say when to seek "
    "emergency care.",
    "You are a doctor answering patient questions briefly and kindly.",
    None,
)


SPECIALTIES: tuple[str, ...] = (
    "general practice", "dermatology", "cardiology", "physiotherapy", "paediatrics",
    "mental health",
)
WEEKDAYS: tuple[str, ...] = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "check_drug_interaction",
        "description": "Look up how two medicines interact: the severity and advice.",
        "parameters": {
            "type": "object",
            "properties": {
                "drug_a": {"type": "string", "description": "The first medicine."},
                "drug_b": {"type": "string", "description": "The second medicine."},
            },
            "required": ["drug_a", "drug_b"],
        },
    }},
    {"type": "function", "function": {
        "name": "book_appointment",
        "description": "Book a clinic appointment with a specialty on a weekday.",
        "parameters": {
            "type": "object",
            "properties": {
                "specialty": {"type": "string", "enum": list(SPECIALTIES)},
                "day": {"type": "string", "enum": list(WEEKDAYS)},
            },
            "required": ["specialty", "day"],
        },
    }},
]


class ToolFunction(TypedDict):
    name: str
    # Parsed, as the chat template receives it (vLLM and transformers parse the wire's string).
    arguments: dict[str, str]


class ToolCall(TypedDict):
    id: str
    type: str
    function: ToolFunction


class Message(TypedDict):
    role: str
    content: str
    tool_calls: NotRequired[list[ToolCall]]
    tool_call_id: NotRequired[str]


class Dialogue(TypedDict):
    id: str
    topic: str
    messages: list[Message]
    reasoning: str
    # The tools the request offers (OpenAI shape); absent when it offers none.
    tools: NotRequired[list[dict[str, Any]]]


def system_messages(i: int) -> list[Message]:
    """The system prompt of the i-th dialogue (none for some), as messages."""
    prompt = SYSTEM_PROMPTS[i % len(SYSTEM_PROMPTS)]
    return [] if prompt is None else [{"role": "system", "content": prompt}]


def load_corpus(path: Path = CORPUS_PATH) -> list[Dialogue]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
