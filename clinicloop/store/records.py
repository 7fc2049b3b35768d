"""The record of one served request: what the gateway hands to the store.

One record per request ("turn"); the turns of a multi-turn conversation share `conversation_id`.
`id` is the idempotency key: a record replayed from the spool after a store outage is inserted at
most once.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field


def content_text(content: Any) -> str:
    """A logged message's content as text: a string as it is, an OpenAI content-part list by
    its parts' text, anything else empty."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


#: The API that served a turn.
Endpoint = Literal["chat.completions", "completions", "responses"]


class LoggedChoice(BaseModel):
    index: int
    content: str
    reasoning_content: str | None = None
    finish_reason: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(
        None, description="The calls the reply made, in OpenAI's shape: "
        '`{"id", "type": "function", "function": {"name", "arguments"}}`.')


class TurnRecord(BaseModel):
    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    conversation_id: str
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    endpoint: Endpoint
    model: str
    model_version: str
    api_key_id: str | None = Field(
        None, description="Fingerprint of the key's hash, never the key."
    )
    messages: list[dict[str, Any]] = Field(
        description="The request's messages (a completion's prompt as one user message)."
    )
    choices: list[LoggedChoice] = Field(default_factory=list)
    params: dict[str, Any] = Field(default_factory=dict, description="Sampling parameters.")
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    status: Literal["ok", "error", "cancelled"] = "ok"
    error: str | None = None
    origin: Literal["client", "service"] = Field(
        "client", description="`service`: the project's own traffic (judge, rubric generator, "
        "patient simulator, benchmarks, load tests), never trained on or scored."
    )

    @property
    def response(self) -> str | None:
        return self.choices[0].content if self.choices else None

    @property
    def reasoning(self) -> str | None:
        return self.choices[0].reasoning_content if self.choices else None

    @property
    def tool_calls(self) -> list[dict[str, Any]] | None:
        """The reply's tool calls (choice 0), as graded with its text."""
        return self.choices[0].tool_calls if self.choices else None
