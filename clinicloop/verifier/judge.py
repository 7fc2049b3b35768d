"""The rubric judge: one verdict per rubric item, `{"explanation", "criteria_met"}` (paper §2).

`criteria_met` keeps HealthBench's meaning for both prompt styles: true = the response does what the
item describes (for a negative item: shows the undesirable behaviour, so it loses points). The
`healthbench` style asks that one question for every item; `split` asks whether the response is
*acceptable* against a positive item and *unacceptable* against a negative one, which the paper
found keeps judges from reading a negative item as "is the answer good".

Prompts put the conversation first and the item last (see `judge_templates`), and `grade_all` sends
one conversation's items back to back, so an engine that reuses the KV cache of a common prefix
(llama.cpp in-process, which keeps a cache slot per conversation; an instance the router pins to
the conversation) computes the conversation once.

A verdict never raises: with `constrained=True` the engine enforces `VERDICT_SCHEMA` (a grammar on
llama.cpp); otherwise the reply is parsed leniently. A reply that still does not parse, or an
endpoint error that another try can mend (no answer, 429, 5xx), is retried up to `max_retries` more
times with a fresh sampling seed; then the verdict is `criteria_met=None` with
`source="unparseable"`, or `source="error"` and the server's message in `error` when the last try
failed. A request the server refuses (another 4xx, e.g. a prompt longer than the judge's context)
is never retried: it would fail the same way. `kind:rule` items are checked without a model. A key
the server refuses (`KeyRefused`) is no verdict's fault: it stops the batch.

Tool calls are part of what is graded: the graded reply's own calls (`tool_calls`, OpenAI's shape)
and those of earlier assistant turns are rendered as `[tool call] name({arguments})` lines after
the turn's text, and tool results as `tool (name): result`, so the judge can grade an item about a
call, and a `tool_call` rule checks the reply's calls.

This module owns persisting verdicts: the judge hands every verdict it makes (model, rule,
unparseable, failed; not one it read from the cache) to its `VerdictCache` the moment it has it,
and the cache decides what to keep. `MemoryVerdictCache` keeps model verdicts; `StoreVerdictCache`
writes every verdict as a row of the store's `verdicts` table, so a scoring run killed midway
keeps every verdict made before the kill. Only the judge sees verdicts one at a time, which is
why it, and not its callers, records them.

`labels` (verdict key -> a reviewer's label, `calibration.label_verdicts`) makes a reviewer's word
the verdict where one exists (`source="reviewer"`, never handed to the cache): for the RL refresh's
rewards and gate. Measuring the judge (`verify score`, calibration) never passes labels.
`item_key` names a rubric item for reviews (labels, rubric edits).
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ValidationError

from clinicloop.store.db import Store, StoredVerdict
from clinicloop.store.records import content_text
from clinicloop.verifier import judge_templates
from clinicloop.verifier.client import ChatClient, ChatError
from clinicloop.verifier.rubrics import RubricItem, ToolCalls, call_arguments, check_rule

log = logging.getLogger(__name__)

Template = Literal["healthbench", "split"]

#: Bounds the explanation so a verdict costs a few dozen tokens, not a paragraph.
EXPLANATION_MAX_CHARS = 200
VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "explanation": {"type": "string", "maxLength": EXPLANATION_MAX_CHARS},
        "criteria_met": {"type": "boolean"},
    },
    "required": ["explanation", "criteria_met"],
    "additionalProperties": False,
}
# The first attempt is greedy (reproducible, cacheable); at temperature 0 a new seed would give the
# same reply, so retries sample.
RETRY_TEMPERATURE = 0.7


class Verdict(BaseModel):
    criteria_met: bool | None  # None = unparseable or failed after retries
    explanation: str = ""
    source: Literal["llm", "rule", "cache", "unparseable", "error", "reviewer"]
    attempts: int = 0  # model calls made for this verdict (0 for rule and cache verdicts)
    error: str | None = None  # source "error": why the judge call failed, as the server said


class VerdictCache(Protocol):
    def get(self, key: str) -> Verdict | None:
        """A verdict worth reusing (an answered one), else None."""
        ...

    def put(self, key: str, verdict: Verdict) -> None:
        """Called with every verdict the judge makes, as it makes it."""
        ...


class MemoryVerdictCache:
    """Model verdicts in memory; an unanswered one is asked again next time."""

    def __init__(self) -> None:
        self._verdicts: dict[str, Verdict] = {}

    def get(self, key: str) -> Verdict | None:
        return self._verdicts.get(key)

    def put(self, key: str, verdict: Verdict) -> None:
        if verdict.source == "llm":
            self._verdicts[key] = verdict

    def __len__(self) -> int:
        return len(self._verdicts)


class StoreVerdictCache:
    """A `VerdictCache` on the store's `verdicts` table: every verdict is a row.

    A verdict row names its turn and item, which a cache key alone does not carry, so the caller
    registers each turn's keys (`expect`) before grading it and drops them after (`forget`).
    Turns with identical text, graded at once, share keys: the first to expect a key owns its
    row, and the key is kept until the last of them forgets it. Reads and writes block the event
    loop for a few milliseconds, against a judge call's hundreds.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._expected: dict[str, StoredVerdict] = {}
        self._holders: Counter[str] = Counter()

    def expect(self, turn_id: str, keys: list[str], items: list[RubricItem], judge_model: str,
               template: Template) -> None:
        for key, item in zip(keys, items, strict=True):
            self._holders[key] += 1
            self._expected.setdefault(key, StoredVerdict(
                turn_id=turn_id, verdict_key=key, judge_model=judge_model, template=template,
                item=item.model_dump(mode="json", exclude_none=True), criteria_met=None,
                source="unparseable"))

    def forget(self, keys: list[str]) -> None:
        for key in keys:
            self._holders[key] -= 1
            if self._holders[key] <= 0:
                del self._holders[key]
                self._expected.pop(key, None)

    def get(self, key: str) -> Verdict | None:
        stored = self.store.get_verdict(key)
        # An unparseable verdict is worth another try.
        if stored is None or stored.criteria_met is None:
            return None
        return Verdict(criteria_met=stored.criteria_met, explanation=stored.explanation,
                       source="cache")

    def put(self, key: str, verdict: Verdict) -> None:
        self.store.put_verdict(self._expected[key].model_copy(update={
            "criteria_met": verdict.criteria_met,
            "explanation": verdict.error or verdict.explanation, "source": verdict.source}))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def verdict_key(conversation: list[dict[str, Any]], response: str, item: RubricItem, model: str,
                template: Template, tool_calls: ToolCalls | None = None) -> str:
    """Cache key of one verdict: the graded exchange (the reply's tool calls included), what the
    judge sees of the item (its points and criterion; tags do not change a verdict), the judge
    model and the prompt style."""
    # A reply without calls keeps the key it had before calls were graded: stored verdicts stay.
    graded = [conversation, response, tool_calls] if tool_calls else [conversation, response]
    exchange = _digest(json.dumps(graded, sort_keys=True, ensure_ascii=False))
    return _digest("\x1f".join([exchange, item_key(item), model, template]))


def _call_line(call: dict[str, Any]) -> str:
    arguments = call_arguments(call)
    shown = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return f"[tool call] {call.get('function', {}).get('name')}({shown})"


def render_conversation(conversation: list[dict[str, Any]], response: str,
                        tool_calls: ToolCalls | None = None) -> str:
    """HealthBench's rendering: `role: content` blocks, the graded response (and its tool calls)
    last. An assistant turn's calls follow its text, one `[tool call] name({arguments})` line
    each; a tool result reads `tool (name): result`, named after the call it answers."""
    turns = [*conversation, {"role": "assistant", "content": response, "tool_calls": tool_calls}]
    called = {call["id"]: call.get("function", {}).get("name")
              for m in turns for call in m.get("tool_calls") or [] if call.get("id")}
    blocks = []
    for m in turns:
        role = m["role"]
        if role == "tool" and called.get(m.get("tool_call_id")):
            role = f"tool ({called[m['tool_call_id']]})"
        text = content_text(m.get("content"))
        lines = [text] if text else []
        lines += [_call_line(call) for call in m.get("tool_calls") or []]
        blocks.append(f"{role}: " + "\n".join(lines))
    return "\n\n".join(blocks)


def _item_line(item: RubricItem) -> str:
    return f"[{item.points}] {item.criterion}"


def item_key(item: RubricItem) -> str:
    """A rubric item's identity for reviews (labels, rubric edits): the digest of what the judge
    sees of it, its points and criterion, as in `verdict_key`."""
    return _digest(_item_line(item))


def stored_item_key(raw: Mapping[str, Any]) -> str:
    """`item_key` of an item as stored (a dict); "" for one that is not a valid item, which
    then matches no label or edit."""
    try:
        return item_key(RubricItem.model_validate(raw))
    except ValidationError:
        return ""


def prompt_prefix(conversation: list[dict[str, Any]], response: str, template: Template,
                  tool_calls: ToolCalls | None = None) -> str:
    """The part of the grader prompt shared by every item of this conversation."""
    instructions = judge_templates.HEALTHBENCH if template == "healthbench" \
        else judge_templates.SPLIT
    if tool_calls or any(m.get("tool_calls") or m.get("role") == "tool"
                         for m in conversation):
        instructions += judge_templates.TOOL_CALLS
    rendered = render_conversation(conversation, response, tool_calls)
    return f"{instructions}\n# Conversation\n{rendered}\n\n"


def prompt_suffix(item: RubricItem, template: Template) -> str:
    """The per-item tail: (split: the acceptable/unacceptable question, by sign) then the item."""
    header = judge_templates.ITEM_HEADER
    if template == "split":
        ask = judge_templates.ASK_ACCEPTABLE if item.points > 0 \
            else judge_templates.ASK_UNACCEPTABLE
        header = f"{ask}\n\n{header}"
    return f"{header}\n{_item_line(item)}"


def render_prompt(conversation: list[dict[str, Any]], response: str, item: RubricItem,
                  template: Template, tool_calls: ToolCalls | None = None) -> str:
    return prompt_prefix(conversation, response, template, tool_calls) \
        + prompt_suffix(item, template)


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)
_PY_LITERALS = {"true": "True", "false": "False", "null": "None"}
_JSON_WORD = re.compile(r"\b(true|false|null)\b")
_LENIENT_JSON = json.JSONDecoder(strict=False)


def _load_object(body: str) -> Any:
    """The first `{...}` in `body`: JSON (trailing text ignored; raw newlines inside strings
    allowed, which small models emit even under a grammar), else a Python-style dict (single
    quotes, True/False) through `ast.literal_eval`, which evaluates literals only."""
    start = body.find("{")
    if start < 0:
        return None
    try:
        return _LENIENT_JSON.raw_decode(body, start)[0]
    except json.JSONDecodeError:
        pass
    end = body.rfind("}")
    if end < start:
        return None
    candidate = _JSON_WORD.sub(lambda m: _PY_LITERALS[m.group(1)], body[start:end + 1])
    try:
        return ast.literal_eval(candidate)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def parse_verdict(text: str) -> tuple[bool, str] | None:
    """`(criteria_met, explanation)` from a judge reply, or None if it has no usable verdict."""
    fenced = _FENCE.search(text)
    obj = _load_object(fenced.group(1) if fenced else text)
    if not isinstance(obj, dict):
        return None
    met = obj.get("criteria_met")
    if isinstance(met, str):
        met = {"true": True, "false": False}.get(met.strip().lower())
    if not isinstance(met, bool):
        return None
    return met, str(obj.get("explanation", ""))


class Judge:
    def __init__(self, client: ChatClient, *, template: Template = "split",
                 max_retries: int = 2, concurrency: int = 8, cache: VerdictCache | None = None,
                 constrained: bool = True, max_tokens: int = 256,
                 labels: Mapping[str, bool] | None = None) -> None:
        self.client = client
        self.labels = labels or {}  # verdict_key -> a reviewer's label (module docstring)
        self.template: Template = template
        self.max_retries = max_retries
        self.cache = cache
        self.constrained = constrained
        self.max_tokens = max_tokens
        # Slots are held per conversation, not per call, so one conversation's items run back to
        # back and its prefix stays warm.
        self._slots = asyncio.Semaphore(concurrency)

    async def grade(self, conversation: list[dict[str, Any]], response: str,
                    item: RubricItem, *, tool_calls: ToolCalls | None = None) -> Verdict:
        """The verdict on `item` for the reply `response` (with its `tool_calls`, if it made
        any) to `conversation`."""
        async with self._slots:
            return await self._grade(conversation, response, item, tool_calls)

    async def grade_all(self, conversation: list[dict[str, Any]], response: str,
                        items: list[RubricItem], *,
                        tool_calls: ToolCalls | None = None) -> list[Verdict]:
        """One verdict per item, in order, sent one after another."""
        async with self._slots:
            return [await self._grade(conversation, response, item, tool_calls)
                    for item in items]

    async def _grade(self, conversation: list[dict[str, Any]], response: str,
                     item: RubricItem, tool_calls: ToolCalls | None) -> Verdict:
        key = verdict_key(conversation, response, item, self.client.model, self.template,
                          tool_calls)
        if key in self.labels:
            # The reviewer's word, not the judge's: kept out of the cache of judge verdicts.
            return Verdict(criteria_met=self.labels[key], source="reviewer",
                           explanation="reviewer label")
        if item.is_rule:
            assert item.rule is not None  # is_rule checks it
            met = check_rule(item.rule, response, tool_calls)
            verdict = Verdict(criteria_met=met, source="rule",
                              explanation=f"{item.rule.type} check {'met' if met else 'not met'}")
        elif self.cache is not None and (hit := self.cache.get(key)) is not None:
            return hit.model_copy(update={"source": "cache", "attempts": 0})
        else:
            verdict = await self._ask(render_prompt(conversation, response, item, self.template,
                                                    tool_calls))
        if self.cache is not None:
            self.cache.put(key, verdict)
        return verdict

    async def _ask(self, prompt: str) -> Verdict:
        messages = [{"role": "user", "content": prompt}]
        attempts = self.max_retries + 1
        error: ChatError | None = None
        for attempt in range(attempts):
            try:
                reply = await self.client.chat(
                    messages, max_tokens=self.max_tokens, seed=attempt,
                    temperature=0.0 if attempt == 0 else RETRY_TEMPERATURE,
                    json_schema=VERDICT_SCHEMA if self.constrained else None,
                )
            except ChatError as exc:
                # The class and status only: the message may echo the graded conversation.
                log.warning("judge call failed (%s %s), attempt %d of %d", type(exc).__name__,
                            exc.status, attempt + 1, attempts)
                error = exc
                if not exc.retryable:
                    break
                continue
            error = None
            parsed = parse_verdict(reply)
            if parsed is not None:
                return Verdict(criteria_met=parsed[0], explanation=parsed[1], source="llm",
                               attempts=attempt + 1)
            log.info("unparseable verdict, attempt %d of %d", attempt + 1, attempts)
        made = attempt + 1  # the loop's last attempt: all of them, or the one not to retry
        if error is not None:
            return Verdict(criteria_met=None, source="error", error=str(error), attempts=made)
        return Verdict(criteria_met=None, source="unparseable", attempts=made)
