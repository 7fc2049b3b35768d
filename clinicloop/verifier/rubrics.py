"""Rubric items and HealthBench-format examples, read and written without losing a byte.

A HealthBench JSONL row is `{"prompt": [messages], "rubrics": [{"criterion", "points", "tags"}],
"example_tags", "prompt_id", "ideal_completions_data", "canary", ...}`. A row read and written
back unchanged is byte-identical: each example keeps the line it came from and writes it again
unless a field was changed. A changed row keeps the source's key order (new keys go after it) and
every unknown field, on the row and on each rubric item. HealthBench rows carry a canary string:
they are for evaluation, never for training (`is_canaried`).

Our own tags sit beside HealthBench's: `kind:rule` marks an item graded by a machine check (see
`RuleCheck`, graded by `check_rule`), `dimension:*` one of the paper's rubric dimensions. A
`tool_call` check grades the reply's tool calls rather than its text: with positive points it
rewards calling a function (with some arguments), with negative points it penalises it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from clinicloop.backends.toolcalls import parse_arguments

_FROM_SOURCE = "clinicloop.rubrics.from_source"  # validation-context flag set by `from_line`


class _SourceOrdered(BaseModel):
    """A JSON object that dumps in the key order it was read in, unknown keys included.

    A dump holds the source's keys (or `_format_keys` for an object built in code) plus whatever
    was set since, so defaults never add keys a file did not have.
    """

    model_config = ConfigDict(extra="allow")

    _format_keys: ClassVar[tuple[str, ...]] = ()
    _source_keys: tuple[str, ...] | None = PrivateAttr(None)

    @model_validator(mode="wrap")
    @classmethod
    def _remember_key_order(
        cls, data: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> Any:
        obj = handler(data)
        # Only parsed text counts as a source: keyword arguments in code are not a file's keys.
        if isinstance(data, dict) and (info.context or {}).get(_FROM_SOURCE):
            obj._source_keys = tuple(data)
        return obj

    @model_serializer(mode="wrap")
    def _dump_in_source_order(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        dumped = handler(self)
        base = self._format_keys if self._source_keys is None else self._source_keys
        order = [k for k in base if k in dumped] + [k for k in dumped if k not in base]
        return {k: dumped[k] for k in order if k in base or k in self.model_fields_set}


#: A reply's tool calls in OpenAI's shape: `{"id", "type": "function", "function": {"name",
#: "arguments"}}`, the arguments as JSON text (as logged) or already parsed (as templates get them).
ToolCalls = list[dict[str, Any]]


class RuleCheck(_SourceOrdered):
    """A mechanical check for a `kind:rule` item, run on the response by `check_rule`."""

    type: Literal["regex", "keywords", "exact", "tool_call"]
    pattern: str | None = Field(None, description="regex: met if it matches (case-insensitive).")
    keywords: list[str] = Field(default_factory=list,
                                description="keywords: met if any (or all, with all_of) appear.")
    all_of: bool = False
    answer: str | None = Field(None, description="exact: met if the stripped answer equals it.")
    name: str | None = Field(None, description="tool_call: met if the reply calls this function.")
    arguments: dict[str, Any] | None = Field(
        None, description="tool_call: and the call's arguments hold these (nested objects may "
        "hold more keys; strings compare ignoring case and surrounding space).")

    @model_validator(mode="after")
    def _has_what_its_type_needs(self) -> RuleCheck:
        if self.type == "regex":
            if not self.pattern:
                raise ValueError("a regex rule needs a pattern")
            try:
                re.compile(self.pattern)  # a bad pattern fails here, not at grading time
            except re.error as e:
                raise ValueError(f"bad regex {self.pattern!r}: {e}") from e
        elif self.type == "keywords" and not any(k.strip() for k in self.keywords):
            raise ValueError("a keywords rule needs at least one keyword")
        elif self.type == "exact" and not (self.answer or "").strip():
            raise ValueError("an exact rule needs an answer")
        elif self.type == "tool_call" and not (self.name or "").strip():
            raise ValueError("a tool_call rule needs a function name")
        return self


class RubricItem(_SourceOrdered):
    _format_keys = ("criterion", "points", "tags")

    criterion: str
    points: int = Field(description="In [-10, 10], never 0; negative items penalise when met.")
    tags: list[str] = Field(default_factory=list)
    rule: RuleCheck | None = Field(None, description="Set for kind:rule items.")

    @field_validator("points")
    @classmethod
    def _points_in_range(cls, v: int) -> int:
        if v == 0 or not -10 <= v <= 10:
            raise ValueError(f"points must be a non-zero integer in [-10, 10], got {v}")
        return v

    def tag_values(self, prefix: str) -> list[str]:
        """Values of the tags `prefix:value`, e.g. tag_values("axis") -> ["accuracy"]."""
        return [t.split(":", 1)[1] for t in self.tags if t.startswith(prefix + ":")]

    @property
    def is_rule(self) -> bool:
        return "kind:rule" in self.tags and self.rule is not None


class Example(_SourceOrdered):
    """One HealthBench row: a conversation to answer and the rubric that grades the answer."""

    # The order of the released HealthBench files, for rows built in code.
    _format_keys = ("example_tags", "ideal_completions_data", "prompt", "prompt_id", "rubrics",
                    "canary")

    prompt: list[dict[str, Any]]
    rubrics: list[RubricItem]
    example_tags: list[str] = Field(default_factory=list)
    prompt_id: str
    ideal_completions_data: Any = None
    canary: str | None = None
    _line: str | None = PrivateAttr(None)  # the source line, written back if nothing changed

    @property
    def is_canaried(self) -> bool:
        return bool(self.canary)

    def to_line(self) -> str:
        dumped = self.model_dump(mode="json")
        if self._line is not None and json.loads(self._line) == dumped:
            return self._line
        # HealthBench files escape non-ASCII; keep whichever style the source line used.
        return json.dumps(dumped, ensure_ascii=self._line is None or self._line.isascii())

    @classmethod
    def from_line(cls, line: str) -> Example:
        example = cls.model_validate_json(line, context={_FROM_SOURCE: True})
        example._line = line.rstrip("\n")
        return example


def read_jsonl(path: Path) -> Iterator[Example]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield Example.from_line(line)


def write_jsonl(path: Path, examples: Iterable[Example]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for example in examples:
            f.write(example.to_line() + "\n")


# "Answer: X" on the last line, tolerating markdown emphasis around the label.
_ANSWER_LINE = re.compile(r"^[\s*#_]*(?:final\s+)?answer[\s*_]*:[\s*_]*(?P<value>.*?)[\s*_]*$",
                          re.IGNORECASE)


def _keyword_regex(keyword: str) -> re.Pattern[str]:
    # Word-ish: no letter or digit may touch either end, and any run of whitespace matches any.
    body = r"\s+".join(re.escape(part) for part in keyword.split())
    return re.compile(rf"(?<!\w){body}(?!\w)", re.IGNORECASE)


def _same_answer(text: str, answer: str) -> bool:
    return text.strip().casefold() == answer.strip().casefold()


def call_arguments(call: dict[str, Any]) -> Any:
    """A tool call's arguments, parsed: logged calls carry JSON text; text that is not JSON is
    returned as it is."""
    return parse_arguments(call.get("function", {}).get("arguments"))


def _holds(actual: Any, expected: Any) -> bool:
    """Whether `actual` holds `expected`: every key of an expected object, recursively; strings
    alike but for case and surrounding space; anything else equal (a bool is not a number)."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            k in actual and _holds(actual[k], v) for k, v in expected.items())
    if isinstance(expected, str):
        return isinstance(actual, str) and _same_answer(actual, expected)
    return isinstance(actual, bool) == isinstance(expected, bool) and actual == expected


def _calls_it(rule: RuleCheck, tool_calls: ToolCalls) -> bool:
    return any(call.get("function", {}).get("name") == rule.name
               and (rule.arguments is None or _holds(call_arguments(call), rule.arguments))
               for call in tool_calls)


def check_rule(rule: RuleCheck, response: str, tool_calls: ToolCalls | None = None) -> bool:
    """Whether a reply (its text `response` and its `tool_calls`) meets a `kind:rule` item's
    mechanical check."""
    if rule.type == "tool_call":
        return _calls_it(rule, tool_calls or [])
    if rule.type == "regex":
        assert rule.pattern is not None  # RuleCheck validation guarantees it
        return re.search(rule.pattern, response, re.IGNORECASE) is not None
    if rule.type == "keywords":
        found = [_keyword_regex(k).search(response) is not None for k in rule.keywords if k.strip()]
        return all(found) if rule.all_of else any(found)
    assert rule.answer is not None
    if _same_answer(response, rule.answer):
        return True
    lines = [line for line in response.splitlines() if line.strip()]
    match = _ANSWER_LINE.match(lines[-1]) if lines else None
    return match is not None and _same_answer(match["value"], rule.answer)
