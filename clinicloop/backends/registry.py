"""The model registry: which model versions exist, which one is active, the canary and the history.

`Registry` holds the rules (what may be registered, activated, rolled back, removed); where the
state lives is its storage, chosen by `registry.storage` (`open_registry`):

- `FileStorage`: one JSON file (`registry.json` under the configured directory), for one machine.
  The RL refresh job publishes versions into it from its own process while the server changes
  what is served, so every change is a read-modify-write under an exclusive `fcntl` lock on a
  sibling lock file, and the file is replaced atomically (temp file, fsync, rename, fsync of the
  directory): a reader without the lock always sees one whole state, and a crash leaves either
  the old state or the new one. The sticky conversation pins stay in each process's memory.
- `StoreStorage`: one row of the conversation store (`store/registry_state.py`), shared by every
  gateway replica and job on that store, changed in one transaction with the row locked; the
  sticky pins live in the store too, so every replica routes a conversation alike.

Each storage has a cheap `stamp` that changes with every write, which a replica polls to follow
changes made elsewhere.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import tempfile
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from clinicloop.config import BackendKind, RegistrySettings
from clinicloop.store.db import Store
from clinicloop.store.registry_state import RegistryStateTable, StickyPins

log = logging.getLogger(__name__)

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


#: Registry files written before the backend kinds were one vocabulary named a version's kind.
_LEGACY_KINDS = {"gguf": "llamacpp", "lora": "llamacpp", "upstream": "openai",
                 "vllm_lora": "openai"}


class Version(BaseModel):
    """One servable model: `model_path` (the base) with, for an adapter version, `lora_path` on
    top. On `llamacpp` the base is a GGUF file and the adapter a llama.cpp LoRA GGUF, loaded at
    run time onto the one base in memory; on `vllm` / `openai` the base is the upstream's model
    id (what vLLM was given) and the adapter a peft directory the upstream loads at run time
    (`/v1/load_lora_adapter`)."""

    id: str
    parent: str | None
    backend: BackendKind
    model_path: Path
    lora_path: Path | None = None
    #: The peft adapter directory the LoRA was made from (on vLLM, `lora_path` itself): what a
    #: refresh goes on training.
    adapter_dir: Path | None = None
    #: The HF weights of the base, which the RL refresh trains (with `adapter_dir` as the
    #: starting adapter); None if unknown.
    hf_dir: Path | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @model_validator(mode="before")
    @classmethod
    def _legacy_kind(cls, data: Any) -> Any:
        if isinstance(data, dict) and "kind" in data and "backend" not in data:
            data = dict(data)
            data["backend"] = _LEGACY_KINDS.get(data.pop("kind"), "unknown")
        return data

    @model_validator(mode="after")
    def _check(self) -> Version:
        if not _ID.match(self.id):
            raise ValueError(f"version id {self.id!r} must match {_ID.pattern}")
        return self

    @property
    def base_is_file(self) -> bool:
        """The base is a local file (a GGUF), not a model an upstream serves."""
        return self.backend == "llamacpp"

    def same_artifact(self, other: Version) -> bool:
        return (self.parent, self.backend, self.model_path, self.lora_path) == (
            other.parent, other.backend, other.model_path, other.lora_path)


class VersionSpec(BaseModel):
    """A version to publish (the admin API's body, the refresh job's record); its files must
    already exist where the server can read them."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, description="Default: the next free `v<n>`.")
    parent: str
    backend: BackendKind | None = Field(
        None, description="What serves it; default: the server's engine kind.")
    model_path: Path = Field(description="The base: a GGUF on `llamacpp` (a whole model, or the "
                                         "base a LoRA applies to), the upstream's model id on "
                                         "`vllm` / `openai`.")
    lora_path: Path | None = Field(None, description="An adapter on the base: a llama.cpp LoRA "
                                   "GGUF, or on an upstream the peft directory it loads.")
    adapter_dir: Path | None = Field(None, description="The peft adapter the LoRA was made from.")
    hf_dir: Path | None = Field(None, description="The HF weights of the base.")
    metrics: dict[str, Any] = Field(default_factory=dict)

    def register_in(self, registry: Registry, backend: BackendKind) -> Version:
        """Register it; `backend` is the kind to record when the spec names none."""
        return registry.register(parent=self.parent, backend=self.backend or backend,
                                 model_path=self.model_path, lora_path=self.lora_path,
                                 adapter_dir=self.adapter_dir, hf_dir=self.hf_dir,
                                 metrics=self.metrics, version_id=self.id)


class Canary(BaseModel):
    version: str
    share: float = Field(ge=0.0, le=1.0)


class Activation(BaseModel):
    version: str
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))


#: How many registry events the state keeps (the oldest are dropped).
MAX_EVENTS = 500
EventKind = Literal["register", "activate", "canary", "canary_cleared", "rollback", "remove"]


class RegistryEvent(BaseModel):
    """One change to the registry, for people to read (the console's version page)."""

    kind: EventKind
    version: str | None = None
    share: float | None = None
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
    #: Every change, newest last (at most `MAX_EVENTS`); states written before it have none.
    events: list[RegistryEvent] = Field(default_factory=list)

    def record(self, kind: EventKind, version: str | None = None,
               share: float | None = None) -> None:
        """Append an event, dropping the oldest beyond `MAX_EVENTS`."""
        self.events.append(RegistryEvent(kind=kind, version=version, share=share))
        del self.events[:-MAX_EVENTS]

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


class RegistryStorage(Protocol):
    """Where a registry's state lives."""

    #: Where that is, for messages.
    location: str
    #: The shared sticky pins, when the state is shared (None: each process keeps its own).
    pins: StickyPins | None

    def read(self) -> RegistryState: ...

    def update(self, change: Callable[[RegistryState], T]) -> T:
        """Apply `change` to the state and write it, atomically with respect to other writers;
        nothing is written if `change` raises."""
        ...

    def stamp(self) -> Hashable:
        """Changes with every write: cheap enough to poll."""
        ...


class Registry:
    """The registry's rules over a storage; a directory means `FileStorage` there."""

    def __init__(self, storage: RegistryStorage | Path) -> None:
        self.storage = FileStorage(storage) if isinstance(storage, Path) else storage

    @property
    def location(self) -> str:
        return self.storage.location

    @property
    def pins(self) -> StickyPins | None:
        return self.storage.pins

    def read(self) -> RegistryState:
        return self.storage.read()

    def stamp(self) -> Hashable:
        return self.storage.stamp()

    def get(self, version_id: str) -> Version:
        return self.read().version(version_id)

    def list(self) -> list[Version]:
        return self.read().ordered()

    def register(self, *, parent: str, backend: BackendKind, model_path: Path,
                 lora_path: Path | None = None, adapter_dir: Path | None = None,
                 hf_dir: Path | None = None, metrics: dict[str, Any] | None = None,
                 version_id: str | None = None) -> Version:
        """Add a version whose files exist. Registering the same id with the same files again
        returns the stored version, so a publisher that crashed after registering can re-run.
        Only `bootstrap` adds a version without a parent."""
        def change(state: RegistryState) -> Version:
            vid = version_id or _next_id(state)
            try:
                version = Version(id=vid, parent=parent, backend=backend, model_path=model_path,
                                  lora_path=lora_path, adapter_dir=adapter_dir, hf_dir=hf_dir,
                                  metrics=metrics or {})
            except ValidationError as exc:
                raise RegistryError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
            version = _with_checked_files(version)
            if vid in state.versions:
                if state.versions[vid].same_artifact(version):
                    return state.versions[vid]
                raise VersionConflict(f"version {vid!r} is already registered with other files")
            state.version(parent)
            state.versions[vid] = version
            state.record("register", vid)
            return version

        return self._update(change)

    def bootstrap(self, backend: BackendKind, model_path: Path, model_name: str,
                  hf_dir: Path | None = None) -> RegistryState:
        """On an empty registry, register `model_path` as the base version and activate it."""
        def change(state: RegistryState) -> RegistryState:
            if state.active is None:
                state.model_name = model_name
                state.versions[BASE_ID] = _with_checked_files(Version(
                    id=BASE_ID, parent=None, backend=backend, model_path=model_path,
                    hf_dir=hf_dir))
                state.active = BASE_ID
                state.history.append(Activation(version=BASE_ID))
                state.record("register", BASE_ID)
                state.record("activate", BASE_ID)
            return state

        return self._update(change)

    def activate(self, version_id: str) -> Version:
        def change(state: RegistryState) -> Version:
            version = state.version(version_id)
            if state.active != version_id:
                state.active = version_id
                state.history.append(Activation(version=version_id))
                state.record("activate", version_id)
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
            state.record("canary", version_id, share)
            return state.canary

        return self._update(change)

    def clear_canary(self) -> None:
        def change(state: RegistryState) -> None:
            if state.canary is not None:
                state.record("canary_cleared", state.canary.version)
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
            state.record("rollback", previous.id)
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
            state.record("remove", version_id)
            return version

        return self._update(change)

    def _update(self, change: Callable[[RegistryState], T]) -> T:
        return self.storage.update(change)


class FileStorage:
    """`registry.json` in `directory` (see the module docstring)."""

    pins = None

    def __init__(self, directory: Path) -> None:
        self.path = directory / "registry.json"
        self._lock_path = directory / "registry.lock"
        self.location = str(directory)

    def read(self) -> RegistryState:
        if not self.path.exists():
            return RegistryState()
        return RegistryState.model_validate_json(self.path.read_bytes())

    def stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size  # every write is a new file (a rename)

    def update(self, change: Callable[[RegistryState], T]) -> T:
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


class StoreStorage:
    """The `registry_state` row named "default" in `store`, and the store's sticky pins.

    On first use it brings the store's schema up to date (the tables may not exist yet when a
    replica or job starts), and if there is no row yet but `directory` holds a `registry.json`
    (a single-machine registry), that state is imported as the row's first revision, so an
    existing registry moves into the store unchanged."""

    def __init__(self, store: Store, directory: Path) -> None:
        self.table = RegistryStateTable(store)
        self.pins = StickyPins(store)
        self._directory = directory
        self._ready = False
        self.location = f"the store's registry_state ({store.dialect})"

    def read(self) -> RegistryState:
        self._prepare()
        return _parse(self.table.read())

    def stamp(self) -> int | None:
        self._prepare()
        return self.table.revision()

    def update(self, change: Callable[[RegistryState], T]) -> T:
        self._prepare()

        def apply(text: str) -> tuple[str, T]:
            state = _parse(text)
            result = change(state)
            return state.model_dump_json(), result

        return self.table.update(apply)

    def _prepare(self) -> None:
        if self._ready:
            return
        self.table.store.migrate()
        if self.table.revision() is None:
            legacy = FileStorage(self._directory)
            if self.table.create(legacy.read().model_dump_json()) and legacy.path.exists():
                log.info("registry imported into the store from %s", legacy.path)
        self._ready = True


def _parse(text: str | None) -> RegistryState:
    return RegistryState() if text is None else RegistryState.model_validate_json(text)


def open_registry(settings: RegistrySettings, store_url: str) -> Registry:
    """The registry where `settings.storage` says: `file` (`settings.dir`), `store` (the store at
    `store_url`), or `auto`: the store when it is Postgres (several replicas), else the file."""
    storage = settings.storage
    if storage == "auto":
        storage = "store" if store_url.startswith("postgresql") else "file"
    if storage == "file":
        return Registry(settings.dir)
    # Registry writes are rare and must survive power loss, as the file's fsyncs ensure.
    return Registry(StoreStorage(Store(store_url, sqlite_synchronous="FULL"), settings.dir))


def _with_checked_files(version: Version) -> Version:
    """`version` with its local paths resolved, once they exist: the base GGUF and LoRA GGUF on
    llama.cpp; on an upstream the adapter must be a peft directory (its base is a model id)."""
    if version.base_is_file:
        for path in (version.model_path, version.lora_path):
            if path is not None and not path.is_file():
                raise RegistryError(f"file not found: {path}")
    elif version.lora_path is not None and not (version.lora_path / "adapter_config.json"
                                                ).is_file():
        raise RegistryError(f"not a peft adapter directory: {version.lora_path}")
    update: dict[str, Path] = {}
    for field in ("lora_path", "adapter_dir", "hf_dir") + (("model_path",)
                                                           if version.base_is_file else ()):
        path = getattr(version, field)
        if path is not None:
            update[field] = path.resolve()
    return version.model_copy(update=update)


def _next_id(state: RegistryState) -> str:
    n = len(state.versions)
    while f"v{n}" in state.versions:
        n += 1
    return f"v{n}"
