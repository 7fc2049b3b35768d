"""Route for /v1/completions: auth, then the handler."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from clinicloop.serving.completion.protocol import CompletionRequest
from clinicloop.serving.generation import CONVERSATION_HEADER
from clinicloop.serving.sse import framed

router = APIRouter()


@router.post("/v1/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request):
    state = request.app.state
    caller = state.keys.caller(request)
    run = await state.completion.start(body, caller, request.headers.get(CONVERSATION_HEADER))
    if body.stream:
        return StreamingResponse(framed(state.completion.stream(body, run)),
                                 media_type="text/event-stream")
    return await state.completion.respond(body, run)
