"""The /v1/feedback handler, testable without HTTP.

A response's `id` is the id of the turn the gateway logged for it (`GenerationRun.request_id`
is both), so a rating names its turn directly. Only the key that made a response may rate it:
another key's response is "not found", exactly as a missing one, so an id reveals nothing. A turn
is found once the log writer has stored it (with `async` durability, a moment after the
response). Store calls run in a thread; a store that does not answer is a 503 to retry.
"""

from __future__ import annotations

import asyncio

from sqlalchemy.exc import SQLAlchemyError

from clinicloop.serving.auth import Caller
from clinicloop.serving.errors import OpenAIError
from clinicloop.serving.feedback.protocol import FeedbackRequest, FeedbackResponse
from clinicloop.store import reviews
from clinicloop.store.db import Store

# How long a client waits before retrying when the store is down.
_RETRY_AFTER_S = "5"


class FeedbackHandler:
    def __init__(self, store: Store, *, redact: bool) -> None:
        self.store = store
        self.redact = redact

    async def rate(self, request: FeedbackRequest, caller: Caller) -> FeedbackResponse:
        try:
            feedback = await asyncio.to_thread(self._rate, request, caller)
        except SQLAlchemyError:
            raise OpenAIError(503, "the conversation store is unavailable",
                              code="store_unavailable",
                              headers={"retry-after": _RETRY_AFTER_S}) from None
        if feedback is None:
            raise OpenAIError(404, f"Response with id '{request.response_id}' not found.",
                              param="response_id", code="response_not_found")
        return FeedbackResponse(id=feedback.id, response_id=request.response_id,
                                rating=feedback.rating)

    def _rate(self, request: FeedbackRequest, caller: Caller) -> reviews.Feedback | None:
        turn = self.store.get(request.response_id)
        if turn is None or turn.api_key_id != caller.key_id:
            return None
        return reviews.add_feedback(self.store, turn_id=turn.id, rating=request.rating,
                                    comment=request.comment, api_key_id=caller.key_id,
                                    redact=self.redact)
