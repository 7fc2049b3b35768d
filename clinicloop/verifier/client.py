"""One way for verifier parts (judge, rubric generator, patient simulator) to call a model.

`ChatClient.chat` sends messages and returns the reply text. `HttpChatClient` talks to any
OpenAI-compatible base URL (our server, vLLM, a hosted judge); `EngineChatClient` drives one of our
engines in-process (no HTTP), which is how tests and the CLI run on the tiny model. Both bound their
concurrency, and both pass `response_format` through, so a json_schema is enforced wherever the
engine can (a grammar on llama.cpp).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import httpx

from clinicloop.config import EngineSettings
from clinicloop.serving.engines.base import Delta, Engine, SamplingParams


class ChatError(Exception):
    """The model endpoint failed (not: the model said something unparseable)."""


class ChatClient(Protocol):
    model: str

    async def chat(self, messages: list[dict[str, Any]], *, max_tokens: int = 512,
                   temperature: float = 0.0, seed: int | None = 0,
                   json_schema: dict[str, Any] | None = None,
                   template_kwargs: dict[str, Any] | None = None) -> str: ...


class HttpChatClient:
    def __init__(self, base_url: str, *, api_key: str | None = None, model: str | None = None,
                 concurrency: int = 8, timeout_s: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._model = model
        self._slots = asyncio.Semaphore(concurrency)
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(headers=headers, timeout=timeout_s)

    @property
    def model(self) -> str:
        return self._model or ""

    async def resolve_model(self) -> str:
        """The model id: as configured, else the upstream's first /v1/models entry."""
        if self._model is None:
            r = await self._http.get(self.base_url + "/models")
            r.raise_for_status()
            self._model = r.json()["data"][0]["id"]
        return self._model

    async def chat(self, messages: list[dict[str, Any]], *, max_tokens: int = 512,
                   temperature: float = 0.0, seed: int | None = 0,
                   json_schema: dict[str, Any] | None = None,
                   template_kwargs: dict[str, Any] | None = None) -> str:
        body: dict[str, Any] = {"model": await self.resolve_model(), "messages": messages,
                                "max_tokens": max_tokens, "temperature": temperature}
        if seed is not None:
            body["seed"] = seed
        if json_schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "response", "schema": json_schema, "strict": True}}
        if template_kwargs:
            body["chat_template_kwargs"] = template_kwargs
        async with self._slots:
            try:
                r = await self._http.post(self.base_url + "/chat/completions", json=body)
            except httpx.HTTPError as exc:
                raise ChatError(f"{type(exc).__name__}: {exc}") from exc
        if r.status_code != 200:
            raise ChatError(f"{r.status_code}: {r.text[:500]}")
        return r.json()["choices"][0]["message"]["content"] or ""

    async def aclose(self) -> None:
        await self._http.aclose()


class EngineChatClient:
    """Our engine, in-process. The engine must be started by the caller."""

    def __init__(self, engine: Engine, *, concurrency: int | None = None) -> None:
        self.engine = engine
        self._slots = asyncio.Semaphore(concurrency or engine.max_concurrency)

    @property
    def model(self) -> str:
        return self.engine.model_name

    async def chat(self, messages: list[dict[str, Any]], *, max_tokens: int = 512,
                   temperature: float = 0.0, seed: int | None = 0,
                   json_schema: dict[str, Any] | None = None,
                   template_kwargs: dict[str, Any] | None = None) -> str:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed,
                                json_schema=json_schema)
        parts: list[str] = []
        async with self._slots:
            try:
                async for event in self.engine.chat(messages, params, template_kwargs or {}):
                    if isinstance(event, Delta):
                        parts.append(event.content)
            except Exception as exc:
                raise ChatError(f"{type(exc).__name__}: {exc}") from exc
        return "".join(parts)

    async def aclose(self) -> None:
        return None


@asynccontextmanager
async def open_client(url: str | None = None, *, api_key: str | None = None,
                      model: str | None = None, gguf: Path | None = None,
                      lora: Path | None = None, models_dir: Path = Path("var/models"),
                      n_ctx: int = 4096, concurrency: int = 8) -> AsyncIterator[ChatClient]:
    """A client for an OpenAI-compatible base URL, else for `gguf` run in-process (the tiny
    model when None); closed on exit. An HTTP client's model is resolved on open, so `.model`
    names it from the first use (verdict cache keys and stored rows depend on it). `lora`: a
    llama.cpp LoRA adapter GGUF applied on top of `gguf`."""
    if url:
        client = HttpChatClient(url, api_key=api_key, model=model, concurrency=concurrency)
        try:
            await client.resolve_model()
            yield client
        finally:
            await client.aclose()
        return
    from clinicloop.serving.engines.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(EngineSettings(model_path=gguf, lora_path=lora, n_ctx=n_ctx),
                            models_dir)
    await engine.start()
    try:
        yield EngineChatClient(engine)
    finally:
        await engine.close()
