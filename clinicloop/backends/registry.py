"""The model registry: which model versions exist, which one is active, the canary and the history.

One JSON file (`registry.json` under the configured directory) holds it all. The RL refresh job
publishes versions into it from its own process while the server changes what is served, so every
change is a read-modify-write under an exclusive `fcntl` lock on a sibling lock file, and the file
is replaced atomically (temp file, fsync, rename, fsync of the directory): a reader without the
lock always sees one whole state, and a crash leaves either the old state or the new one.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError, model_validator

BASE_ID = "base"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

T = TypeVar("T")


class RegistryError(Exception):
    """A change the registry refuses (bad paths, bad share, nothing to roll back to)."""


class UnknownVersion(RegistryError):
    pass


class VersionConflict(RegistryError):
    """The id is taken by a different version."""


class VersionInUse(RegistryError):
    """The version cannot be removed: it serves, is the canary, or other versions descend
    from it."""


#: `gguf`: `model_path` is the whole model; `lora`: `lora_path` is a llama.cpp LoRA adapter GGUF
#: applied on top of the base GGUF at `model_path`. On an OpenAI-compatible upstream (vLLM):
#: `upstream`: the model the upstream serves as it is, `model_path` being its id there (what vLLM
#: was given: a directory or hub id); `vllm_lora`: `lora_path` is a peft adapter directory that
#: vLLM loads at runtime (`/v1/load_lora_adapter`) on top of that model.
Kind = Literal["gguf", "lora", "upstream", "vllm_lora"]
LORA_KINDS = ("lora", "vllm_lora")
UPSTREAM_KINDS = ("upstream", "vllm_lora")


class Version(BaseModel):
    id: str
    parent: str | None
    kind: Kind
    model_path: Path
    lora_path: Path | None = None
    #: The HF weights the GGUF was exported from, which the RL refresh trains; None if unknown.
    hf_dir: Path | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @model_validator(mode="after")
    def _check(self) -> Version:
        if not _ID.match(self.id):
            raise ValueError(f"version id {self.id!r} must match {_ID.pattern}")
        if (self.kind in LORA_KINDS) != (self.lora_path is not None):
            raise ValueError(f"a `{self.kind}` version " + (
                "needs lora_path" if self.kind in LORA_KINDS else "takes no lora_path"))
        return self

    def same_artifact(self, other: Version) -> bool:
        return (self.parent, self.kind, self.model_path, self.lora_path) == (
            other.parent, other.kind, other.model_path, other.lora_path)


class Canary(BaseModel):
    version: str
    share: float = Field(ge=0.0, le=1.0)


class Activation(BaseModel):
    version: str
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class RegistryState(BaseModel):
    versions: dict[str, Version] = Field(default_factory=dict)
    active: str | None = None
    canary: Canary | None = None
    #: Activations, oldest first; the last is the active version. `rollback` pops it, so repeated
    #: rollbacks walk further back rather than flip between two versions.
    history: list[Activation] = Field(default_factory=list)
    #: The model id clients see, fixed when the base was registered, so it survives restarts.
    model_name: str | None = None

    def version(self, version_id: str) -> Version:
        try:
            return self.versions[version_id]
        except KeyError:
            raise UnknownVersion(f"no version {version_id!r} in the registry") from None

    def ordered(self) -> list[Version]:
        """Oldest first, so the root version (the first one registered) leads."""
        return sorted(self.versions.values(), key=lambda v: v.created_at)

    def previous(self) -> Version | None:
        """What `rollback` would activate."""
        return self.versions[self.history[-2].version] if len(self.history) > 1 else None


class Registry:
    def __init__(self, directory: Path) -> None:
        self.path = directory / "registry.json"
        self._lock_path = directory / "registry.lock"

    def read(self) -> RegistryState:
        if not self.path.exists():
            return RegistryState()
        return RegistryState.model_validate_json(self.path.read_bytes())

    def get(self, version_id: str) -> Version:
        return self.read().version(version_id)

    def list(self) -> list[Version]:
        return self.read().ordered()

    def register(self, *, parent: str, kind: Kind, model_path: Path,
                 lora_path: Path | None = None, hf_dir: Path | None = None,
                 metrics: dict[str, Any] | None = None, version_id: str | None = None) -> Version:
        """Add a version whose files exist. Registering the same id with the same files again
        returns the stored version, so a publisher that crashed after registering can re-run.
        Only `bootstrap` adds a version without a parent."""
        if kind in UPSTREAM_KINDS:
            # The upstream's model is its id there; an adapter is a peft directory.
            if lora_path is not None and not (lora_path / "adapter_config.json").is_file():
                raise RegistryError(f"not a peft adapter directory: {lora_path}")
        else:
            for path in (model_path, lora_path):
                if path is not None and not path.is_file():
                    raise RegistryError(f"file not found: {path}")
            model_path = model_path.resolve()

        def change(state: RegistryState) -> Version:
            vid = version_id or _next_id(state)
            try:
                version = Version(
                    id=vid, parent=parent, kind=kind, model_path=model_path,
                    lora_path=None if lora_path is None else lora_path.resolve(),
                    hf_dir=None if hf_dir is None else hf_dir.resolve(), metrics=metrics or {})
            except ValidationError as exc:
                raise RegistryError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
            if vid in state.versions:
                if state.versions[vid].same_artifact(version):
                    return state.versions[vid]
                raise VersionConflict(f"version {vid!r} is already registered with other files")
            state.version(parent)
            state.versions[vid] = version
            return version

        return self._update(change)

    def bootstrap(self, model_path: Path, model_name: str, hf_dir: Path | None = None,
                  kind: Literal["gguf", "upstream"] = "gguf") -> RegistryState:
        """On an empty registry, register `model_path` as the base version and activate it."""
        def change(state: RegistryState) -> RegistryState:
            if state.active is None:
                state.model_name = model_name
                path = model_path.resolve() if kind == "gguf" else model_path
                state.versions[BASE_ID] = Version(
                    id=BASE_ID, parent=None, kind=kind, model_path=path,
                    hf_dir=None if hf_dir is None else hf_dir.resolve())
                state.active = BASE_ID
                state.history.append(Activation(version=BASE_ID))
            return state

        return self._update(change)

    def activate(self, version_id: str) -> Version:
        def change(state: RegistryState) -> Version:
            version = state.version(version_id)
            if state.active != version_id:
                state.active = version_id
                state.history.append(Activation(version=version_id))
            if state.canary is not None and state.canary.version == version_id:
                state.canary = None  # promoted
            return version

        return self._update(change)

    def set_canary(self, version_id: str, share: float) -> Canary:
        def change(state: RegistryState) -> Canary:
            state.version(version_id)
            if version_id == state.active:
                raise RegistryError(f"version {version_id!r} is already active")
            state.canary = Canary(version=version_id, share=share)
            return state.canary

        return self._update(change)

    def clear_canary(self) -> None:
        def change(state: RegistryState) -> None:
            state.canary = None

        self._update(change)

    def rollback(self, *, expect: str | None = None) -> Version:
        """Re-activate the version active before the current one. `expect`: refuse unless that is
        the version it would restore (the caller loaded it first)."""
        def change(state: RegistryState) -> Version:
            previous = state.previous()
            if previous is None:
                raise RegistryError("no earlier version to roll back to")
            if expect is not None and previous.id != expect:
                raise VersionConflict(f"the registry changed: rollback now goes to {previous.id!r}")
            state.history.pop()
            state.active = previous.id
            if state.canary is not None and state.canary.version == previous.id:
                state.canary = None
            return previous

        return self._update(change)

    def remove(self, version_id: str) -> Version:
        """Take a version out of the registry (its files stay where they are). Refused for the
        active version, the canary, and a version others name as parent (the root among them);
        its activations leave the history, so a rollback never lands on it."""
        def change(state: RegistryState) -> Version:
            version = state.version(version_id)
            children = sorted(v.id for v in state.versions.values() if v.parent == version_id)
            if version_id == state.active:
                raise VersionInUse(f"version {version_id!r} is active: activate or roll back to "
                                   "another first")
            if state.canary is not None and state.canary.version == version_id:
                raise VersionInUse(f"version {version_id!r} is the canary: clear it first")
            if version.parent is None:
                raise VersionInUse(f"version {version_id!r} is the registry's base")
            if children:
                raise VersionInUse(f"version {version_id!r} is the parent of "
                                   f"{', '.join(children)}: remove those first")
            del state.versions[version_id]
            history: list[Activation] = []
            for activation in state.history:
                if activation.version != version_id and (
                        not history or history[-1].version != activation.version):
                    history.append(activation)
            state.history = history
            return version

        return self._update(change)

    def _update(self, change: Callable[[RegistryState], T]) -> T:
        with self._locked():
            state = self.read()
            result = change(state)
            self._write(state)
        return result

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self._lock_path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, state: RegistryState) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".registry-", suffix=".json", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(state.model_dump_json(indent=2))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        # The rename is durable only once the directory entry is.
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _next_id(state: RegistryState) -> str:
    n = len(state.versions)
    while f"v{n}" in state.versions:
        n += 1
    return f"v{n}"
