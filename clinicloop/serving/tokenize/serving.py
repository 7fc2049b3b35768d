"""The /tokenize and /detokenize handler, testable without HTTP: the request's `model` resolved
as the generating routes resolve it (the served name: the active version; a version's card: that
version, loaded if need be; anything else a 404), then that version's engine tokenizes (llama.cpp:
its loaded vocabulary and chat template; a vLLM upstream: its own /tokenize). Nothing is admitted
or logged: no text is generated."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from clinicloop.backends.base import Engine
from clinicloop.serving.tokenize.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)


class TokenizeHandler:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        async with self._engine(request.model) as engine:
            tokens = await engine.tokenize(
                request.text_or_messages(), add_special_tokens=request.special_tokens(),
                add_generation_prompt=request.add_generation_prompt,
                template_kwargs=request.chat_template_kwargs,
                token_strs=bool(request.return_token_strs))
        return TokenizeResponse(count=len(tokens.ids), max_model_len=tokens.max_model_len,
                                tokens=tokens.ids, token_strs=tokens.strs)

    async def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        async with self._engine(request.model) as engine:
            return DetokenizeResponse(prompt=await engine.detokenize(request.tokens))

    @asynccontextmanager
    async def _engine(self, model: str | None) -> AsyncIterator[Engine]:
        """The engine of the version `model` names, held until the block ends."""
        lease = await self.engine.lease(None, await self.engine.resolve(model))
        try:
            yield lease.engine
        finally:
            lease.release()
