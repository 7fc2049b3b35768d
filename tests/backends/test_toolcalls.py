"""Tool calls cut out of generated text (`toolcalls.py`): however the output is split into pieces,
the same reasoning, content and calls come out; streamed call pieces join to the arguments the
model wrote; a call's id and name come first and once; `parallel_tool_calls` false keeps one
call; a block inside the reasoning is one call, in neither text; an upstream's calls pass through,
numbered before ours; token counts and logprobs are never lost."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clinicloop.backends.base import Delta, TokenLogprob, ToolCallDelta, Usage
from clinicloop.backends.textstream import ReasoningSplitter
from clinicloop.backends.toolcalls import ToolCallStream, with_tool_calls


@dataclass
class Output:
    """A choice as a client joins it (the gateway's `ChoiceState`, ids and names checked)."""

    reasoning: str = ""
    content: str = ""
    calls: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    tokens: int = 0
    logprobs: list[str] = field(default_factory=list)

    def add(self, pieces: list[ToolCallDelta]) -> None:
        for piece in pieces:
            if piece.index == len(self.calls):  # a call's first piece: its id and name
                assert piece.id and piece.id.startswith("chatcmpl-tool-") and piece.name
                self.calls.append({"id": piece.id, "name": piece.name, "arguments": ""})
            else:
                assert piece.index < len(self.calls) and piece.id is None and piece.name is None
            self.calls[piece.index]["arguments"] += piece.arguments

    def without_ids(self) -> tuple:
        return (self.reasoning, self.content, [(c["name"], c["arguments"]) for c in self.calls],
                self.finish_reason)


def _logprob(text: str) -> TokenLogprob:
    return TokenLogprob(text, -1.0, list(text.encode()))


def engine_deltas(pieces: list[str], in_reasoning: bool = False) -> list[Delta]:
    """What the llama.cpp engine yields for output arriving in `pieces`: the reasoning split,
    one token (and its logprob) per piece, the finish on the last Delta."""
    splitter = ReasoningSplitter(in_reasoning)
    deltas = []
    for piece in pieces:
        reasoning, content = splitter.push(piece)
        deltas.append(Delta(0, content, reasoning, logprobs=[_logprob(piece)], tokens=1))
    reasoning, content = splitter.flush()
    deltas.append(Delta(0, content, reasoning, finish_reason="stop"))
    return deltas


def run(deltas: list[Delta], n: int = 1, parallel: bool = True) -> list[Output]:
    async def events():
        for delta in deltas:
            yield delta
        yield Usage(3, len(deltas))

    async def main():
        outs = [Output() for _ in range(n)]
        usage = None
        async for event in with_tool_calls(events(), n, parallel):
            assert usage is None  # the Usage comes last
            if isinstance(event, Usage):
                usage = event
                continue
            out = outs[event.index]
            assert out.finish_reason is None  # the finish reason comes last, once
            out.reasoning += event.reasoning
            out.content += event.content
            out.add(event.tool_calls)
            out.finish_reason = event.finish_reason
            out.tokens += event.tokens
            out.logprobs += [lp.token for lp in event.logprobs]
        assert usage is not None
        return outs

    return asyncio.run(main())


def parse(text: str, cuts: list[int] | None = None, parallel: bool = True,
          in_reasoning: bool = False) -> Output:
    bounds = sorted({0, len(text), *(cuts or [])})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    return run(engine_deltas(pieces, in_reasoning), parallel=parallel)[0]


def block(name: str, arguments: object, sep: str = ", ") -> str:
    return (f'<tool_call>\n{{"name": {json.dumps(name)}{sep}"arguments": '
            f"{json.dumps(arguments, ensure_ascii=False)}}}\n</tool_call>")


# -- generated outputs -----------------------------------------------------------------------

_names = st.sampled_from(["lookup_interactions", "book_appointment", "café_ñ", 'q"uote'])
_strings = st.one_of(st.text(max_size=12), st.sampled_from(
    ['say "hi"', "back\\slash", '\\"', "}", "{", "]}", "</tool_call", "<tool_call>", "</think>",
     "漢字 🙂", "\n"]))
_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), _strings),
    lambda kids: st.one_of(st.lists(kids, max_size=3),
                           st.dictionaries(_strings, kids, max_size=3)),
    max_leaves=8)
_arguments = st.dictionaries(_strings, _json, max_size=4)
_plain = st.one_of(st.text(max_size=16), st.sampled_from(
    ["Let me check. ", "\n\n", "a < b", "<tool", "_call>", "<tool_call", "{\"name\"", " } ",
     "</tool_call>", "\\\"", "🙂 é"]))


@st.composite
def _block(draw) -> tuple[str, tuple[str, object] | None]:
    """A block's text and the call it is (None: malformed, so text)."""
    name, arguments = draw(_names), draw(_arguments)
    indent = draw(st.sampled_from([None, 1]))
    ascii_only = draw(st.booleans())
    args = json.dumps(arguments, ensure_ascii=ascii_only, indent=indent)
    ws = draw(st.sampled_from(["", " ", "\n"]))
    kind = draw(st.sampled_from(["name_first", "arguments_first", "bad_json", "bad_name",
                                 "string_arguments"]))
    if kind == "name_first":
        body, call = f'{{"name": {json.dumps(name)}, "arguments": {args}}}', (name, arguments)
    elif kind == "arguments_first":
        body, call = f'{{"arguments":{ws}{args}, "name":{json.dumps(name)}}}', (name, arguments)
    elif kind == "bad_json":
        body, call = f'{{"name" {json.dumps(name)}, "arguments": {args}}}', None
    elif kind == "bad_name":
        body, call = f'{{"name": 7, "arguments": {args}}}', None
    else:
        body, call = f'{{"name": {json.dumps(name)}, "arguments": {json.dumps(args)}}}', None
    return f"<tool_call>{ws or chr(10)}{body}{ws}</tool_call>", call


@st.composite
def outputs(draw) -> tuple[str, list[tuple[str, object]], list[str], list[str], bool]:
    """An output (optionally a think block first), the calls it holds in order, the texts of its
    reasoning and of its content that are not calls, and whether it is clean: no start tag
    spelled by plain text or across two parts, no end tag inside a block's JSON, no think tag
    inside the reasoning (each makes other calls or other reasoning than the parts say)."""
    calls: list[tuple[str, object]] = []
    texts: tuple[list[str], list[str]] = ([], [])
    parts = []
    clean = True
    thinking = draw(st.booleans())
    for where in [0, 1] if thinking else [1]:
        segments = []
        for _ in range(draw(st.integers(0, 5))):
            if draw(st.booleans()):
                text, call = draw(_plain), None
                clean = clean and "<tool_call>" not in text
            else:
                text, call = draw(_block())
                clean = clean and text.count("</tool_call>") == 1
            if where == 0 and ("<think>" in text or "</think>" in text):
                clean = False
            segments.append(text)
            if call is None:
                texts[where].append(text)
            else:
                calls.append(call)
        joined = "".join(segments)
        clean = clean and joined.count("<tool_call>") == sum(
            t.count("<tool_call>") for t in segments)
        parts.append(f"<think>\n{joined}\n</think>\n\n" if where == 0 else joined)
    text = "".join(parts)
    clean = clean and (thinking or not text.startswith("<think>"))
    return text, calls, *texts, clean


def _squash(text: str) -> str:
    return "".join(text.split())


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=outputs(), data=st.data())
def test_property_any_split_gives_the_same_text_and_calls(case, data):
    text, calls, reasoning_texts, content_texts, clean = case
    whole = parse(text)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=len(text)))
    split = parse(text, cuts)
    assert split.without_ids() == whole.without_ids()
    # Each piece's token count and logprob come out, in order, whatever was held back.
    assert split.tokens == len(split.logprobs) and "".join(split.logprobs) == text
    assert parse(text, list(range(len(text)))).without_ids() == whole.without_ids()
    if not clean:
        return
    assert [(c["name"], json.loads(c["arguments"])) for c in whole.calls] == calls
    assert _squash(whole.reasoning) == _squash("".join(reasoning_texts))
    assert _squash(whole.content) == _squash("".join(content_texts))
    assert whole.finish_reason == ("tool_calls" if calls else "stop")


def test_streamed_arguments_are_the_model_text_released_as_written():
    args = '{"drug_a": "warfarin", "note": "a \\"quoted\\" } brace", "doses": [1, {"mg": 5}]}'
    text = (f'Let me look that up.\n<tool_call>\n{{"name": "lookup_interactions", '
            f'"arguments": {args}}}\n</tool_call>')
    stream = ToolCallStream()
    pieces: list[ToolCallDelta] = []
    released = ""
    for end in range(1, len(text) + 1):
        _, content, calls = stream.push("", text[end - 1])
        released += content
        pieces += calls
        # What was released is what the model has written so far, nothing more.
        joined = "".join(p.arguments for p in pieces)
        assert args.startswith(joined)
        assert not pieces or ('"arguments": ' + joined) in text[:end]
    assert released == "Let me look that up."
    assert pieces[0].name == "lookup_interactions" and pieces[0].arguments == ""
    assert "".join(p.arguments for p in pieces) == args
    assert len(pieces) == len(args) + 1  # released as it came, one character at a time
    assert stream.flush() == ("", "", []) and stream.called


def test_whitespace_next_to_blocks_goes_and_text_after_keeps_the_gap_before():
    text = "Checking.\n\n" + block("f", {"a": 1}) + "\n" + block("g", {}) + "\nDone."
    out = parse(text, [3, 15, 40])
    assert out.content == "Checking.\n\nDone."
    assert [(c["name"], c["arguments"]) for c in out.calls] == [("f", '{"a": 1}'), ("g", "{}")]
    assert parse(block("f", {}) + "\n\n").content == ""


def test_malformed_and_unclosed_blocks():
    bad = '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>'  # a brace short
    out = parse("A " + bad)
    assert out.calls == [{"id": out.calls[0]["id"], "name": "f", "arguments": '{"a": 1}'}]
    # Not yet released (name after arguments) and not JSON: text, as vLLM leaves it.
    bad = '<tool_call>\n{"arguments": {"a": 1}, "name": "f"\n</tool_call>'
    out = parse("A " + bad)
    assert (out.content, out.calls, out.finish_reason) == ("A " + bad, [], "stop")
    # Unclosed at the end: the call stands once released, else it is text.
    out = parse('<tool_call>\n{"name": "f", "arguments": {"a": [1, 2')
    assert [(c["name"], c["arguments"]) for c in out.calls] == [("f", '{"a": [1, 2')]
    assert out.finish_reason == "tool_calls"
    out = parse('Hi <tool_call>\n{"arguments": {"a": 1}')
    assert (out.content, out.calls) == ('Hi <tool_call>\n{"arguments": {"a": 1}', [])
    out = parse("Hi <tool_ca")
    assert out.content == "Hi <tool_ca"
    # Arguments nested deeper than json reads: a call (released as written), never an exception.
    nest = "[" * 5000 + "]" * 5000
    out = parse('<tool_call>\n{"name": "f", "arguments": {"a": ' + nest + "}}\n</tool_call>")
    assert [c["name"] for c in out.calls] == ["f"]
    out = parse('<tool_call>\n{"arguments": ' + nest + ', "name": "f"}\n</tool_call>')
    assert out.calls == [] and out.content.startswith("<tool_call>")


def test_parallel_false_keeps_the_first_call_and_drops_what_follows():
    text = "Sure. " + block("f", {"a": 1}) + " then " + block("g", {"b": 2}) + " bye"
    out = parse(text, list(range(0, len(text), 2)), parallel=False)
    assert [(c["name"], c["arguments"]) for c in out.calls] == [("f", '{"a": 1}')]
    assert out.content == "Sure." and out.finish_reason == "tool_calls"
    out = parse(text, parallel=True)
    assert [c["name"] for c in out.calls] == ["f", "g"] and out.content == "Sure. then bye"


def test_a_block_inside_the_reasoning_is_one_call_in_neither_text():
    inside = block("lookup_interactions", {"drug_a": "warfarin", "drug_b": "aspirin"})
    text = f"I should check.\n{inside}\nThe lookup will tell.\n</think>\n\nI am checking."
    for cuts in ([], list(range(len(text)))):
        out = parse(text, cuts, in_reasoning=True)
        assert out.reasoning == "I should check.\nThe lookup will tell."
        assert out.content == "I am checking."
        assert [(c["name"], json.loads(c["arguments"])) for c in out.calls] == [
            ("lookup_interactions", {"drug_a": "warfarin", "drug_b": "aspirin"})]
        assert out.finish_reason == "tool_calls"
    # Left open when the reasoning ends: released, it stands; else it stays reasoning text.
    out = parse('<tool_call>{"name": "f", "arguments": {"a": 1}</think>Ok', in_reasoning=True)
    assert [(c["name"], c["arguments"]) for c in out.calls] == [("f", '{"a": 1}')]
    assert out.content == "Ok"
    out = parse("<tool_call>\n{</think>Ok", in_reasoning=True)
    assert (out.reasoning, out.content, out.calls) == ("<tool_call>\n{", "Ok", [])


def test_upstream_calls_pass_through_numbered_before_ours():
    deltas = [
        Delta(0, tool_calls=[ToolCallDelta(0, "chatcmpl-tool-up", "book_appointment")], tokens=2),
        Delta(0, tool_calls=[ToolCallDelta(0, arguments='{"day": "Mon"}')], tokens=3),
        Delta(0, reasoning=block("lookup_interactions", {"drug_a": "x"}), tokens=4),
        Delta(0, content="Done.", finish_reason="stop", tokens=1),
    ]
    out = run(deltas)[0]
    assert [(c["id"], c["name"], c["arguments"]) for c in out.calls] == [
        ("chatcmpl-tool-up", "book_appointment", '{"day": "Mon"}'),
        (out.calls[1]["id"], "lookup_interactions", '{"drug_a": "x"}')]
    assert (out.content, out.finish_reason, out.tokens) == ("Done.", "tool_calls", 10)
    # An upstream's own finish reason is kept; "length" stays "length" even after a call.
    upstream = ToolCallDelta(0, "chatcmpl-tool-c", "f", "{}")
    out = run([Delta(0, tool_calls=[upstream], finish_reason="tool_calls")])[0]
    assert out.finish_reason == "tool_calls"
    out = run([Delta(0, content=block("f", {}) + "abc", finish_reason="length")])[0]
    assert (out.finish_reason, out.content, len(out.calls)) == ("length", "abc", 1)


def test_choices_are_parsed_apart_and_logprobs_go_out_with_their_text():
    one, two = block("f", {"a": 1}), block("g", {"b": 2})
    deltas = [
        Delta(0, content=one[:5], logprobs=[_logprob("x")], tokens=1),
        Delta(1, content="plain ", logprobs=[_logprob("y")], tokens=1),
        Delta(0, content=one[5:], logprobs=[_logprob("z")], tokens=1),
        Delta(1, content=two, finish_reason="stop", tokens=1),
        Delta(0, content="<tool_c", logprobs=[_logprob("w")], tokens=1),
        Delta(0, content="", finish_reason="stop"),
    ]

    async def events():
        for delta in deltas:
            yield delta
        yield Usage(1, 5)

    async def main():
        return [e async for e in with_tool_calls(events(), 2, True)]

    out = asyncio.run(main())
    # The first piece of the block is held: its token count goes out, its logprob waits.
    assert (out[0].index, out[0].content, out[0].logprobs, out[0].tokens) == (0, "", [], 1)
    assert [lp.token for lp in out[2].logprobs] == ["x", "z"] and out[2].tool_calls
    assert out[4].content == "" and out[4].logprobs == []  # a possible start tag, held
    assert out[5].content == "<tool_c" and [lp.token for lp in out[5].logprobs] == ["w"]
    choices = run(deltas, n=2)
    assert [c.finish_reason for c in choices] == ["tool_calls", "tool_calls"]
    assert choices[1].content == "plain" and choices[1].calls[0]["name"] == "g"
    assert [len(c.calls) for c in choices] == [1, 1] and isinstance(out[-1], Usage)


def test_closing_the_wrapper_closes_the_engine_stream_at_once():
    """A client that hangs up: closing the wrapped stream closes the engine's own stream before
    `aclose` returns (the request's lease is released next), not later by garbage collection."""
    closed = []

    async def engine():
        try:
            while True:
                yield Delta(0, content="text ", tokens=1)
        finally:
            closed.append(True)

    async def main():
        wrapped = with_tool_calls(engine(), 1, True)
        await anext(wrapped)
        await wrapped.aclose()
        return list(closed)

    assert asyncio.run(main()) == [True]
