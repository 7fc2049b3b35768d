"""Request and response bodies of the admin version routes (a version to register is the
registry's `VersionSpec`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from clinicloop.backends.registry import Activation, Canary, Version


class CanaryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str
    share: float = Field(ge=0.0, le=1.0, description="Fraction of new conversations it gets.")


class LoadedVersion(BaseModel):
    id: str
    in_flight: int


class VersionList(BaseModel):
    """The registry's versions and what the server serves now."""

    object: Literal["list"] = "list"
    data: list[Version]
    active: str | None
    canary: Canary | None
    loaded: list[LoadedVersion]
    history: list[Activation]
    memory: dict[str, Any] = Field(
        description="Process RSS, the shared bases' bytes, and per loaded version what it holds "
                    "beyond them (its KV cache, its adapter); empty where the engine cannot tell.")
