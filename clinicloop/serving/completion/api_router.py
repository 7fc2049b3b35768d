"""Route for /v1/completions: auth, then the handler; nothing else."""

from __future__ import annotations

from fastapi import APIRouter, Request

from clinicloop.serving.completion.protocol import CompletionRequest
from clinicloop.serving.sse import serve

router = APIRouter()


@router.post("/v1/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request):
    return await serve(request.app.state.completion, body, request)
