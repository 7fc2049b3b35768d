"""OpenAI protocol types shared by the per-API packages: errors, usage, sampling fields; and what
a request body must be before any of them sees it (`body_problem`)."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from clinicloop.backends.base import SamplingParams

# Bounds that keep every number a request carries within what engines and stores take.
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NESTING_STEP = np.zeros(256, dtype=np.int8)
_NESTING_STEP[[ord("["), ord("{")]] = 1
_NESTING_STEP[[ord("]"), ord("}")]] = -1


def body_problem(body: bytes) -> str | None:
    """Why `body` is not a request body this server takes, or None: every body is one strict JSON
    document (UTF-8; no NaN, Infinity or number beyond float range; nesting at most
    `MAX_JSON_DEPTH` deep) whose strings (keys too) are Unicode text. A lone UTF-16 surrogate
    (`"\\ud800"`) is legal JSON but not text: it cannot be encoded, tokenized or stored.
    All of it runs in C, in a few times what parsing the body costs, whatever the body holds."""
    try:
        text = body.decode("utf-8")
        doc = json.loads(text)
        # Encoding it again finds what parsing let through: NaN, Infinity and numbers out of
        # float range (ValueError), lone surrogates (UnicodeEncodeError).
        json.dumps(doc, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeDecodeError:
        return "request body is not valid UTF-8"
    except UnicodeEncodeError:
        return "request body holds a lone UTF-16 surrogate (e.g. \\ud800), which is not text"
    except json.JSONDecodeError as exc:
        return f"request body is not valid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})"
    except RecursionError:
        return f"request body nests deeper than {MAX_JSON_DEPTH} levels"
    except ValueError:  # NaN, Infinity, 1e400; an integer of thousands of digits
        return "request body holds NaN, Infinity or a number out of range, which JSON does not"
    if _nesting(text) > MAX_JSON_DEPTH:
        return f"request body nests deeper than {MAX_JSON_DEPTH} levels"
    return None


def _nesting(text: str) -> int:
    """How deep the arrays and objects of a valid JSON text nest."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return 0  # too few to nest too deep
    structure = _JSON_STRING.sub("", text).encode("ascii")  # what is left outside strings
    steps = _NESTING_STEP[np.frombuffer(structure, dtype=np.uint8)]
    return int(np.cumsum(steps, dtype=np.int32).max(initial=0))


class OpenAIModel(BaseModel):
    """A part of a request: an unknown field is a 400 naming it, never silently dropped."""

    model_config = ConfigDict(extra="forbid")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # padding against side channels: nothing to pad


TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]


class CheckedRequest(BaseModel):
    """A request body whose every field is honoured, or is metadata that cannot change the answer
    (accepted, not logged: what a client tags a request with may name a person), or is refused
    with a 400 naming it (`refused_field`): OpenAI's fields this endpoint does not honour, each
    with why (`UNSUPPORTED`), and any unknown field."""

    # Extras are kept so that the handler names each one in its 400.
    model_config = ConfigDict(extra="allow")
    #: OpenAI's fields this endpoint does not honour, each with why.
    UNSUPPORTED: ClassVar[dict[str, str]] = {}
    #: Values of those fields that change nothing, besides null and an empty list.
    NO_OP: ClassVar[dict[str, tuple[Any, ...]]] = {}

    user: str | None = Field(None, exclude=True)
    safety_identifier: str | None = Field(None, exclude=True)
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16, exclude=True)
    store: bool | None = Field(None, exclude=True)  # every turn is logged (redacted) anyway
    service_tier: str | None = Field(None, exclude=True)  # one tier here
    prompt_cache_key: str | None = Field(None, exclude=True)  # the prefix cache needs no hint
    prompt_cache_retention: str | None = Field(None, exclude=True)

    def refused_field(self) -> ErrorInfo | None:
        """The 400 for the first field set that this server does not honour, in OpenAI's words
        (an unknown one is an `unknown_parameter`); None when there is none."""
        for name, value in (self.model_extra or {}).items():
            reason = self.UNSUPPORTED.get(name)
            if reason is None:
                return ErrorInfo(message=f"Unknown parameter: '{name}'.", param=name,
                                 type="invalid_request_error", code="unknown_parameter")
            if not (value is None or value == [] or value in self.NO_OP.get(name, ())):
                return ErrorInfo(message=f"'{name}' is not supported by this server: {reason}",
                                 param=name, type="invalid_request_error",
                                 code="unsupported_parameter")
        return None


class SamplingRequest(CheckedRequest):
    """Fields common to /v1/chat/completions and /v1/completions."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="vLLM's extension: keep generating past the "
                             "end-of-sequence token up to max_tokens (benchmarks).")
    # Every sampling field OpenAI and vLLM define; null is the default, which changes nothing.
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    # vLLM's (> 0, 1 = off), bounded so that the logits it scales stay finite in float32.
    repetition_penalty: float | None = Field(None, ge=1e-6, le=1e6)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> -100..100
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)  # vLLM's: -1 or 0 = off
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    min_tokens: int | None = Field(None, ge=0, le=INT32_MAX)
    stop_token_ids: list[TokenId] | None = None
    prompt_cache_options: dict[str, Any] | None = Field(None, exclude=True)  # metadata too

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not (key.isascii() and key.isdigit() and int(key) <= INT32_MAX):
                raise ValueError("keys must be token ids (integers from 0, as strings)")
            if not -100 <= value <= 100:
                raise ValueError(f"the bias of token {int(key)} must be from -100 to 100")
        return bias

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true")
        return self

    def max_new_tokens(self) -> int | None:
        """How many tokens the completion may have, if the request says."""
        return self.max_tokens

    def refused_field(self) -> ErrorInfo | None:
        """As `CheckedRequest.refused_field`, and `min_tokens` beyond the completion's budget."""
        budget = self.max_new_tokens()
        if self.min_tokens and budget is not None and self.min_tokens > budget:
            return ErrorInfo(message=f"min_tokens ({self.min_tokens}) must be at most the "
                             f"completion's max_tokens ({budget})", param="min_tokens",
                             type="invalid_request_error", code="invalid_value")
        return super().refused_field()

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if len(stops) > 4:
            raise ValueError("stop accepts at most 4 sequences")
        return stops

    def sampling_params(self, max_tokens: int | None, top_logprobs: int | None,
                        **extra: Any) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, n=self.n,
            seed=self.seed, stop=self.stop_list(), top_logprobs=top_logprobs,
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            top_k=max(self.top_k or 0, 0), min_p=self.min_p or 0.0,
            min_tokens=self.min_tokens or 0, stop_token_ids=list(self.stop_token_ids or []),
            **extra,
        )


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# OpenAI's finish reasons (an upstream may send any of them), and ours for a failed choice.
FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "error"]
