"""Routes for /v1/responses: auth, then the handler; streams framed as OpenAI sends them
(`event: <type>` and `data: <json>` per event, no `[DONE]`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from clinicloop.serving.errors import OpenAIError
from clinicloop.serving.generation import CONVERSATION_HEADER
from clinicloop.serving.responses.protocol import ResponseObject, ResponsesRequest, StreamEvent

router = APIRouter()


async def _framed(events: AsyncIterator[StreamEvent]) -> AsyncIterator[str]:
    async for event in events:
        yield f"event: {event.type}\ndata: {event.model_dump_json()}\n\n"


@router.post("/v1/responses", response_model=None)
async def create_response(body: ResponsesRequest, request: Request):
    handler = request.app.state.responses
    caller = request.app.state.keys.caller(request)
    run = await handler.start(body, caller, request.headers.get(CONVERSATION_HEADER))
    if body.stream:
        return StreamingResponse(_framed(handler.stream(run)), media_type="text/event-stream")
    return await handler.respond(run)


@router.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str, request: Request,
                            stream: bool = False) -> ResponseObject:
    if stream:
        raise OpenAIError(400, "a stored response is not replayed as a stream", param="stream",
                          code="unsupported_parameter")
    caller = request.app.state.keys.caller(request)
    return await request.app.state.responses.retrieve(response_id, caller)
