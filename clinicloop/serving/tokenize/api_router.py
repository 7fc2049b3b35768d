"""Routes for POST /tokenize and /detokenize (at the root, as vLLM serves them): a client key,
then the handler."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from clinicloop.serving.tokenize.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)


def _client(request: Request) -> None:
    # Outside /v1, so `KeyCheck` does not guard these paths; a dependency runs before the body
    # is validated, so a caller without a key gets its 401 first.
    request.app.state.keys.caller(request)


router = APIRouter(dependencies=[Depends(_client)])


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    return await request.app.state.tokenize.tokenize(body)


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    return await request.app.state.tokenize.detokenize(body)
