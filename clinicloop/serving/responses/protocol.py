"""Responses API models (OpenAI's `POST /v1/responses` shapes): the request with the input items
this server reads, the response object, and the typed stream events the official client parses.

`input` is normalised before validation: a string is one user message, a message's string content
one `input_text` part, and an item without `type` a message (OpenAI's "easy" input message), so a
bad part is reported at its own place (`input.0.content.1.type`). Fields OpenAI defines that this
server does not honour are kept as extras and refused by the handler
(`CheckedRequest.refused_field`).

Function tools are taken in this API's flat shape and checked and converted by chat's code
(`ResponsesRequest.chat_tools`), so both APIs accept and refuse the same tools; built-in tool
types (web_search, file_search, ...) are refused by name.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from clinicloop.serving.chat_completion.protocol import (
    FUNCTION_NAME,
    ChatCompletionRequest,
    ChatTool,
    FunctionCall,
    FunctionDefinition,
    FunctionName,
    NamedToolChoice,
)
from clinicloop.serving.protocol import INT32_MAX, CheckedRequest

MAX_ID_LENGTH = 256

ResponseStatus = Literal["completed", "failed", "in_progress", "cancelled", "incomplete"]

# OpenAI's request fields this server does not honour, each with why: a 400 naming the field when
# one is set (null or an empty list is as good as unset). Anything else unknown is a 400 too.
UNSUPPORTED: dict[str, str] = {
    "max_tool_calls": "no built-in tools run here; to allow one function call, set "
                      "parallel_tool_calls to false",
    "include": "no extra output data (logprobs, encrypted reasoning) is returned",
    "top_logprobs": "logprobs are not returned by the Responses API here",
    "background": "background responses are not supported",
    "conversation": "the Conversations API is not supported: use previous_response_id",
    "prompt": "stored prompt templates are not supported",
    "context_management": "context management is not supported",
    "moderation": "moderation is not supported",
    "image": "image input is not supported",
    "access_programs": "access programs are not supported",
    "background_options": "background responses are not supported",
    "prompt_cache_options": "prompt cache options are not supported",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    """A text part of an input message; an `output_text` part is an earlier answer passed back."""

    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


def _one_text_part(value: Any) -> Any:
    """A string as the one text part it stands for."""
    return [{"type": "input_text", "text": value}] if isinstance(value, str) else value


class InputMessage(_Strict):
    type: Literal["message"]
    role: Literal["user", "assistant", "system", "developer"]
    content: list[TextPart]
    # What an output message passed back as input carries: harmless.
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None

    _string_is_one_part = field_validator("content", mode="before")(_one_text_part)

    def text(self) -> str:
        return "\n".join(part.text for part in self.content)


class ReasoningInput(_Strict):
    """A reasoning item passed back as input. Accepted and left out of the prompt, as the chat
    template leaves out earlier turns' reasoning."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[Any] = Field(default_factory=list)
    content: list[Any] | None = None
    encrypted_content: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallInput(FunctionCall):
    """A call the model made, passed back as input (`arguments`: a JSON object, as text)."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutputInput(_Strict):
    """A function's result, answering the call `call_id`: text, or text parts."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    output: list[TextPart]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    _string_is_one_part = field_validator("output", mode="before")(_one_text_part)

    def text(self) -> str:
        return "\n".join(part.text for part in self.output)


InputItem = Annotated[InputMessage | ReasoningInput | FunctionCallInput | FunctionCallOutputInput,
                      Field(discriminator="type")]


class ReasoningConfig(_Strict):
    """`effort` switches the chat template's thinking: `none` is off, any other level on."""

    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Any = None
    generate_summary: Any = None

    @field_validator("summary", "generate_summary")
    @classmethod
    def _no_summaries(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("reasoning summaries are not produced by this server")
        return value


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("text.format of type json_schema needs schema")
        return self


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None  # the only verbosity the model has


class FunctionTool(_Strict):
    """A function the model may call, in this API's flat shape."""

    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def as_chat(self) -> ChatTool:
        return ChatTool(type="function", function=FunctionDefinition(
            name=self.name, description=self.description, parameters=self.parameters,
            strict=self.strict))


class FunctionChoice(_Strict):
    type: Literal["function"]
    name: str


def _type_of(value: Any) -> str | None:
    """A JSON object's `type`, cut short for an error message."""
    kind = value.get("type") if isinstance(value, dict) else None
    if not isinstance(kind, str):
        return None
    return kind if len(kind) <= 40 else kind[:40] + "..."


class StreamOptions(_Strict):
    include_obfuscation: bool | None = None  # padding against side channels: nothing to pad


class ResponsesRequest(CheckedRequest):
    UNSUPPORTED = UNSUPPORTED

    model: str | None = None
    input: list[InputItem] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    previous_response_id: str | None = Field(None, min_length=1, max_length=MAX_ID_LENGTH)
    reasoning: ReasoningConfig | None = None
    text: TextConfig | None = None
    truncation: Literal["disabled"] | None = None  # "auto" would cut the input: not done
    tools: list[FunctionTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    # Stored (redacted, as every field) because a response carries its metadata back on GET.
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None,
                                                                               max_length=16)

    @field_validator("input", mode="before")
    @classmethod
    def _normalise_input(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [{"type": "message", "role": "user", "content": value}]
        if isinstance(value, list):
            return [{"type": "message", **item} if isinstance(item, dict) and "type" not in item
                    else item for item in value]
        return value

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools_only(cls, tools: Any) -> Any:
        for i, tool in enumerate(tools if isinstance(tools, list) else []):
            kind = _type_of(tool)
            if kind is not None and kind != "function":
                raise ValueError(f"tool {i} is of type {kind!r}: this server runs no built-in "
                                 "tools, only tools of type 'function'")
        return tools

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _function_choice_only(cls, choice: Any) -> Any:
        kind = _type_of(choice)
        if kind is not None and kind != "function":
            raise ValueError(f"tool_choice of type {kind!r} is not supported: choose 'none', "
                             "'auto', 'required' or {\"type\": \"function\", \"name\": ...}")
        return choice

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> ResponsesRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true")
        return self

    def chat_tools(self) -> ChatCompletionRequest:
        """The tool fields in chat's shape, on which chat's checks (`tool_problem`) and its
        conversion to the engines' parameters (`tool_params`) run. Built without validation:
        these fields were validated here, and chat's other fields are not read."""
        choice = self.tool_choice
        return ChatCompletionRequest.model_construct(
            tools=None if self.tools is None else [tool.as_chat() for tool in self.tools],
            tool_choice=NamedToolChoice(type="function", function=FunctionName(name=choice.name))
            if isinstance(choice, FunctionChoice) else choice,
            parallel_tool_calls=self.parallel_tool_calls)


# The response object and its output items.


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class ReasoningItem(BaseModel):
    id: str
    type: Literal["reasoning"] = "reasoning"
    summary: list[Any] = Field(default_factory=list)
    content: list[ReasoningText]
    status: Literal["in_progress", "completed", "incomplete"]


class FunctionCallItem(BaseModel):
    """A call the model made: `call_id` names it when its output is sent back."""

    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


OutputItem = OutputMessage | ReasoningItem | FunctionCallItem


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0  # not counted


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0  # not counted


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class ResponseError(BaseModel):
    code: str
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"] = "max_output_tokens"


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: dict[str, Any] | None = None
    store: bool = True
    temperature: float
    top_p: float
    text: dict[str, Any]
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    user: str | None = None


# Stream events: each carries its `sequence_number` (0, 1, ... in the order sent).


class LifecycleEvent(BaseModel):
    type: Literal["response.created", "response.in_progress", "response.completed",
                  "response.incomplete", "response.failed"]
    sequence_number: int
    response: ResponseObject


class OutputItemEvent(BaseModel):
    type: Literal["response.output_item.added", "response.output_item.done"]
    sequence_number: int
    output_index: int
    item: OutputItem


class ContentPartEvent(BaseModel):
    type: Literal["response.content_part.added", "response.content_part.done"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: OutputText | ReasoningText


class TextDeltaEvent(BaseModel):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = Field(default_factory=list)


class TextDoneEvent(BaseModel):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = Field(default_factory=list)


class ReasoningDeltaEvent(BaseModel):
    type: Literal["response.reasoning_text.delta"] = "response.reasoning_text.delta"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str


class ReasoningDoneEvent(BaseModel):
    type: Literal["response.reasoning_text.done"] = "response.reasoning_text.done"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str


class ArgumentsDeltaEvent(BaseModel):
    type: Literal["response.function_call_arguments.delta"] = (
        "response.function_call_arguments.delta")
    sequence_number: int
    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(BaseModel):
    type: Literal["response.function_call_arguments.done"] = (
        "response.function_call_arguments.done")
    sequence_number: int
    item_id: str
    output_index: int
    arguments: str


StreamEvent = (LifecycleEvent | OutputItemEvent | ContentPartEvent | TextDeltaEvent
               | TextDoneEvent | ReasoningDeltaEvent | ReasoningDoneEvent | ArgumentsDeltaEvent
               | ArgumentsDoneEvent)
