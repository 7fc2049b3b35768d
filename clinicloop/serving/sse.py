"""Server-sent events framing as OpenAI streams it: `data: <json>` blocks, then `data: [DONE]`;
an error after the stream started is sent as one `data: {"error": ...}` block."""

from __future__ import annotations

from collections.abc import AsyncIterator

from pydantic import BaseModel

from clinicloop.serving.errors import OpenAIError


def event(model: BaseModel) -> str:
    return f"data: {model.model_dump_json(exclude_none=True)}\n\n"


async def framed(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield event(chunk)
    except OpenAIError as exc:
        yield event(exc.body())
    yield "data: [DONE]\n\n"
