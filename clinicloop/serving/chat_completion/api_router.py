"""Route for /v1/chat/completions: auth, then the handler; nothing else."""

from __future__ import annotations

from fastapi import APIRouter, Request

from clinicloop.serving.chat_completion.protocol import ChatCompletionRequest
from clinicloop.serving.sse import serve

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    return await serve(request.app.state.chat, body, request)
