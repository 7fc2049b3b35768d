"""What every generating route shares: admission, deadline, timing, metrics and the log record.

`GenerationRun` wraps one engine stream. The route's handler iterates it (to stream chunks or to
build one response); the run accumulates each choice, observes TTFT / inter-token / e2e latency,
and on exit — finished, failed or cancelled by a disconnecting client — releases the admission slot
and hands one `TurnRecord` to the log writer (with `ack` durability, waiting until it is on disk,
unless the client has gone). Nothing here touches the database.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from clinicloop.backends.base import (
    Delta,
    Engine,
    EngineError,
    Event,
    Lease,
    TokenLogprob,
    ToolCallDelta,
    Usage,
)
from clinicloop.serving.admission import Admission
from clinicloop.serving.auth import Caller
from clinicloop.serving.errors import OpenAIError
from clinicloop.serving.metrics import Metrics
from clinicloop.serving.protocol import UsageInfo, new_id, now
from clinicloop.store.records import Endpoint, LoggedChoice, TurnRecord

if TYPE_CHECKING:
    from clinicloop.serving.maintenance import Maintenance

CONVERSATION_HEADER = "x-conversation-id"
# What each API calls its responses' ids.
_ID_PREFIX: dict[Endpoint, str] = {
    "chat.completions": "chatcmpl", "completions": "cmpl", "responses": "resp"}


def conversation_id(messages: list[dict[str, Any]], caller: Caller, header: str | None) -> str:
    """A hash of the caller's key id and what names the conversation: the client's id if it sent
    one, else the conversation's opening (system prompt and first user message), which every
    later turn repeats unchanged. Hashed with the key id, a client's id is stored without the
    text it carries and cannot reach into another key's conversation."""
    if header:
        named: Any = {"header": header}
    else:
        named = []
        for message in messages:
            named.append(message)
            if message["role"] == "user":
                break
    digest = hashlib.sha256(json.dumps([caller.key_id, named], sort_keys=True).encode())
    return "conv-" + digest.hexdigest()[:24]


@dataclass
class CallState:
    id: str
    name: str
    arguments: str = ""

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ChoiceState:
    content: str = ""
    reasoning: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    tool_calls: list[CallState] = field(default_factory=list)

    def add_calls(self, pieces: list[ToolCallDelta]) -> None:
        """Join streamed call pieces: a call's first piece (id and name) opens it, later ones
        extend its arguments."""
        for piece in pieces:
            if piece.index == len(self.tool_calls):
                self.tool_calls.append(CallState(piece.id or "", piece.name or ""))
            elif not 0 <= piece.index < len(self.tool_calls):
                continue  # engines number calls in order; a stray piece has nothing to join
            self.tool_calls[piece.index].arguments += piece.arguments


@dataclass
class Services:
    """What a handler needs from the app; built once by the app factory."""

    engine: Engine
    admission: Admission
    metrics: Metrics
    writer: Any  # clinicloop.store.writer.LogWriter; typed loosely to keep the store optional
    request_timeout_s: float
    maintenance: Maintenance | None = None


class GenerationRun:
    def __init__(self, services: Services, *, endpoint: Endpoint,
                 messages: list[dict[str, Any]], params: dict[str, Any], caller: Caller,
                 conversation: str, n: int, model: str | None = None) -> None:
        """`model`: the request's, which `open` resolves (`Engine.resolve`)."""
        self.s = services
        # The response id the client sees is also the log record's id, so the two can be joined.
        self.request_id = new_id(_ID_PREFIX[endpoint])
        self.created = now()
        self.endpoint = endpoint
        self.messages = messages
        self.params = params
        self.caller = caller
        self.conversation = conversation
        self.choices = [ChoiceState() for _ in range(n)]
        self.usage = Usage(0, 0)
        #: The served name: what metrics are labelled with and the log record says.
        self.model = services.engine.model_name
        #: What the response's `model` says: the served name, or the card of a pinned version.
        self.response_model = self.model
        self.requested_model = model
        self.version = services.engine.model_version
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self._last_at: float | None = None
        self._lease: Lease | None = None
        self._events: AsyncIterator[Event] | None = None
        self._first: Event | None = None
        self.tokens_seen = 0
        self._admitted = False

    async def open(self, start: Callable[[Engine], AsyncIterator[Event]]) -> None:
        """Resolve the request's `model` (an unknown one is a 404 before admission), admit the
        request, choose the model version that serves it (`Engine.lease`: the pinned one, or
        routed), start `start(engine)` on that version's engine and pull its first event, so
        that a bad request or a full server is an HTTP error rather than a broken stream.
        Choosing on admission means a request queued across a swap starts on the new version
        (unless its conversation began on the old one). During a maintenance window the
        request first gets the window's treatment: refused, queued until the window closes, or
        served by the fallback (whatever it pinned; logged as the fallback's version)."""
        try:
            pinned = await self.s.engine.resolve(self.requested_model)
        except EngineError as exc:
            raise OpenAIError.from_engine(exc) from None
        if self.s.maintenance is not None:
            fallback = await self.s.maintenance.admit(self.started + self.s.request_timeout_s)
            if fallback is not None:
                self.s = replace(self.s, engine=fallback.engine, admission=fallback.admission)
                pinned = None
        if pinned is not None:
            self.response_model = f"{self.model}@{pinned}"
        queued_s = await self.s.admission.acquire()
        self._admitted = True
        self.s.metrics.queue_time.labels(self.model).observe(queued_s)
        try:
            self._lease = await self.s.engine.lease(self.conversation, pinned)
            self.version = self._lease.version
            self._events = start(self._lease.engine)
            async with asyncio.timeout(self.s.request_timeout_s):
                self._first = await anext(self._events)
        except EngineError as exc:
            await self.finish("error", str(exc))
            raise OpenAIError.from_engine(exc) from None
        except TimeoutError:
            await self.finish("error", "deadline")
            raise OpenAIError(503, "request deadline exceeded", code="timeout") from None
        except BaseException as exc:
            await self.finish("cancelled" if isinstance(exc, asyncio.CancelledError) else "error",
                              type(exc).__name__)
            raise

    async def deltas(self) -> AsyncIterator[Delta]:
        """The engine's deltas, accumulated and timed; ends the run however iteration stops."""
        assert self._events is not None
        status: Literal["ok", "error", "cancelled"] = "cancelled"
        error: str | None = None
        try:
            deadline = self.started + self.s.request_timeout_s
            async with asyncio.timeout_at(asyncio.get_running_loop().time()
                                          + deadline - time.perf_counter()):
                if self._first is not None:
                    event, self._first = self._first, None
                    if isinstance(event, Delta):
                        yield self._observe(event)
                    else:
                        self.usage = event
                async for event in self._events:
                    if isinstance(event, Delta):
                        yield self._observe(event)
                    else:
                        self.usage = event
            status = "error" if any(c.finish_reason == "error" for c in self.choices) else "ok"
        except TimeoutError:
            status, error = "error", "deadline"
            raise OpenAIError(503, "request deadline exceeded", code="timeout") from None
        except Exception as exc:
            status, error = "error", type(exc).__name__
            raise
        finally:
            await self.finish(status, error)

    def usage_info(self) -> UsageInfo:
        return UsageInfo(prompt_tokens=self.usage.prompt_tokens,
                         completion_tokens=self.usage.completion_tokens,
                         total_tokens=self.usage.total_tokens)

    def _observe(self, delta: Delta) -> Delta:
        now = time.perf_counter()
        if delta.content or delta.reasoning or delta.tool_calls:
            if self.first_token_at is None:
                self.first_token_at = now
                self.s.metrics.ttft.labels(self.model).observe(now - self.started)
            elif self._last_at is not None:
                self.s.metrics.itl.labels(self.model).observe(now - self._last_at)
            self._last_at = now
        self.tokens_seen += delta.tokens
        choice = self.choices[delta.index]
        choice.content += delta.content
        choice.reasoning += delta.reasoning
        choice.logprobs.extend(delta.logprobs)
        choice.add_calls(delta.tool_calls)
        if delta.finish_reason is not None:
            choice.finish_reason = delta.finish_reason
        return delta

    async def finish(self, status: Literal["ok", "error", "cancelled"], error: str | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self.s.admission.release()
        try:
            if self._events is not None:
                await self._events.aclose()  # type: ignore[attr-defined]
        finally:
            if self._lease is not None:
                self._lease.release()
        if not self.usage.completion_tokens:  # cut short before the engine's Usage
            self.usage.completion_tokens = self.tokens_seen
        e2e = time.perf_counter() - self.started
        m = self.s.metrics
        m.e2e.labels(self.model).observe(e2e)
        m.prompt_tokens.labels(self.model).inc(self.usage.prompt_tokens)
        m.generation_tokens.labels(self.model).inc(self.usage.completion_tokens)
        if status == "ok":
            for choice in self.choices:
                m.request_success.labels(self.model, choice.finish_reason or "stop").inc()
        else:
            m.request_errors.labels(self.model, status).inc()
        record = TurnRecord(
            id=self.request_id, conversation_id=self.conversation, endpoint=self.endpoint,
            model=self.model, model_version=self.version, api_key_id=self.caller.key_id,
            messages=self.messages,
            choices=[
                LoggedChoice(index=i, content=c.content, reasoning_content=c.reasoning or None,
                             finish_reason=c.finish_reason,
                             tool_calls=[call.as_openai() for call in c.tool_calls] or None)
                for i, c in enumerate(self.choices)
            ],
            params=self.params, prompt_tokens=self.usage.prompt_tokens,
            completion_tokens=self.usage.completion_tokens,
            ttft_s=None if self.first_token_at is None else self.first_token_at - self.started,
            e2e_s=e2e, status=status, error=error, origin=self.caller.origin,
        )
        if status == "cancelled":  # the client is gone: nothing may wait for the log
            self.s.writer.submit(record)
        else:
            # With `ack` durability the record is on disk before the caller sends the response's
            # last byte (`[DONE]`, or the JSON body), or `store.ack_timeout_s` has passed.
            await self.s.writer.log(record)
