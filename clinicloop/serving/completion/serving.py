"""The /v1/completions handler, testable without HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator

from clinicloop.backends.base import TokenLogprob
from clinicloop.serving.auth import Caller
from clinicloop.serving.completion.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from clinicloop.serving.errors import OpenAIError
from clinicloop.serving.generation import GenerationRun, Services, conversation_id


def _logprobs(items: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for t in items:
        out.tokens.append(t.token)
        out.token_logprobs.append(t.logprob)
        out.top_logprobs.append({x.token: x.logprob for x in t.top})
        out.text_offset.append(offset)
        offset += len(t.token)
    return out


class CompletionHandler:
    def __init__(self, services: Services, max_top_logprobs: int) -> None:
        self.s = services
        self.max_top_logprobs = max_top_logprobs

    async def start(self, request: CompletionRequest, caller: Caller,
                    conversation_header: str | None = None) -> GenerationRun:
        if (refused := request.refused_field()) is not None:
            raise OpenAIError(400, refused.message, param=refused.param, code=refused.code)
        prompts = request.prompts()
        if len(prompts) != 1:
            raise OpenAIError(400, "send one prompt per request (batched prompts are not "
                              "supported)", param="prompt")
        if request.logprobs is not None and request.logprobs > self.max_top_logprobs:
            raise OpenAIError(400, f"logprobs must be at most {self.max_top_logprobs}",
                              param="logprobs", code="invalid_value")
        if request.echo and request.logprobs is not None:
            raise OpenAIError(400, "echo with logprobs is not supported", param="echo")
        try:
            params = request.sampling_params(request.max_tokens, request.logprobs)
        except ValueError as exc:
            raise OpenAIError(400, str(exc), param="stop") from None
        messages = [{"role": "user", "content": prompts[0]}]
        run = GenerationRun(
            self.s, endpoint="completions", messages=messages,
            params=request.model_dump(exclude={"prompt"}, exclude_none=True),
            caller=caller,
            conversation=conversation_id(messages, caller, conversation_header), n=request.n,
            model=request.model,
        )
        await run.open(lambda engine: engine.complete(prompts[0], params))
        return run

    def _echo(self, request: CompletionRequest) -> str:
        return request.prompts()[0] if request.echo else ""

    async def respond(self, request: CompletionRequest, run: GenerationRun) -> CompletionResponse:
        async for _ in run.deltas():
            pass
        echo = self._echo(request)
        return CompletionResponse(
            id=run.request_id, created=run.created, model=run.response_model,
            choices=[
                CompletionChoice(
                    index=i, text=echo + c.content,
                    logprobs=_logprobs(c.logprobs, 0) if request.logprobs is not None else None,
                    finish_reason=c.finish_reason,  # type: ignore[arg-type]
                )
                for i, c in enumerate(run.choices)
            ],
            usage=run.usage_info(),
        )

    async def stream(self, request: CompletionRequest, run: GenerationRun,
                     ) -> AsyncIterator[CompletionResponse]:
        header = {"id": run.request_id, "created": run.created, "model": run.response_model}
        offsets = [0] * request.n
        echo = self._echo(request)
        if echo:
            for i in range(request.n):
                yield CompletionResponse(**header, choices=[CompletionChoice(index=i, text=echo)])
        async for delta in run.deltas():
            if not (delta.content or delta.finish_reason or delta.logprobs):
                continue
            logprobs = None
            if request.logprobs is not None:
                logprobs = _logprobs(delta.logprobs, offsets[delta.index])
                offsets[delta.index] += sum(len(t.token) for t in delta.logprobs)
            yield CompletionResponse(**header, choices=[CompletionChoice(
                index=delta.index, text=delta.content, logprobs=logprobs,
                finish_reason=delta.finish_reason,  # type: ignore[arg-type]
            )])
        if request.stream_options is not None and request.stream_options.include_usage:
            yield CompletionResponse(**header, choices=[], usage=run.usage_info())
