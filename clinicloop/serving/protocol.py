"""OpenAI protocol types shared by the per-API packages: errors, usage, sampling fields; and what
a request body must be before any of them sees it (`body_problem`)."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    # Unknown fields are ignored, as vLLM does, so newer clients keep working.
    model_config = ConfigDict(extra="ignore")


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


class SamplingRequest(OpenAIModel):
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
    user: str | None = None
    ignore_eos: bool = Field(False, description="vLLM's extension: keep generating past the "
                             "end-of-sequence token up to max_tokens (benchmarks).")

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true")
        return self

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
            ignore_eos=self.ignore_eos, **extra,
        )


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# OpenAI's finish reasons (an upstream may send any of them), and ours for a failed choice.
FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "error"]
