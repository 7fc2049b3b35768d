"""Server-sent events framing as OpenAI streams it: `data: <json>` blocks, then `data: [DONE]`;
any error after the stream started is sent as one `data: {"error": ...}` block, so every stream
ends with its last chunk or an error, then `[DONE]`. Also the shared body of the generating
routes, which choose between a stream and one response."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from clinicloop.serving.errors import as_openai_error
from clinicloop.serving.generation import CONVERSATION_HEADER


def event(model: BaseModel, *, exclude_none: bool = True) -> str:
    return f"data: {model.model_dump_json(exclude_none=exclude_none)}\n\n"


async def framed(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield event(chunk)
    except Exception as exc:  # a client disconnecting is a BaseException and ends us silently
        yield event(as_openai_error(exc).body(), exclude_none=False)  # OpenAI's full shape
    yield "data: [DONE]\n\n"


async def serve(handler: Any, body: Any, request: Request) -> Any:
    """The body of every generating route: identify the caller, start the run, then stream it as
    SSE or return one response. `handler` is a chat or completion handler."""
    state = request.app.state
    caller = state.keys.caller(request)
    run = await handler.start(body, caller, request.headers.get(CONVERSATION_HEADER))
    if body.stream:
        return StreamingResponse(framed(handler.stream(body, run)),
                                 media_type="text/event-stream")
    return await handler.respond(body, run)
