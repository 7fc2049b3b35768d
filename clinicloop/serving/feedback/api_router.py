"""Route for POST /v1/feedback: the caller's key (any key that may call /v1), then the handler."""

from __future__ import annotations

from fastapi import APIRouter, Request

from clinicloop.serving.feedback.protocol import FeedbackRequest, FeedbackResponse

router = APIRouter()


@router.post("/v1/feedback")
async def create_feedback(body: FeedbackRequest, request: Request) -> FeedbackResponse:
    caller = request.app.state.keys.caller(request)
    return await request.app.state.feedback.rate(body, caller)
