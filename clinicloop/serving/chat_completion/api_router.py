"""Route for /v1/chat/completions: auth, then the handler; nothing else."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from clinicloop.serving.chat_completion.protocol import ChatCompletionRequest
from clinicloop.serving.generation import CONVERSATION_HEADER
from clinicloop.serving.sse import framed

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    state = request.app.state
    caller = state.keys.caller(request)
    run = await state.chat.start(body, caller, request.headers.get(CONVERSATION_HEADER))
    if body.stream:
        return StreamingResponse(framed(state.chat.stream(body, run)),
                                 media_type="text/event-stream")
    return await state.chat.respond(body, run)
