"""Tool calls cut out of generated text (Qwen2.5 / Hermes `<tool_call>` blocks), incrementally.

Both response modes join the same Deltas, so a call is parsed here once, piece by piece, and the
streamed `tool_calls` deltas join to exactly the non-streamed message. Every decision depends only
on the text seen so far, never on how it was split into pieces.

A block is `<tool_call>\\n{"name": "fn", "arguments": {...}}\\n</tool_call>`. Once its text reaches
`{"name": "fn", "arguments": {` the call is released (id and name), then its arguments as the model
writes them, up to where the arguments object closes; the rest of the block is dropped. A block
written another way (name after the arguments) is parsed whole at `</tool_call>`; one that is not
a JSON object with a string `name` and an object `arguments`, and whose call was not released yet,
stays text, as vLLM leaves it. Whitespace next to a block is dropped, except the whitespace before
it when text follows.

The rule for reasoning: a block anywhere in the output, inside the reasoning or after it, is
exactly one call and its text is in neither `reasoning_content` nor `content`.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from clinicloop.backends.base import Delta, Event, TokenLogprob, ToolCallDelta
from clinicloop.backends.textstream import _partial_suffix

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
#: What a streamable block starts with; the arguments' first character must follow.
_HEADER = re.compile(r'[ \t\n\r]*\{[ \t\n\r]*"name"[ \t\n\r]*:[ \t\n\r]*("(?:[^"\\]|\\.)*")'
                     r'[ \t\n\r]*,[ \t\n\r]*"arguments"[ \t\n\r]*:[ \t\n\r]*')
_DECODER = json.JSONDecoder()


def parse_arguments(arguments: Any) -> Any:
    """A call's arguments as a value: OpenAI's JSON text parsed (as templates and rubric checks
    take them); text that is not JSON, and a value already parsed, as they are."""
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json reads
        return arguments


def new_call_id() -> str:
    return "chatcmpl-tool-" + uuid.uuid4().hex  # vLLM's form


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\n\r":
        pos += 1
    return pos


def _members(text: str) -> dict[str, tuple[object, str]] | None:
    """The members of `text` if it is one JSON object: name -> (value, its raw text); the first
    of duplicate names wins. None for anything else."""
    pos = _skip_ws(text, 0)
    if text[pos:pos + 1] != "{":
        return None
    pos = _skip_ws(text, pos + 1)
    members: dict[str, tuple[object, str]] = {}
    try:
        while text[pos:pos + 1] != "}":
            key, pos = _DECODER.raw_decode(text, pos)
            pos = _skip_ws(text, pos)
            if not isinstance(key, str) or text[pos:pos + 1] != ":":
                return None
            start = _skip_ws(text, pos + 1)
            value, end = _DECODER.raw_decode(text, start)
            members.setdefault(key, (value, text[start:end]))
            pos = _skip_ws(text, end)
            if text[pos:pos + 1] == ",":
                pos = _skip_ws(text, pos + 1)
                if text[pos:pos + 1] == "}":  # a trailing comma
                    return None
            elif text[pos:pos + 1] != "}":
                return None
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json reads
        return None
    return members if _skip_ws(text, pos + 1) == len(text) else None


class _Calls:
    """A choice's calls: one index counter for its reasoning, its content and an upstream's."""

    def __init__(self, parallel: bool) -> None:
        self.parallel = parallel
        self.count = 0
        self.called = False
        self.closed = False
        self._upstream: dict[int, int] = {}

    def open(self) -> int | None:
        """The index of a new call, or None when `parallel_tool_calls` false allows no more."""
        if self.called and not self.parallel:
            return None
        self.called = True
        self.count += 1
        return self.count - 1

    def upstream(self, piece: ToolCallDelta) -> ToolCallDelta:
        """An upstream's call piece, renumbered among this choice's calls."""
        if piece.index not in self._upstream:
            self._upstream[piece.index] = self.count
            self.count += 1
            self.called = True
        return ToolCallDelta(self._upstream[piece.index], piece.id, piece.name, piece.arguments)


@dataclass
class _Block:
    """A `<tool_call>` block being read: its text after the tag, and how far it was released."""

    before: str  # the whitespace before the tag: text again if the block turns out to be text
    body: str = ""
    index: int | None = None  # set once the call was released
    header_failed: bool = False
    scanned: int = 0  # body position the arguments were released up to
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    done: bool = False  # the arguments object closed

    def advance(self, calls: _Calls, visible: str) -> list[ToolCallDelta]:
        """Release what `visible` (the body so far, less a possible partial end tag) allows."""
        out = []
        if self.index is None and not self.header_failed:
            match = _HEADER.match(visible)
            if match is None or match.end() == len(visible):
                return out
            try:
                name = json.loads(match.group(1))
            except ValueError:
                name = None
            if visible[match.end()] != "{" or not isinstance(name, str):
                self.header_failed = True  # read whole at the end tag
                return out
            self.index = calls.open()
            if self.index is None:
                self.done = True
                return out
            self.scanned = match.end()
            out.append(ToolCallDelta(self.index, new_call_id(), name))
        if self.index is None or self.done:
            return out
        start = self.scanned
        for pos in range(start, len(visible)):
            char = visible[pos]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.done = True
                    self.scanned = pos + 1
                    break
        else:
            self.scanned = len(visible)
        if self.scanned > start:
            out.append(ToolCallDelta(self.index, arguments=visible[start:self.scanned]))
        return out


class _Blocks:
    """One text stream (the reasoning, or the content) with its blocks cut out."""

    def __init__(self, calls: _Calls) -> None:
        self.calls = calls
        self.held = ""  # text mode: trailing whitespace and a possible partial start tag
        self.block: _Block | None = None
        self.after_block = False  # a block was cut since the last text released
        self.gap = ""  # the whitespace before that block, released only if text follows

    def push(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        out: list[str] = []
        calls: list[ToolCallDelta] = []
        buf = self.held + text
        self.held = ""
        while buf and not self.calls.closed:
            if self.block is None:
                start = buf.find(TOOL_CALL_OPEN)
                if start < 0:
                    keep = len(buf) - _partial_suffix(buf, TOOL_CALL_OPEN)
                    settled = buf[:keep].rstrip(" \t\n\r")
                    out.append(self._text(settled))
                    self.held = buf[len(settled):]
                    break
                settled = buf[:start].rstrip(" \t\n\r")
                out.append(self._text(settled))
                self.block = _Block(buf[len(settled):start])
                if not self.after_block:
                    self.gap = self.block.before
                buf = buf[start + len(TOOL_CALL_OPEN):]
                continue
            block = self.block
            # Only the new text can complete the end tag: no rescan of a long block per piece.
            start = max(0, len(block.body) - len(TOOL_CALL_CLOSE) + 1)
            block.body += buf
            end = block.body.find(TOOL_CALL_CLOSE, start)
            if end < 0:
                held = _partial_suffix(block.body, TOOL_CALL_CLOSE)
                visible = block.body[:len(block.body) - held]
                calls += block.advance(self.calls, visible)
                break
            buf = block.body[end + len(TOOL_CALL_CLOSE):]
            block.body = block.body[:end]
            text, done = self._end_block(block, closed=True)
            out.append(text)
            calls += done
        return "".join(out), calls

    def flush(self) -> tuple[str, list[ToolCallDelta]]:
        """The end of this stream: an unclosed block's call stands if it was released, else it
        is text; held text is released."""
        out, calls = "", []
        if self.block is not None and not self.calls.closed:
            out, calls = self._end_block(self.block, closed=False)
        held, self.held = self.held, ""
        if not self.calls.closed:
            out += self._text(held)
        self.after_block, self.gap = False, ""
        return out, calls

    def _text(self, text: str) -> str:
        """Text to release; after a block, its leading whitespace goes and the gap comes back."""
        if self.after_block:
            text = text.lstrip(" \t\n\r")
            if not text:
                return ""
            self.after_block = False
            text = self.gap + text
        return text

    def _end_block(self, block: _Block, closed: bool) -> tuple[str, list[ToolCallDelta]]:
        self.block = None
        calls = block.advance(self.calls, block.body)
        if block.index is None and not block.done:
            members = _members(block.body) if closed else None
            name, arguments = (members or {}).get("name"), (members or {}).get("arguments")
            if name is None or arguments is None or not isinstance(name[0], str) \
                    or not isinstance(arguments[0], dict):
                raw = block.before + TOOL_CALL_OPEN + block.body
                return self._text(raw + TOOL_CALL_CLOSE if closed else raw), []
            block.index = self.calls.open()
            if block.index is not None:
                calls = [ToolCallDelta(block.index, new_call_id(), name[0], arguments[1])]
        self.after_block = True
        if not self.calls.parallel and block.index is not None:
            self.calls.closed = True
        return "", calls


class ToolCallStream:
    """One choice's output with its tool calls cut out: `push` each piece of reasoning and
    content as it comes, `flush` at the end of generation.

    `called`: a call was emitted. `closed`: `parallel_tool_calls` is false and one call is
    complete; the choice's later text and calls are dropped.
    """

    def __init__(self, parallel: bool = True) -> None:
        self._calls = _Calls(parallel)
        self._reasoning = _Blocks(self._calls)
        self._content = _Blocks(self._calls)
        self._reasoning_done = False

    @property
    def called(self) -> bool:
        return self._calls.called

    @property
    def closed(self) -> bool:
        return self._calls.closed

    def push(self, reasoning: str, content: str) -> tuple[str, str, list[ToolCallDelta]]:
        """Return (reasoning, content, call pieces) safe to release."""
        r, calls = self._reasoning.push(reasoning)
        if content and not self._reasoning_done:
            # Content comes after all reasoning: a block left open in the reasoning ends there.
            self._reasoning_done = True
            more_r, more = self._reasoning.flush()
            r, calls = r + more_r, calls + more
        c, more = self._content.push(content)
        return r, c, calls + more

    def flush(self) -> tuple[str, str, list[ToolCallDelta]]:
        r, calls = self._reasoning.flush()
        c, more = self._content.flush()
        return r, c, calls + more

    def upstream(self, piece: ToolCallDelta) -> ToolCallDelta:
        """A call piece an upstream parsed itself, numbered among this choice's calls."""
        return self._calls.upstream(piece)


async def with_tool_calls(events: AsyncIterator[Event], n: int,
                          parallel: bool) -> AsyncIterator[Event]:
    """An engine's events (Deltas of choices 0..n-1, then one Usage) with the calls cut out of
    each choice's text. Every Delta's token count goes out at once; its logprobs go out with the
    next Delta of its choice that carries text, a call or the finish."""
    streams = [ToolCallStream(parallel) for _ in range(n)]
    pending: list[list[TokenLogprob]] = [[] for _ in range(n)]
    # Closed with us, at once: a client that hangs up stops the engine's generation before the
    # request's lease (its version) is released.
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        async for event in events:
            if not isinstance(event, Delta):
                yield event
                continue
            stream = streams[event.index]
            upstream = [stream.upstream(piece) for piece in event.tool_calls]
            reasoning, content, calls = stream.push(event.reasoning, event.content)
            finish = event.finish_reason
            if finish is not None:
                r, c, more = stream.flush()
                reasoning, content, calls = reasoning + r, content + c, calls + more
                if finish == "stop" and stream.called:
                    finish = "tool_calls"
            pending[event.index] += event.logprobs
            out = Delta(event.index, content=content, reasoning=reasoning,
                        tool_calls=upstream + calls, finish_reason=finish, tokens=event.tokens)
            if content or reasoning or out.tool_calls or finish is not None:
                out.logprobs, pending[event.index] = pending[event.index], []
            if out.tokens or out.logprobs or finish is not None or content or reasoning \
                    or out.tool_calls:
                yield out
