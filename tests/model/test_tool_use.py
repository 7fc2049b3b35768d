"""The tiny model learned tool use: offered the corpus's tools, it calls the drug-interaction
lookup for drug-pair questions phrased unlike the corpus, answers other questions in plain text,
and answers in text once a tool result is in; most of its calls copy both drugs right. Greedy on
the GGUF through llama.cpp, one thread, as the server runs it."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from llama_cpp import Llama

from clinicloop.model.corpus import TOOLS
from clinicloop.model.tiny import TinyModel
from clinicloop.model.tokenizer import render_chat

CALL = re.compile(r"<tool_call>\n(.*?)\n</tool_call>", re.DOTALL)

# Phrasings that appear nowhere in the corpus, on pairs it never pairs.
DRUG_QUESTIONS: list[tuple[str, str, str]] = [
    ("Is it okay to mix {a} and {b}?", "paracetamol", "codeine"),
    ("Will {a} react badly with {b}?", "amoxicillin", "metformin"),
    ("I take {a} every day. Is {b} safe for me?", "lisinopril", "paracetamol"),
    ("Any problem combining {a} with {b}?", "omeprazole", "amlodipine"),
    ("Could {a} and {b} interact?", "salbutamol", "cetirizine"),
    ("Is it okay to mix {a} and {b}?", "doxycycline", "sertraline"),
]
PLAIN_QUESTIONS = [
    "I've got a sore throat and a mild fever. What can I do?",
    "What helps with a runny nose?",
    "My father has chest pain spreading to his left arm. What should I do?",
    "What is warfarin used for?",
]


@pytest.fixture(scope="module")
def llm(tiny_model: TinyModel) -> Llama:
    return Llama(model_path=str(tiny_model.gguf_f16), n_ctx=1024, n_threads=1, verbose=False)


def _complete(llm: Llama, messages: list[dict[str, Any]]) -> str:
    prompt = render_chat(messages, thinking_mode="off", tools=TOOLS)
    choice = llm.create_completion(prompt, max_tokens=96, temperature=0.0)["choices"][0]
    assert choice["finish_reason"] == "stop", choice["text"]
    return choice["text"]


def _calls(text: str) -> list[dict[str, Any]]:
    return [json.loads(block) for block in CALL.findall(text)]


def test_drug_pair_questions_call_the_interaction_lookup(llm: Llama) -> None:
    for ask, a, b in DRUG_QUESTIONS:
        text = _complete(llm, [{"role": "user", "content": ask.format(a=a, b=b)}])
        assert text.startswith("<tool_call>"), text
        (call,) = _calls(text)
        assert call["name"] == "check_drug_interaction", text
        assert set(call["arguments"]) == {"drug_a", "drug_b"}, text
        assert all(isinstance(v, str) and v for v in call["arguments"].values()), text


def test_drug_pair_calls_copy_the_drugs_from_the_question(llm: Llama) -> None:
    # Measured on 20 such prompts: 12 exact (the misses repeat one drug); a model that does not
    # copy gets none.
    hits = 0
    for ask, a, b in DRUG_QUESTIONS:
        text = _complete(llm, [{"role": "user", "content": ask.format(a=a, b=b)}])
        hits += _calls(text) == [{"name": "check_drug_interaction",
                                  "arguments": {"drug_a": a, "drug_b": b}}]
    assert hits >= 4


def test_unrelated_questions_get_a_plain_answer(llm: Llama) -> None:
    for question in PLAIN_QUESTIONS:
        text = _complete(llm, [{"role": "user", "content": question}])
        assert "<tool_call>" not in text and len(text.split()) >= 5, text


def test_after_a_tool_result_the_model_answers_in_text(llm: Llama) -> None:
    call = {"id": "call_1", "type": "function", "function": {
        "name": "check_drug_interaction",
        "arguments": {"drug_a": "warfarin", "drug_b": "ibuprofen"}}}
    result = {"severity": "major",
              "advice": "Ibuprofen with warfarin raises the risk of serious bleeding."}
    text = _complete(llm, [
        {"role": "user", "content": "Will warfarin react badly with ibuprofen?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": json.dumps(result), "tool_call_id": "call_1"},
    ])
    assert "<tool_call>" not in text and "interaction" in text, text
