"""Route for /v1/models: the served model and its versions, in OpenAI's list shape.

As vLLM lists a base model and its LoRA adapters: the served model id first (the root version,
`root` its file), then one card per derived version, `<served>@<version>`, whose `parent` is the
card of the version it was trained from and `root` its own file.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from clinicloop.backends.registry import RegistryState
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
    cards: list[ModelCard] = []
    if state.versions is not None:  # empty until the first start registers the base version
        registry = await asyncio.to_thread(state.versions.registry.read)
        cards = version_cards(engine.model_name, registry)
    return ModelList(data=cards or [ModelCard(id=engine.model_name, root=engine.model_version)])


def version_cards(served: str, registry: RegistryState) -> list[ModelCard]:
    def card_id(version_id: str) -> str:
        return served if registry.versions[version_id].parent is None else f"{served}@{version_id}"

    return [
        ModelCard(id=card_id(v.id), created=int(v.created_at.timestamp()),
                  root=str(v.lora_path or v.model_path),
                  parent=None if v.parent is None else card_id(v.parent))
        for v in registry.ordered()
    ]
