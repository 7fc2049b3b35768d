"""Route for /v1/models: the served model, in OpenAI's list shape."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from clinicloop.serving.protocol import now

router = APIRouter()


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "clinicloop"
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    state = request.app.state
    state.keys.caller(request)
    engine = state.services.engine
    return ModelList(data=[ModelCard(id=engine.model_name, root=engine.model_version)])
