"""The /v1/responses handler, testable without HTTP: a request model in, a response object or a
stream of typed events out; stored responses read back from the conversation store.

A response is one logged turn (endpoint `responses`), served through `GenerationRun` like a chat
turn: same admission, keys, deadline, limits and log record. Its id is the record's id, so
`previous_response_id` and `GET /v1/responses/{id}` read the store and nothing else: they work
across restarts and replicas. The turn's messages are the conversation the model saw, with this
turn's `instructions` first as a system message (the logged params say whether there were any),
so a continuation takes the earlier turn's messages without its instructions, adds its reply and
then the new input. What the store holds is redacted: a continuation and a GET see the redacted
text, placeholders where PHI was.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from sqlalchemy.exc import SQLAlchemyError

from clinicloop.backends.base import SamplingParams
from clinicloop.serving.auth import Caller
from clinicloop.serving.errors import OpenAIError, as_openai_error
from clinicloop.serving.generation import GenerationRun, Services, conversation_id
from clinicloop.serving.responses.protocol import (
    MAX_ID_LENGTH,
    ContentPartEvent,
    IncompleteDetails,
    InputMessage,
    LifecycleEvent,
    OutputItem,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    ReasoningDeltaEvent,
    ReasoningDoneEvent,
    ReasoningItem,
    ReasoningText,
    ResponseError,
    ResponseObject,
    ResponsesRequest,
    ResponseStatus,
    ResponseUsage,
    StreamEvent,
    TextDeltaEvent,
    TextDoneEvent,
)
from clinicloop.store.db import Store
from clinicloop.store.records import TurnRecord

Kind = Literal["reasoning", "message"]
# What this API calls the fields the engines name in their errors (after chat's).
_PARAMS = {"messages": "input", "response_format": "text.format"}
_ID = re.compile(rf"[\w-]{{1,{MAX_ID_LENGTH}}}", re.ASCII)


def status_of(finish_reason: str | None, failed: bool) -> ResponseStatus:
    if failed or finish_reason == "error":
        return "failed"
    return "incomplete" if finish_reason == "length" else "completed"


def item_id(kind: Kind, response_id: str) -> str:
    """An output item's id, derived from its response's: the same in the stream, the response
    and a later GET, with nothing more to store."""
    return ("rs" if kind == "reasoning" else "msg") + response_id.removeprefix("resp")


def output_item(kind: Kind, response_id: str, text: str | None,
                status: Literal["in_progress", "completed", "incomplete"]) -> OutputItem:
    """A reasoning item or the assistant message; `text` None: not begun (no content part)."""
    ident = item_id(kind, response_id)
    if kind == "reasoning":
        return ReasoningItem(id=ident, status=status,
                             content=[] if text is None else [ReasoningText(text=text)])
    return OutputMessage(id=ident, status=status,
                         content=[] if text is None else [OutputText(text=text)])


def output(response_id: str, reasoning: str, content: str,
           status: ResponseStatus) -> list[OutputItem]:
    """The reasoning (if any), then the message: the order the reasoning split emits them in."""
    items = [output_item("reasoning", response_id, reasoning, "completed")] if reasoning else []
    done = "completed" if status == "completed" else "incomplete"
    return [*items, output_item("message", response_id, content, done)]


def response_object(*, response_id: str, created_at: int, model: str, params: dict[str, Any],
                    status: ResponseStatus, items: list[OutputItem],
                    usage: ResponseUsage | None = None,
                    error: ResponseError | None = None) -> ResponseObject:
    """A response object; `params` are the request's fields as logged, which is all a stored
    response keeps of its request."""
    if status == "failed" and error is None:
        error = ResponseError(code="server_error", message="generation failed")
    return ResponseObject(
        id=response_id, created_at=created_at, model=model, status=status, error=error,
        incomplete_details=IncompleteDetails() if status == "incomplete" else None,
        instructions=params.get("instructions"), max_output_tokens=params.get("max_output_tokens"),
        output=items, previous_response_id=params.get("previous_response_id"),
        reasoning=params.get("reasoning"), temperature=params.get("temperature", 1.0),
        top_p=params.get("top_p", 1.0), text=params.get("text") or {"format": {"type": "text"}},
        metadata=params.get("metadata") or {}, usage=usage,
    )


def usage_of(prompt_tokens: int, completion_tokens: int) -> ResponseUsage:
    return ResponseUsage(input_tokens=prompt_tokens, output_tokens=completion_tokens,
                         total_tokens=prompt_tokens + completion_tokens)


def stored_response(record: TurnRecord) -> ResponseObject:
    """A logged turn as the response it was (its text as stored: redacted)."""
    choice = record.choices[0] if record.choices else None
    finish = choice.finish_reason if choice else None
    status: ResponseStatus = ("cancelled" if record.status == "cancelled"
                              else status_of(finish, record.status == "error"))
    requested = record.params.get("model")
    pinned = requested not in (None, record.model) and record.status == "ok"
    return response_object(
        # The record is made when the turn ends; the response was created e2e_s before.
        response_id=record.id,
        created_at=round(record.created_at.timestamp() - (record.e2e_s or 0.0)),
        model=f"{record.model}@{record.model_version}" if pinned else record.model,
        params=record.params, status=status,
        items=output(record.id, record.reasoning or "", record.response or "", status),
        usage=usage_of(record.prompt_tokens, record.completion_tokens),
        error=ResponseError(code="server_error", message=f"generation failed ({record.error})")
        if status == "failed" else None,
    )


class ResponsesHandler:
    def __init__(self, services: Services, store: Store) -> None:
        self.s = services
        self.store = store

    async def start(self, request: ResponsesRequest, caller: Caller,
                    conversation_header: str | None = None) -> GenerationRun:
        """Refuse what is not honoured, rebuild the conversation, admit and start generating;
        errors here are plain HTTP errors."""
        if (refused := request.refused_field()) is not None:
            raise OpenAIError(400, refused.message, param=refused.param, code=refused.code)
        history: list[dict[str, Any]] = []
        conversation = None
        if request.previous_response_id is not None:
            earlier = await self._find(request.previous_response_id, caller,
                                       param="previous_response_id")
            if earlier.status != "ok":
                raise OpenAIError(400, f"response '{earlier.id}' did not complete "
                                  f"({earlier.status}): continue from one that did",
                                  param="previous_response_id", code="invalid_value")
            # The earlier turn's instructions are not carried over.
            history = earlier.messages[1:] if "instructions" in earlier.params \
                else earlier.messages
            history = [*history, {"role": "assistant", "content": earlier.response or ""}]
            conversation = earlier.conversation_id
        new = [{"role": item.role, "content": item.text()} for item in request.input
               if isinstance(item, InputMessage)]
        if not new:
            raise OpenAIError(400, "input holds no message", param="input", code="invalid_value")
        system = [] if request.instructions is None else [
            {"role": "system", "content": request.instructions}]
        messages = [*system, *history, *new]
        params, template_kwargs = sampling(request)
        run = GenerationRun(
            self.s, endpoint="responses", messages=messages,
            params=request.model_dump(mode="json", by_alias=True, exclude_none=True,
                                      exclude={"input"}),
            caller=caller, n=1, model=request.model,
            conversation=conversation or conversation_id(messages, caller, conversation_header),
        )
        try:
            await run.open(lambda engine: engine.chat(messages, params, template_kwargs))
        except OpenAIError as exc:
            exc.param = _PARAMS.get(exc.param or "", exc.param)
            raise
        return run

    async def respond(self, run: GenerationRun) -> ResponseObject:
        async for _ in run.deltas():
            pass
        choice = run.choices[0]
        status = status_of(choice.finish_reason, failed=False)
        return self._response(run, status, output(run.request_id, choice.reasoning,
                                                  choice.content, status))

    async def stream(self, run: GenerationRun) -> AsyncIterator[StreamEvent]:
        """The typed events, numbered in order: created, in progress, each item's added / delta /
        done events, then completed (or incomplete, or failed: a failure after the first event
        ends the stream with `response.failed` naming it)."""
        seq = itertools.count()
        rid = run.request_id
        started = self._response(run, "in_progress", [], usage=False)
        yield LifecycleEvent(type="response.created", sequence_number=next(seq), response=started)
        yield LifecycleEvent(type="response.in_progress", sequence_number=next(seq),
                             response=started)
        items: list[Kind] = []  # opened so far, in output order
        texts: dict[Kind, str] = {"reasoning": "", "message": ""}
        try:
            async for delta in run.deltas():
                # Reasoning comes before the answer (the reasoning split releases it so); an
                # upstream's reasoning after the answer began stays out of the stream (the
                # log keeps it), so that the items stay in order.
                for kind, text in (("reasoning", delta.reasoning), ("message", delta.content)):
                    if not text or (kind == "reasoning" and "message" in items):
                        continue
                    if kind not in items:
                        for event in _item_events(seq, rid, items, texts, kind, "completed"):
                            yield event
                    texts[kind] += text
                    yield _delta_event(seq, rid, kind, len(items) - 1, text)
        except Exception as exc:
            error = as_openai_error(exc)
            code = "server_error" if error.status >= 500 else error.code or "invalid_request"
            failed = self._response(run, "failed", [],
                                    error=ResponseError(code=code, message=str(error)))
            yield LifecycleEvent(type="response.failed", sequence_number=next(seq),
                                 response=failed)
            return
        status = status_of(run.choices[0].finish_reason, failed=False)
        if "message" not in items:  # no answer text: the message is still part of the output
            for event in _item_events(seq, rid, items, texts, "message", "completed"):
                yield event
        done = "completed" if status == "completed" else "incomplete"
        for event in _close_events(seq, rid, "message", len(items) - 1, texts["message"], done):
            yield event
        yield LifecycleEvent(
            type="response.completed" if status == "completed" else
            "response.incomplete" if status == "incomplete" else "response.failed",
            sequence_number=next(seq),
            response=self._response(run, status, output(rid, texts["reasoning"],
                                                        texts["message"], status)))

    async def retrieve(self, response_id: str, caller: Caller) -> ResponseObject:
        return stored_response(await self._find(response_id, caller, param=None))

    async def _find(self, response_id: str, caller: Caller, param: str | None) -> TurnRecord:
        """The stored response `response_id` of this caller's key; another key's is not found."""
        record = None
        if _ID.fullmatch(response_id):  # not one of ours otherwise: nothing to look up
            try:
                record = await asyncio.to_thread(self.store.get, response_id)
            except SQLAlchemyError:
                raise OpenAIError(503, "the conversation store is unavailable",
                                  code="store_unavailable") from None
        if record is None or record.endpoint != "responses" \
                or record.api_key_id != caller.key_id:
            raise OpenAIError(404, f"Response with id '{response_id}' not found.", param=param,
                              code="response_not_found")
        return record

    def _response(self, run: GenerationRun, status: ResponseStatus, items: list[OutputItem],
                  usage: bool = True, error: ResponseError | None = None) -> ResponseObject:
        return response_object(
            response_id=run.request_id, created_at=run.created, model=run.response_model,
            params=run.params, status=status, items=items, error=error,
            usage=usage_of(run.usage.prompt_tokens, run.usage.completion_tokens)
            if usage else None,
        )


def sampling(request: ResponsesRequest) -> tuple[SamplingParams, dict[str, Any]]:
    """The engine's sampling parameters and chat template arguments for `request`."""
    extra: dict[str, Any] = {}
    fmt = request.text.format if request.text is not None else None
    if fmt is not None and fmt.type == "json_object":
        extra["json_object"] = True
    elif fmt is not None and fmt.type == "json_schema":
        extra["json_schema"] = fmt.schema_
    template_kwargs: dict[str, Any] = {}
    effort = request.reasoning.effort if request.reasoning is not None else None
    if effort is not None:
        template_kwargs["thinking_mode"] = "off" if effort == "none" else "on"
    params = SamplingParams(
        max_tokens=request.max_output_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p, **extra,
    )
    return params, template_kwargs


def _item_events(seq: itertools.count[int], rid: str, items: list[Kind],
                 texts: dict[Kind, str], kind: Kind, done: Literal["completed", "incomplete"],
                 ) -> list[StreamEvent]:
    """Close the open item (if any) and open one of `kind`: its `output_item.added` and
    `content_part.added`."""
    events: list[StreamEvent] = []
    if items:
        events += _close_events(seq, rid, items[-1], len(items) - 1, texts[items[-1]], done)
    items.append(kind)
    index = len(items) - 1
    events.append(OutputItemEvent(type="response.output_item.added", sequence_number=next(seq),
                                  output_index=index,
                                  item=output_item(kind, rid, None, "in_progress")))
    events.append(ContentPartEvent(type="response.content_part.added", sequence_number=next(seq),
                                   item_id=item_id(kind, rid), output_index=index,
                                   content_index=0, part=_part(kind, "")))
    return events


def _close_events(seq: itertools.count[int], rid: str, kind: Kind, index: int, text: str,
                  done: Literal["completed", "incomplete"]) -> list[StreamEvent]:
    """An item's text done, content part done and `output_item.done` events."""
    ident = item_id(kind, rid)
    text_done: Callable[..., StreamEvent] = (ReasoningDoneEvent if kind == "reasoning"
                                             else TextDoneEvent)
    return [
        text_done(sequence_number=next(seq), item_id=ident, output_index=index, content_index=0,
                  text=text),
        ContentPartEvent(type="response.content_part.done", sequence_number=next(seq),
                         item_id=ident, output_index=index, content_index=0,
                         part=_part(kind, text)),
        OutputItemEvent(type="response.output_item.done", sequence_number=next(seq),
                        output_index=index, item=output_item(kind, rid, text, done)),
    ]


def _delta_event(seq: itertools.count[int], rid: str, kind: Kind, index: int,
                 text: str) -> StreamEvent:
    delta: Callable[..., StreamEvent] = (ReasoningDeltaEvent if kind == "reasoning"
                                         else TextDeltaEvent)
    return delta(sequence_number=next(seq), item_id=item_id(kind, rid), output_index=index,
                 content_index=0, delta=text)


def _part(kind: Kind, text: str) -> OutputText | ReasoningText:
    return ReasoningText(text=text) if kind == "reasoning" else OutputText(text=text)
