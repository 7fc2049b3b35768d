"""The chat handler without HTTP: real in-process engine and store, request models in, response
models out."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from clinicloop.backends.llamacpp import LlamaCppEngine
from clinicloop.config import EngineSettings, StoreSettings
from clinicloop.serving.admission import Admission
from clinicloop.serving.auth import Caller
from clinicloop.serving.chat_completion.protocol import ChatCompletionRequest
from clinicloop.serving.chat_completion.serving import ChatCompletionHandler
from clinicloop.serving.errors import OpenAIError
from clinicloop.serving.generation import Services
from clinicloop.serving.metrics import Metrics
from clinicloop.store.db import Store
from clinicloop.store.writer import LogWriter

CALLER = Caller("client", "abc123")


def run_with_handler(tiny_model, tmp_path: Path, body):
    async def main():
        engine = LlamaCppEngine(EngineSettings(model_path=tiny_model.gguf_q8_0), tmp_path)
        store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
        writer = LogWriter(store, StoreSettings(spool_path=tmp_path / "spool.jsonl"))
        await engine.start()
        await writer.start()
        services = Services(engine, Admission(1, 4), Metrics(), writer, request_timeout_s=30)
        try:
            return await body(ChatCompletionHandler(services, max_top_logprobs=5))
        finally:
            await engine.close()
            await writer.close()

    return asyncio.run(main())


def request(**kwargs) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({
        "messages": [{"role": "system", "content": "You are a careful doctor."},
                     {"role": "user", "content": [{"type": "text", "text": "My knee hurts."}]}],
        "max_tokens": 24, "temperature": 0, **kwargs})


def test_stream_and_response_agree_and_are_logged_by_id(tiny_model, tmp_path):
    async def body(handler: ChatCompletionHandler):
        req = request()
        full = await handler.respond(req, await handler.start(req, CALLER))
        sreq = request(stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in handler.stream(sreq, await handler.start(sreq, CALLER))]
        return full, chunks

    full, chunks = run_with_handler(tiny_model, tmp_path, body)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    logged = store.get(full.id)
    assert logged is not None and logged.response == full.choices[0].message.content
    assert logged.api_key_id == "abc123" and logged.messages[1]["content"] == "My knee hurts."
    assert store.get(chunks[0].id) is not None and store.count() == 2


def test_bad_requests_fail_before_admission(tiny_model, tmp_path):
    async def body(handler: ChatCompletionHandler):
        with pytest.raises(OpenAIError) as err:
            await handler.start(request(logprobs=True, top_logprobs=6), CALLER)
        assert err.value.status == 400 and err.value.param == "top_logprobs"
        with pytest.raises(OpenAIError) as err:
            await handler.start(request(stop=["a", "b", "c", "d", "e"]), CALLER)
        assert err.value.param == "stop"
        with pytest.raises(OpenAIError) as err:
            await handler.start(request(max_tokens=5000), CALLER)
        assert err.value.code == "context_length_exceeded"
        return handler.s.admission.running

    assert run_with_handler(tiny_model, tmp_path, body) == 0
