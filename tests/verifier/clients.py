"""The real in-process tiny model as a verifier client, and a wrapper that counts (and can cut
short) the calls reaching it — counting, not faking: every call still goes to the model."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from clinicloop.backends.llamacpp import LlamaCppEngine
from clinicloop.config import EngineSettings
from clinicloop.verifier.client import EngineChatClient


class Killed(Exception):
    """Stands for the process dying mid-run."""


class CountingClient:
    """Counts the calls that reach `inner` and records their last message; after `kill_after`
    calls it raises Killed instead."""

    def __init__(self, inner: EngineChatClient, kill_after: int | None = None) -> None:
        self.inner = inner
        self.kill_after = kill_after
        self.prompts: list[str] = []

    @property
    def model(self) -> str:
        return self.inner.model

    @property
    def calls(self) -> int:
        return len(self.prompts)

    async def chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        if self.calls == self.kill_after:
            raise Killed
        self.prompts.append(messages[-1]["content"])
        return await self.inner.chat(messages, **kwargs)


def with_engine(tiny_model: Any, tmp_path: Path,
                body: Callable[[EngineChatClient], Awaitable[Any]], **settings: Any) -> Any:
    """Run `body` with a client over the tiny model, loaded in-process for this call."""
    async def main() -> Any:
        engine = LlamaCppEngine(EngineSettings(model_path=tiny_model.gguf_q8_0, **settings),
                                tmp_path)
        await engine.start()
        try:
            return await body(EngineChatClient(engine))
        finally:
            await engine.close()

    return asyncio.run(main())


def with_client(tiny_model: Any, tmp_path: Path,
                body: Callable[[CountingClient], Awaitable[Any]], **settings: Any) -> Any:
    """`with_engine`, the client wrapped in a CountingClient."""
    return with_engine(tiny_model, tmp_path, lambda client: body(CountingClient(client)),
                       **settings)
