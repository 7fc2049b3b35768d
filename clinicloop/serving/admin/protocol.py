"""Request and response bodies of the admin version routes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from clinicloop.backends.registry import Activation, Canary, Kind, Registry, Version


class RegisterRequest(BaseModel):
    """A version to publish; the files must already exist where the server can read them."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, description="Default: the next free `v<n>`.")
    parent: str
    kind: Kind = "gguf"
    model_path: Path = Field(description="The whole GGUF, or for `lora` the base GGUF; on a vLLM "
                                         "upstream the base model's id there.")
    lora_path: Path | None = Field(None, description="`lora`: the llama.cpp LoRA adapter GGUF; "
                                   "`vllm_lora`: the peft adapter directory vLLM loads.")
    hf_dir: Path | None = Field(None, description="The HF weights the model was made from.")
    metrics: dict[str, Any] = Field(default_factory=dict)

    def register_in(self, registry: Registry) -> Version:
        return registry.register(parent=self.parent, kind=self.kind, model_path=self.model_path,
                                 lora_path=self.lora_path, hf_dir=self.hf_dir,
                                 metrics=self.metrics, version_id=self.id)


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
