"""The engine interface the gateway talks to, and the types that cross it.

An engine turns a chat or a completion request into one async stream of `Delta`s (text pieces per
choice, already split into reasoning and content) that ends with one `Usage`. The gateway builds
both the streamed and the non-streamed OpenAI response from that same stream, which is what makes
streamed deltas join to exactly the non-streamed text.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any


class EngineError(Exception):
    """A request the engine cannot serve; `status` and `code` become the OpenAI error."""

    def __init__(self, message: str, *, status: int = 400, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.param = param


class EngineUnavailable(EngineError):
    def __init__(self, message: str) -> None:
        super().__init__(message, status=503, code="engine_unavailable")


@dataclass
class SamplingParams:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    top_logprobs: int | None = None  # None: no logprobs; 0..k: the sampled token plus k top
    json_schema: dict[str, Any] | None = None
    json_object: bool = False
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens even past end-of-sequence


@dataclass
class TopLogprob:
    token: str
    logprob: float
    bytes: list[int]


@dataclass
class TokenLogprob(TopLogprob):
    top: list[TopLogprob] = field(default_factory=list)


@dataclass
class Delta:
    index: int
    content: str = ""
    reasoning: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    #: Tokens generated since the previous Delta of this choice; counts a request cut short
    #: (a disconnect) that never reaches its Usage.
    tokens: int = 0


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


Event = Delta | Usage


@dataclass
class Lease:
    """The engine and model version chosen for one admitted request, held until `release`."""

    engine: Engine
    version: str
    release: Callable[[], None] = lambda: None


class Engine(abc.ABC):
    """Lifecycle: `start()` once (loads or connects), `close()` once."""

    #: Model id shown in /v1/models and echoed in responses.
    model_name: str
    #: What served a request, logged with it (a file hash, an upstream model id).
    model_version: str
    #: Requests this engine runs at once; the gateway queues the rest.
    max_concurrency: int

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def healthy(self) -> bool:
        """False while loading, or when the engine (or its upstream) is dead."""

    def lease(self, conversation: str | None) -> Lease:
        """Choose what serves an admitted request of `conversation` (an engine serving several
        versions routes here); raise `EngineUnavailable` if nothing can."""
        return Lease(self, self.model_version)

    def memory(self) -> dict[str, int]:
        """Bytes this engine holds beyond what it shares (its KV cache, its adapter)."""
        return {}

    def stats(self) -> dict[str, int]:
        """Cumulative counters of the decode loop, exported as `vllm:<name>` counters."""
        return {}

    @abc.abstractmethod
    def chat(self, messages: list[dict[str, Any]], params: SamplingParams,
             template_kwargs: dict[str, Any]) -> AsyncIterator[Event]:
        """Stream a chat completion; raise EngineError before the first event for a bad request."""

    @abc.abstractmethod
    def complete(self, prompt: str, params: SamplingParams) -> AsyncIterator[Event]:
        """Stream a raw-text completion (no chat template, no reasoning split)."""
