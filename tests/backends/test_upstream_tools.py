"""Tool calls through the `openai` engine (the scripted upstream, a real process on 127.0.0.1): its
streamed calls pass through piece by piece, a call it left inside
the reasoning is parsed out by the embedded engine's rule, and a malformed call piece is an
upstream failure."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

from clinicloop.backends.base import Delta, EngineError, Event, SamplingParams
from clinicloop.backends.openai_upstream import OpenAIUpstreamEngine
from clinicloop.config import EngineSettings
from clinicloop.model.corpus import TOOLS
from tests.serving import scripted_upstream


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with scripted_upstream.running() as url:
        yield url


def collect(url: str, scenario: str, **tool_fields) -> list[Delta]:
    params = SamplingParams(max_tokens=8, tools=TOOLS, **tool_fields)

    async def main() -> list[Event]:
        engine = OpenAIUpstreamEngine(EngineSettings(kind="openai", upstream_url=url))
        await engine.start()
        try:
            messages = [{"role": "user", "content": f"Can I take these together? @@{scenario}@@"}]
            return [event async for event in engine.chat(messages, params, {})]
        finally:
            await engine.close()

    return [e for e in asyncio.run(main()) if isinstance(e, Delta)]


def joined(deltas: list[Delta]) -> tuple[str, str, list[dict[str, str]]]:
    calls: list[dict[str, str]] = []
    for piece in (p for d in deltas for p in d.tool_calls):
        if piece.index == len(calls):
            calls.append({"id": piece.id or "", "name": piece.name or "", "arguments": ""})
        calls[piece.index]["arguments"] += piece.arguments
    return ("".join(d.reasoning for d in deltas), "".join(d.content for d in deltas), calls)


def test_upstream_calls_pass_through_piece_by_piece(upstream):
    deltas = collect(upstream, "tool_calls")
    reasoning, content, calls = joined(deltas)
    assert content == "Hello"
    assert calls == [{"id": "chatcmpl-tool-up1", "name": "check_drug_interaction",
                      "arguments": '{"drug_a": "ibuprofen", "drug_b": "warfarin"}'}]
    assert sum(len(d.tool_calls) for d in deltas) == 4  # the header, then three fragments
    assert deltas[-1].finish_reason == "tool_calls"


def test_a_call_inside_the_reasoning_is_one_call_and_not_reasoning(upstream):
    deltas = collect(upstream, "think_call")
    reasoning, content, calls = joined(deltas)
    assert "<tool_call>" not in reasoning and reasoning.startswith("I should book.")
    assert content == "HelloBooked."
    [call] = calls
    assert call["name"] == "book_appointment"
    assert json.loads(call["arguments"]) == {"specialty": "dermatology", "day": "Tuesday"}
    assert deltas[-1].finish_reason == "tool_calls"


def test_with_tool_choice_none_text_stays_text(upstream):
    reasoning, _, calls = joined(collect(upstream, "think_call", tool_choice="none"))
    assert calls == [] and "<tool_call>" in reasoning


def test_a_malformed_call_piece_is_an_upstream_failure(upstream):
    with pytest.raises(EngineError) as failed:
        collect(upstream, "bad_tool_call")
    assert failed.value.status == 502 and "malformed" in str(failed.value)
