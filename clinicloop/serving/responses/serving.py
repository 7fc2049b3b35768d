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

Function tools go to the engine in chat's shape; the calls in a reply are `function_call` output
items after the reasoning and the message, and a continuation's `function_call` and
`function_call_output` input items become the assistant's `tool_calls` and tool messages, as a
chat client would send them. A call's item id is derived from the response id and its position.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from sqlalchemy.exc import SQLAlchemyError

from clinicloop.backends.base import SamplingParams, ToolCallDelta
from clinicloop.serving.auth import Caller
from clinicloop.serving.errors import OpenAIError, as_openai_error
from clinicloop.serving.generation import CallState, GenerationRun, Services, conversation_id
from clinicloop.serving.responses.protocol import (
    MAX_ID_LENGTH,
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    ContentPartEvent,
    FunctionCallInput,
    FunctionCallItem,
    FunctionCallOutputInput,
    IncompleteDetails,
    InputItem,
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

Kind = Literal["reasoning", "message", "function_call"]
ItemStatus = Literal["in_progress", "completed", "incomplete"]
# What this API calls the fields the engines name in their errors (after chat's).
_PARAMS = {"messages": "input", "response_format": "text.format"}
_ID = re.compile(rf"[\w-]{{1,{MAX_ID_LENGTH}}}", re.ASCII)
_ID_PREFIX: dict[Kind, str] = {"reasoning": "rs", "message": "msg", "function_call": "fc"}


def status_of(finish_reason: str | None, failed: bool) -> ResponseStatus:
    if failed or finish_reason == "error":
        return "failed"
    return "incomplete" if finish_reason == "length" else "completed"


def item_id(kind: Kind, response_id: str, call: int = 0) -> str:
    """An output item's id, derived from its response's (and a call's from its position among
    the calls): the same in the stream, the response and a later GET, with nothing more to
    store."""
    ident = _ID_PREFIX[kind] + response_id.removeprefix("resp")
    return f"{ident}-{call}" if kind == "function_call" else ident


def output_item(kind: Literal["reasoning", "message"], response_id: str, text: str | None,
                status: ItemStatus) -> OutputItem:
    """A reasoning item or the assistant message; `text` None: not begun (no content part)."""
    ident = item_id(kind, response_id)
    if kind == "reasoning":
        return ReasoningItem(id=ident, status=status,
                             content=[] if text is None else [ReasoningText(text=text)])
    return OutputMessage(id=ident, status=status,
                         content=[] if text is None else [OutputText(text=text)])


def call_item(response_id: str, index: int, call: dict[str, Any], arguments: str,
              status: ItemStatus) -> FunctionCallItem:
    """Call `index` of a response, `call` in chat's shape (as engines produce and the log keeps
    it); `arguments` as far as they are known."""
    return FunctionCallItem(id=item_id("function_call", response_id, index), call_id=call["id"],
                            name=call["function"]["name"], arguments=arguments, status=status)


def output(response_id: str, reasoning: str, content: str, calls: list[dict[str, Any]],
           status: ResponseStatus) -> list[OutputItem]:
    """The reasoning (if any), the message (unless the reply only calls), then the calls, as
    OpenAI orders them; the last item is incomplete when the response is."""
    items: list[OutputItem] = []
    if reasoning:
        items.append(output_item("reasoning", response_id, reasoning, "completed"))
    if content or not calls:
        items.append(output_item("message", response_id, content, "completed"))
    items += [call_item(response_id, i, call, call["function"]["arguments"], "completed")
              for i, call in enumerate(calls)]
    if status != "completed":
        items[-1] = items[-1].model_copy(update={"status": "incomplete"})
    return items


def input_messages(items: list[InputItem]) -> list[dict[str, Any]]:
    """The input items as the chat messages the template takes: function calls join the
    assistant message just before them (one assistant turn: its text, then its calls), a
    function's output is a tool message, and reasoning is left out (as the template leaves out
    earlier turns' reasoning)."""
    messages: list[dict[str, Any]] = []
    joinable = False  # the last message is an assistant turn that calls may join
    for item in items:
        if isinstance(item, InputMessage):
            messages.append({"role": item.role, "content": item.text()})
            joinable = item.role == "assistant"
        elif isinstance(item, FunctionCallInput):
            if not joinable:
                messages.append({"role": "assistant", "content": ""})
                joinable = True
            messages[-1].setdefault("tool_calls", []).append(
                CallState(item.call_id, item.name, item.arguments).as_openai())
        elif isinstance(item, FunctionCallOutputInput):
            messages.append({"role": "tool", "tool_call_id": item.call_id,
                             "content": item.text()})
            joinable = False
    return messages


def _unanswerable_output(history: list[dict[str, Any]],
                         items: list[InputItem]) -> tuple[int, str] | None:
    """The position and call id of the first function call output in `items` that answers no
    call made before it (in the history or earlier in the input), else None."""
    known = {call["id"] for message in history for call in message.get("tool_calls") or []}
    for i, item in enumerate(items):
        if isinstance(item, FunctionCallInput):
            known.add(item.call_id)
        elif isinstance(item, FunctionCallOutputInput) and item.call_id not in known:
            return i, item.call_id
    return None


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
        tools=params.get("tools") or [], tool_choice=params.get("tool_choice", "auto"),
        parallel_tool_calls=params.get("parallel_tool_calls", True),
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
        items=output(record.id, record.reasoning or "", record.response or "",
                     (choice.tool_calls if choice else None) or [], status),
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
        if (problem := request.chat_tools().tool_problem()) is not None:
            raise OpenAIError(400, problem, param="tool_choice" if "tool_choice" in problem
                              else "tools", code="invalid_value")
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
            reply: dict[str, Any] = {"role": "assistant", "content": earlier.response or ""}
            if earlier.choices and earlier.choices[0].tool_calls:
                reply["tool_calls"] = earlier.choices[0].tool_calls
            history = [*history, reply]
            conversation = earlier.conversation_id
        if (unanswered := _unanswerable_output(history, request.input)) is not None:
            at, call_id = unanswered
            raise OpenAIError(400, f"No tool call found for function call output with call_id "
                              f"{call_id!r}.", param=f"input.{at}.call_id", code="invalid_value")
        new = input_messages(request.input)
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
        return self._response(run, status_of(run.choices[0].finish_reason, failed=False))

    async def stream(self, run: GenerationRun) -> AsyncIterator[StreamEvent]:
        """The typed events, numbered in order: created, in progress, each item's added / delta /
        done events, then completed (or incomplete, or failed: a failure after the first event
        ends the stream with `response.failed` naming it). The final response is the one
        `respond` gives; its items stream in its order (`_ItemEvents`)."""
        events = _ItemEvents(run.request_id)
        started = self._response(run, "in_progress", [], usage=False)
        yield LifecycleEvent(type="response.created", sequence_number=events.next(),
                             response=started)
        yield LifecycleEvent(type="response.in_progress", sequence_number=events.next(),
                             response=started)
        choice = run.choices[0]
        try:
            async for delta in run.deltas():
                for event in [*events.text("reasoning", delta.reasoning),
                              *events.text("message", delta.content),
                              *(e for piece in delta.tool_calls
                                for e in events.call(piece, choice.tool_calls))]:
                    yield event
        except Exception as exc:
            error = as_openai_error(exc)
            code = "server_error" if error.status >= 500 else error.code or "invalid_request"
            failed = self._response(run, "failed", [],
                                    error=ResponseError(code=code, message=str(error)))
            yield LifecycleEvent(type="response.failed", sequence_number=events.next(),
                                 response=failed)
            return
        status = status_of(choice.finish_reason, failed=False)
        if not choice.tool_calls:  # no answer text: the message is still part of the output
            for event in events.text("message", None):
                yield event
        for event in events.close("completed" if status == "completed" else "incomplete"):
            yield event
        yield LifecycleEvent(
            type="response.completed" if status == "completed" else
            "response.incomplete" if status == "incomplete" else "response.failed",
            sequence_number=events.next(), response=self._response(run, status))

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

    def _response(self, run: GenerationRun, status: ResponseStatus,
                  items: list[OutputItem] | None = None, usage: bool = True,
                  error: ResponseError | None = None) -> ResponseObject:
        """The response `run` gives; `items` None: its output as generated."""
        if items is None:
            choice = run.choices[0]
            items = output(run.request_id, choice.reasoning, choice.content,
                           [call.as_openai() for call in choice.tool_calls], status)
        return response_object(
            response_id=run.request_id, created_at=run.created, model=run.response_model,
            params=run.params, status=status, items=items, error=error,
            usage=usage_of(run.usage.prompt_tokens, run.usage.completion_tokens)
            if usage else None,
        )


def sampling(request: ResponsesRequest) -> tuple[SamplingParams, dict[str, Any]]:
    """The engine's sampling parameters and chat template arguments for `request`."""
    extra: dict[str, Any] = request.chat_tools().tool_params()
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


class _ItemEvents:
    """A stream's item events, numbered in order. Items open one at a time in the response's
    output order (reasoning, message, calls), each closing the one before; a piece whose item can
    no longer open in that order (reasoning once the answer began, answer text once a call
    began) is not streamed, though the final response, a GET and the log have it."""

    def __init__(self, response_id: str) -> None:
        self.rid = response_id
        self._seq = itertools.count()
        self.opened: list[Kind] = []  # in output order
        self.is_open = False  # the last opened item is not closed yet
        self.streamed = ""  # the open item's text or arguments so far
        self.open_call: dict[str, Any] = {}  # the open call, in chat's shape

    def next(self) -> int:
        return next(self._seq)

    def text(self, kind: Literal["reasoning", "message"], piece: str | None) -> list[StreamEvent]:
        """`piece` of the reasoning or the answer; None: open the item with no text."""
        if piece == "":
            return []
        events: list[StreamEvent] = []
        if not (self.is_open and self.opened[-1] == kind):
            after: tuple[Kind, ...] = ((kind, "message", "function_call") if kind == "reasoning"
                                       else (kind, "function_call"))
            if any(k in self.opened for k in after):
                return []
            events += self.close("completed")
            events += self._open(kind, output_item(kind, self.rid, None, "in_progress"))
            events.append(ContentPartEvent(
                type="response.content_part.added", sequence_number=self.next(),
                item_id=item_id(kind, self.rid), output_index=len(self.opened) - 1,
                content_index=0, part=_part(kind, "")))
        if piece:
            self.streamed += piece
            delta: Callable[..., StreamEvent] = (ReasoningDeltaEvent if kind == "reasoning"
                                                 else TextDeltaEvent)
            events.append(delta(sequence_number=self.next(), item_id=item_id(kind, self.rid),
                                output_index=len(self.opened) - 1, content_index=0,
                                delta=piece))
        return events

    def call(self, piece: ToolCallDelta, calls: list[CallState]) -> list[StreamEvent]:
        """A piece of a call; `calls`: the choice's calls so far, the piece joined."""
        events: list[StreamEvent] = []
        opened = self.opened.count("function_call")
        if piece.index == opened and piece.index < len(calls):  # the next call begins
            events += self.close("completed")
            self.open_call = calls[piece.index].as_openai()
            events += self._open("function_call", call_item(self.rid, piece.index, self.open_call,
                                                            "", "in_progress"))
        elif not (self.is_open and self.opened[-1] == "function_call"
                  and piece.index == opened - 1):
            return []  # a stray piece, or one of a call already closed
        if piece.arguments:
            self.streamed += piece.arguments
            events.append(ArgumentsDeltaEvent(
                sequence_number=self.next(),
                item_id=item_id("function_call", self.rid, piece.index),
                output_index=len(self.opened) - 1, delta=piece.arguments))
        return events

    def close(self, done: Literal["completed", "incomplete"]) -> list[StreamEvent]:
        """Close the open item, if any: its text (or arguments) done, then `output_item.done`."""
        if not self.is_open:
            return []
        self.is_open = False
        kind, index, text = self.opened[-1], len(self.opened) - 1, self.streamed
        if kind == "function_call":
            call = self.opened.count("function_call") - 1
            return [
                ArgumentsDoneEvent(sequence_number=self.next(),
                                   item_id=item_id(kind, self.rid, call), output_index=index,
                                   arguments=text),
                OutputItemEvent(type="response.output_item.done", sequence_number=self.next(),
                                output_index=index,
                                item=call_item(self.rid, call, self.open_call, text, done)),
            ]
        ident = item_id(kind, self.rid)
        text_done: Callable[..., StreamEvent] = (ReasoningDoneEvent if kind == "reasoning"
                                                 else TextDoneEvent)
        return [
            text_done(sequence_number=self.next(), item_id=ident, output_index=index,
                      content_index=0, text=text),
            ContentPartEvent(type="response.content_part.done", sequence_number=self.next(),
                             item_id=ident, output_index=index, content_index=0,
                             part=_part(kind, text)),
            OutputItemEvent(type="response.output_item.done", sequence_number=self.next(),
                            output_index=index, item=output_item(kind, self.rid, text, done)),
        ]

    def _open(self, kind: Kind, item: OutputItem) -> list[StreamEvent]:
        self.opened.append(kind)
        self.is_open, self.streamed = True, ""
        return [OutputItemEvent(type="response.output_item.added", sequence_number=self.next(),
                                output_index=len(self.opened) - 1, item=item)]


def _part(kind: Kind, text: str) -> OutputText | ReasoningText:
    return ReasoningText(text=text) if kind == "reasoning" else OutputText(text=text)
