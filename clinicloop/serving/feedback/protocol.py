"""/v1/feedback request and response models."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from clinicloop.serving.protocol import OpenAIModel

#: The longest comment kept (characters); the body limit (`server.max_body_bytes`) comes first.
MAX_COMMENT_CHARS = 8000


class FeedbackRequest(OpenAIModel):
    """A rating of one response, by the `id` of its chat.completion, completion or Responses
    object."""

    response_id: str = Field(min_length=1, max_length=256, strict=True)
    rating: Literal["up", "down"]
    comment: str | None = Field(None, max_length=MAX_COMMENT_CHARS, strict=True,
                                description="Free text; PHI is redacted before it is stored.")


class FeedbackResponse(BaseModel):
    id: int
    object: Literal["feedback"] = "feedback"
    response_id: str
    rating: Literal["up", "down"]
