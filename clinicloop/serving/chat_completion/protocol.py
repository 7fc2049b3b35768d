"""Chat completion request and response models (OpenAI's shapes, plus `reasoning_content`)."""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from clinicloop.serving.protocol import (
    INT32_MAX,
    FinishReason,
    OpenAIModel,
    SamplingRequest,
    UsageInfo,
    new_id,
    now,
)


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class RefusalPart(OpenAIModel):
    """An assistant message's refusal, sent back in the history: text too."""

    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[TextPart | RefusalPart, Field(discriminator="type")]


# What a message may carry that this server does not honour, each with why: a 400 naming it when
# set (null or an empty list is as good as unset), as the official client sends a reply back.
MESSAGE_UNSUPPORTED: dict[str, str] = {
    "function_call": "function_call is deprecated: send tool_calls",
    "audio": "audio is not supported: the model takes text only",
    "refusal": "send a refusal back as content (a part of type 'refusal')",
}
# OpenAI's rule for a function's name.
FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class ReplyFunctionCall(BaseModel):
    name: str
    arguments: str  # as the model wrote them: cut short by `length`, not JSON


class ReplyToolCall(BaseModel):
    """A call in a reply."""

    id: str
    type: Literal["function"] = "function"
    function: ReplyFunctionCall


class FunctionCall(OpenAIModel):
    name: str
    arguments: str

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, arguments: str) -> str:
        """The template writes the arguments as a JSON object (as vLLM and transformers parse
        them), so text that is not one cannot be rendered."""
        try:
            value = json.loads(arguments)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than json reads
            raise ValueError("a tool call's arguments must be a JSON object (as text)") from None
        if not isinstance(value, dict):
            raise ValueError("a tool call's arguments must be a JSON object (as text)")
        return arguments


class ToolCall(OpenAIModel):
    """A call an assistant message made, as the official client sends it back."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(OpenAIModel):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(OpenAIModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: FunctionName


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    # An earlier reply as the official client sends it back: its reasoning is not shown to the
    # model (as reasoning models' templates drop it), its annotations are citations.
    reasoning_content: str | None = None
    annotations: list[Any] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    function_call: Any = None
    audio: Any = None
    refusal: Any = None

    @field_validator(*MESSAGE_UNSUPPORTED, mode="before")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None or value == []:
            return value
        assert info.field_name is not None
        raise ValueError(MESSAGE_UNSUPPORTED[info.field_name])

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        """A part of another type (image_url, input_audio, file) is refused by name: the model
        takes text only."""
        for i, part in enumerate(content if isinstance(content, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind not in ("text", "refusal"):
                shown = kind if len(kind) <= 40 else kind[:40] + "..."
                raise ValueError(f"content part {i} is of type {shown!r}; this model takes "
                                 "text only (parts of type 'text')")
        return content

    @model_validator(mode="after")
    def _tool_fields_fit_role(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message can carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("only a tool message can carry tool_call_id")
        return self

    def text(self) -> str:
        """The content as one text: parts joined by a newline, as vLLM joins them."""
        if isinstance(self.content, list):
            return "\n".join(part.text if isinstance(part, TextPart) else part.refusal
                             for part in self.content)
        return self.content or ""

    def as_dict(self) -> dict[str, Any]:
        """The message in OpenAI's shape with its content as one text: what engines take (the
        llama.cpp engine parses tool calls' arguments for its template) and the log keeps."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class JsonSchemaFormat(OpenAIModel):
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema")
        return self


class ChatCompletionRequest(SamplingRequest):
    UNSUPPORTED: ClassVar[dict[str, str]] = {
        **{name: "functions and function_call are deprecated: send tools and tool_choice"
           for name in ("functions", "function_call")},
        "audio": "audio output is not supported",
        "modalities": "the model answers in text only",
        "prediction": "predicted outputs are not supported",
        "web_search_options": "web search is not supported",
        "reasoning_effort": "use chat_template_kwargs {\"thinking_mode\": \"on\"|\"off\"|"
                            "\"auto\"} instead",
        "verbosity": "verbosity is not supported",
        "moderation": "moderation is not supported",
    }
    NO_OP: ClassVar[dict[str, tuple[Any, ...]]] = {"modalities": (["text"],)}

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    tools: list[ChatTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def tool_problem(self) -> str | None:
        """Why `tools` and `tool_choice` cannot go together, in OpenAI's words, or None."""
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) < len(names):
            return "tools: function names must be unique"
        choice = self.tool_choice
        if choice is not None and choice != "none" and not names:
            return "'tool_choice' is only allowed when 'tools' are specified"
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            return (f"tool_choice names the function {choice.function.name[:64]!r}, which is "
                    "not among the tools")
        return None

    def tool_params(self) -> dict[str, Any]:
        """The tool fields of `SamplingParams`: none unless tools are offered; `tool_choice`
        defaults to `auto` then, as OpenAI's does."""
        if not self.tools:
            return {}
        choice = self.tool_choice or "auto"
        return {"tools": [tool.model_dump(exclude_none=True) for tool in self.tools],
                "tool_choice": choice if isinstance(choice, str) else choice.model_dump(),
                "parallel_tool_calls": self.parallel_tool_calls is not False}

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def messages_as_dicts(self) -> list[dict[str, Any]]:
        return [m.as_dict() for m in self.messages]


class TopLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(TopLogprobOut):
    top_logprobs: list[TopLogprobOut] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ReplyToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A piece of a streamed call: the first carries `id`, `type` and the name, later ones
    fragments of the arguments, all under the call's `index`."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
