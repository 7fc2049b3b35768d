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


class ModelNotFound(EngineError):
    """A request named a model this server does not serve (OpenAI's 404)."""

    def __init__(self, model: str) -> None:
        shown = model if len(model) <= 200 else model[:200] + "..."
        super().__init__(f"The model `{shown}` does not exist.", status=404,
                         code="model_not_found", param="model")


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
    # OpenAI's penalties (on generated tokens) and vLLM's (on prompt and generated tokens);
    # the defaults leave the logits alone.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # > 0; 1: off
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    top_k: int = 0  # 0 (or vLLM's -1): off
    min_p: float = 0.0
    min_tokens: int = 0  # neither end-of-generation nor a stop token id before this many
    stop_token_ids: list[int] = field(default_factory=list)  # sampling one ends the choice
    # Tool calling, in OpenAI's shapes: `tools` as the request sent them (type "function");
    # `tool_choice` "none" | "auto" | "required" | {"type": "function", "function": {"name"}};
    # `parallel_tool_calls` false: at most one call per choice.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True

    def forced_tool(self) -> str | None:
        """The function a named `tool_choice` forces, else None."""
        if isinstance(self.tool_choice, dict):
            return str(self.tool_choice["function"]["name"])
        return None


@dataclass
class TopLogprob:
    token: str
    logprob: float
    bytes: list[int]


@dataclass
class TokenLogprob(TopLogprob):
    top: list[TopLogprob] = field(default_factory=list)


@dataclass
class ToolCallDelta:
    """A piece of one tool call, as OpenAI streams it: a call's first piece carries its id and
    function name, later pieces fragments of its arguments' JSON text (joined, the arguments)."""

    index: int  # the call's position among its choice's tool calls
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class Delta:
    index: int
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
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
class Tokens:
    """A tokenized prompt, as vLLM's /tokenize answers it."""

    ids: list[int]
    #: The longest sequence (prompt and completion) the engine serves.
    max_model_len: int
    #: Each token's text in the vocabulary (e.g. `Ġfever`), when asked for.
    strs: list[str] | None = None


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

    async def resolve(self, model: str | None) -> str | None:
        """The version a request's `model` pins (None: routed as usual), checked before the
        request is admitted; `ModelNotFound` for a name this engine does not serve. An engine
        without versions serves its own name only."""
        if model is not None and model != self.model_name:
            raise ModelNotFound(model)
        return None

    async def lease(self, conversation: str | None, version: str | None = None) -> Lease:
        """Choose what serves an admitted request of `conversation`, or the `version` that
        `resolve` pinned (an engine serving several versions routes or loads here); raise
        `EngineUnavailable` if nothing can."""
        return Lease(self, self.model_version)

    def memory(self) -> dict[str, int]:
        """Bytes this engine holds beyond what it shares (its KV cache, its adapter)."""
        return {}

    def stats(self) -> dict[str, int]:
        """Cumulative counters of the decode loop, exported as `vllm:<name>` counters."""
        return {}

    def kv_cells(self) -> tuple[int, int]:
        """(KV-cache cells held by running requests, cells allocated), the source of
        `vllm:kv_cache_usage_perc`; (0, 0) where the engine cannot tell (an upstream reports
        its own)."""
        return (0, 0)

    @abc.abstractmethod
    def chat(self, messages: list[dict[str, Any]], params: SamplingParams,
             template_kwargs: dict[str, Any]) -> AsyncIterator[Event]:
        """Stream a chat completion; raise EngineError before the first event for a bad request."""

    @abc.abstractmethod
    def complete(self, prompt: str, params: SamplingParams) -> AsyncIterator[Event]:
        """Stream a raw-text completion (no chat template, no reasoning split)."""

    @abc.abstractmethod
    async def tokenize(self, prompt: str | list[dict[str, Any]], *, add_special_tokens: bool,
                       add_generation_prompt: bool = True,
                       template_kwargs: dict[str, Any] | None = None,
                       token_strs: bool = False) -> Tokens:
        """The tokens of a text `prompt`, or of chat `messages` rendered by the chat template
        (`add_generation_prompt`, `template_kwargs`); `add_special_tokens` adds what the
        tokenizer adds on its own (BOS)."""

    @abc.abstractmethod
    async def detokenize(self, tokens: list[int]) -> str:
        """The text of `tokens`; `EngineError` (400) for an id outside the vocabulary."""
