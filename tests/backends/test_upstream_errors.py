"""The `openai` engine against an upstream that fails a request it accepted (the scripted upstream:
a real process on 127.0.0.1): every kind of failure is an `EngineError` with the right status,
never a stream that just stops; finish reasons OpenAI knows pass through unchanged."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from clinicloop.backends.base import Delta, EngineError, Event, SamplingParams
from clinicloop.backends.openai_upstream import OpenAIUpstreamEngine
from clinicloop.config import EngineSettings
from tests.serving import scripted_upstream

PARAMS = SamplingParams(max_tokens=8)


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with scripted_upstream.running() as url:
        yield url


def collect(url: str, endpoint: str, scenario: str) -> list[Event]:
    async def main() -> list[Event]:
        engine = OpenAIUpstreamEngine(EngineSettings(kind="openai", upstream_url=url))
        await engine.start()
        try:
            text = f"Patient note @@{scenario}@@"
            events = (engine.chat([{"role": "user", "content": text}], PARAMS, {})
                      if endpoint == "chat" else engine.complete(text, PARAMS))
            return [event async for event in events]
        finally:
            await engine.close()

    return asyncio.run(main())


@pytest.mark.parametrize("endpoint", ["chat", "completion"])
@pytest.mark.parametrize(("scenario", "status", "says"), [
    ("error_chunk", 502, "failed mid-stream"),
    ("error_first", 502, "failed mid-stream"),
    ("finish:abort", 502, "aborted"),
    ("finish:eos_token", 502, "does not define"),
    ("bad_json", 502, "not JSON"),
    ("bad_delta", 502, "malformed"),
    ("bad_choice", 502, "outside the 1 asked for"),
    ("drop", 503, "broke off"),
    ("no_done", 503, "before [DONE]"),
    ("http_500", 503, "answered 500"),
])
def test_a_failed_upstream_stream_is_an_engine_error(upstream, endpoint, scenario, status, says):
    with pytest.raises(EngineError) as failed:
        collect(upstream, endpoint, scenario)
    assert failed.value.status == status and says in str(failed.value)


@pytest.mark.parametrize("reason", ["stop", "length", "tool_calls", "content_filter"])
def test_openai_finish_reasons_pass_through(upstream, reason):
    events = collect(upstream, "chat", f"finish:{reason}")
    deltas = [e for e in events if isinstance(e, Delta)]
    assert deltas[0].content == "Hello" and deltas[-1].finish_reason == reason
