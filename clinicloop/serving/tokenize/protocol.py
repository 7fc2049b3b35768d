"""/tokenize and /detokenize request and response models, in vLLM's shapes (vLLM serves both
beside /v1, not under it: `vllm/entrypoints/serve/tokenize/protocol.py`)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from clinicloop.serving.chat_completion.protocol import ChatMessage
from clinicloop.serving.protocol import INT64_MAX, OpenAIModel


class TokenizeRequest(OpenAIModel):
    """vLLM's `TokenizeCompletionRequest` (`prompt`) and `TokenizeChatRequest` (`messages`,
    rendered by the chat template) in one model: exactly one of the two."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = Field(
        None, description="Add the tokenizer's own special tokens (BOS). Default: true for a "
        "prompt, false for messages (the chat template writes them).")
    add_generation_prompt: bool = True
    return_token_strs: bool | None = False
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    # vLLM's, not honoured here: refused when set, since dropping them would change the tokens.
    tools: list[Any] | None = None
    chat_template: str | None = None
    continue_final_message: bool = False

    @field_validator("tools", "chat_template", "continue_final_message")
    @classmethod
    def _not_honoured(cls, value: Any, info: ValidationInfo) -> Any:
        if value:
            raise ValueError(f"{info.field_name} is not supported by this server")
        return value

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either `prompt` (text) or `messages` (a chat), not both "
                             "and not neither")
        return self

    def text_or_messages(self) -> str | list[dict[str, Any]]:
        if self.messages is not None:
            return [m.as_dict() for m in self.messages]
        assert self.prompt is not None
        return self.prompt

    def special_tokens(self) -> bool:
        if self.add_special_tokens is not None:
            return self.add_special_tokens
        return self.messages is None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, le=INT64_MAX)]]


class DetokenizeResponse(BaseModel):
    prompt: str
