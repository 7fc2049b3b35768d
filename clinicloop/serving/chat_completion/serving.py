"""The /v1/chat/completions handler, testable without HTTP: request model in, response model or
chunk stream out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from clinicloop.backends.base import TokenLogprob, ToolCallDelta
from clinicloop.serving.auth import Caller
from clinicloop.serving.chat_completion.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    ReplyToolCall,
    TokenLogprobOut,
    TopLogprobOut,
)
from clinicloop.serving.errors import OpenAIError
from clinicloop.serving.generation import GenerationRun, Services, conversation_id


def _logprobs(items: list[TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[
        TokenLogprobOut(token=t.token, logprob=t.logprob, bytes=t.bytes, top_logprobs=[
            TopLogprobOut(token=x.token, logprob=x.logprob, bytes=x.bytes) for x in t.top
        ])
        for t in items
    ])


def _call_piece(piece: ToolCallDelta) -> DeltaToolCall:
    return DeltaToolCall(index=piece.index, id=piece.id,
                         type="function" if piece.id is not None else None,
                         function=DeltaFunctionCall(name=piece.name,
                                                    arguments=piece.arguments))


class ChatCompletionHandler:
    def __init__(self, services: Services, max_top_logprobs: int) -> None:
        self.s = services
        self.max_top_logprobs = max_top_logprobs

    async def start(self, request: ChatCompletionRequest, caller: Caller,
                    conversation_header: str | None = None) -> GenerationRun:
        """Validate, admit and start generating; errors here are plain HTTP errors."""
        if (refused := request.refused_field()) is not None:
            raise OpenAIError(400, refused.message, param=refused.param, code=refused.code)
        if (problem := request.tool_problem()) is not None:
            raise OpenAIError(400, problem, param="tool_choice" if "tool_choice" in problem
                              else "tools", code="invalid_value")
        if request.top_logprobs is not None and request.top_logprobs > self.max_top_logprobs:
            raise OpenAIError(400, f"top_logprobs must be at most {self.max_top_logprobs}",
                              param="top_logprobs", code="invalid_value")
        try:
            stops = request.stop_list()
        except ValueError as exc:
            raise OpenAIError(400, str(exc), param="stop") from None
        extra: dict[str, Any] = {}
        fmt = request.response_format
        if fmt is not None and fmt.type == "json_object":
            extra["json_object"] = True
        elif fmt is not None and fmt.type == "json_schema":
            assert fmt.json_schema is not None
            extra["json_schema"] = fmt.json_schema.schema_
        top = (request.top_logprobs or 0) if request.logprobs else None
        params = request.sampling_params(request.max_new_tokens(), top, **extra,
                                         **request.tool_params())
        params.stop = stops
        messages = request.messages_as_dicts()
        run = GenerationRun(
            self.s, endpoint="chat.completions", messages=messages,
            params=request.model_dump(exclude={"messages"}, exclude_none=True),
            caller=caller, conversation=conversation_id(messages, caller, conversation_header),
            n=request.n, model=request.model,
        )
        await run.open(lambda engine: engine.chat(messages, params,
                                                   request.chat_template_kwargs))
        return run

    async def respond(self, request: ChatCompletionRequest, run: GenerationRun,
                      ) -> ChatCompletionResponse:
        async for _ in run.deltas():
            pass
        return ChatCompletionResponse(
            id=run.request_id, created=run.created, model=run.response_model,
            choices=[
                ChatChoice(
                    index=i,
                    message=AssistantMessage(
                        # OpenAI's reply that only calls tools has no content.
                        content=c.content if c.content or not c.tool_calls else None,
                        reasoning_content=c.reasoning or None,
                        tool_calls=[ReplyToolCall.model_validate(call.as_openai())
                                    for call in c.tool_calls]),
                    logprobs=_logprobs(c.logprobs) if request.logprobs else None,
                    finish_reason=c.finish_reason,  # type: ignore[arg-type]
                )
                for i, c in enumerate(run.choices)
            ],
            usage=run.usage_info(),
        )

    async def stream(self, request: ChatCompletionRequest, run: GenerationRun,
                     ) -> AsyncIterator[ChatCompletionChunk]:
        header = {"id": run.request_id, "created": run.created, "model": run.response_model}
        for i in range(request.n):
            yield ChatCompletionChunk(**header, choices=[ChatChunkChoice(
                index=i, delta=DeltaMessage(role="assistant", content=""))])
        async for delta in run.deltas():
            if not (delta.content or delta.reasoning or delta.finish_reason or delta.logprobs
                    or delta.tool_calls):
                continue
            yield ChatCompletionChunk(**header, choices=[ChatChunkChoice(
                index=delta.index,
                delta=DeltaMessage(content=delta.content or None,
                                   reasoning_content=delta.reasoning or None,
                                   tool_calls=[_call_piece(c) for c in delta.tool_calls] or None),
                logprobs=_logprobs(delta.logprobs) if request.logprobs else None,
                finish_reason=delta.finish_reason,  # type: ignore[arg-type]
            )])
        if request.stream_options is not None and request.stream_options.include_usage:
            yield ChatCompletionChunk(**header, choices=[], usage=run.usage_info())
