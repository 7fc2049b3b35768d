"""One object per backend kind: what the rest of the project asks of "whatever serves the model".

`open_backend(settings, models_dir)` picks the object for `engine.kind` (`llamacpp`, `vllm`,
`openai`, the one vocabulary of config, CLI and registry). Each object knows how to start and
stop what it needs (a launched vLLM, a connection to an upstream), register the configured model
as the registry's base, refuse a registry or files it cannot serve, open one `Engine` per model
version (a base, or a LoRA adapter on it) and report its memory. Serving (`serving/versions.py`)
and the RL refresh (`rl/refresh.py`) call these methods; neither asks which kind it has.

- `llamacpp`: versions of one base share its weights in memory. The first engine loads the GGUF;
  every later version opens its own context (KV cache, scheduler) on those weights, with its LoRA
  applied at run time (`LlamaCppEngine(..., base=...)`). A version whose base is another GGUF (a
  merged publish) loads that file once and shares it the same way.
- `openai`: an OpenAI-compatible upstream already running; a version is one of its model ids, an
  adapter version a LoRA it loads at run time (`/v1/load_lora_adapter`), so a swap starts no
  process. The gateway admits 64 requests at once and leaves batching to the upstream.
- `vllm`: the same, with the upstream launched and supervised by clinicloop with the flags the
  memory plan computed (`vllm_launch.py`); the gateway admits the sequences vLLM runs at once
  (`engine.n_parallel`, the planned `--max-num-seqs`) and queues the rest.

A maintenance window frees what a backend holds on the accelerator as its `release_mode` says:
`stop` (its owner closes the version engines, then `close`; `start` again after: llama.cpp frees
its bases, a launched upstream's process group is stopped and launched again), `sleep` (a vLLM
launched with `engine.vllm_sleep_mode` sleeps and wakes in place: `release`, `restore`), or
`kept` (an upstream clinicloop did not launch: nothing here can be freed).
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
import shutil
from pathlib import Path
from typing import Any, ClassVar, Literal

from clinicloop.backends.artifacts import check_gguf_file, check_peft_adapter, probe_llamacpp
from clinicloop.backends.base import Engine
from clinicloop.backends.llamacpp import LlamaCppEngine, LlamaCppModel
from clinicloop.backends.openai_upstream import OpenAIUpstreamEngine, UpstreamModel
from clinicloop.backends.registry import Registry, RegistryError, RegistryState, Version
from clinicloop.config import BackendKind, EngineSettings
from clinicloop.model.gguf_export import write_lora_gguf

log = logging.getLogger(__name__)

#: What a plain OpenAI-compatible upstream is sent at once; its own scheduler batches them.
UPSTREAM_CONCURRENCY = 64

#: How a maintenance window frees the accelerator (see the module docstring).
ReleaseMode = Literal["sleep", "stop", "kept"]


class Backend(abc.ABC):
    kind: ClassVar[BackendKind]
    #: Registry kinds whose versions this backend serves.
    serves: ClassVar[frozenset[str]]

    def __init__(self, settings: EngineSettings, models_dir: Path) -> None:
        self.settings = settings
        self.models_dir = models_dir

    @property
    @abc.abstractmethod
    def max_concurrency(self) -> int:
        """Requests the gateway lets run at once over all versions; the rest queue."""

    async def start(self) -> None:
        """Start what every version needs (a launched or connected upstream)."""
        return None

    @abc.abstractmethod
    async def bootstrap(self, registry: Registry) -> RegistryState:
        """After `start`: on an empty registry register the configured model as `base` (and
        activate it). Returns the registry's state; refuses (`RegistryError`) a registry made
        for a model this backend does not serve."""

    @abc.abstractmethod
    async def open_version(self, version: Version, model_name: str, *,
                           own_adapter: bool = True) -> Engine:
        """A started engine serving `version` under the public `model_name`. `own_adapter`
        False: closing it leaves an upstream's adapter loaded (it may be serving elsewhere
        under the same name)."""

    @abc.abstractmethod
    def publish_adapter(self, adapter_dir: Path, base_hf_dir: Path, out: Path) -> None:
        """Write into the new directory `out` what this backend loads as a version's adapter
        made from the trained peft adapter `adapter_dir` (on `base_hf_dir`): the peft
        directory itself as `out/adapter` (what a later refresh goes on training), and
        `published_adapter(out)`."""

    @abc.abstractmethod
    def published_adapter(self, out: Path) -> Path:
        """The adapter a version's `lora_path` names, in a directory `publish_adapter` wrote."""

    @classmethod
    @abc.abstractmethod
    async def check_files(cls, model_path: Path, lora_path: Path | None) -> None:
        """Refuse (`VersionFilesError`) files this backend could not serve, before they are
        registered."""

    async def close(self) -> None:
        """Stop what `start` started; the version engines are closed by their owner first."""
        return None

    def memory(self) -> dict[str, Any]:
        """What is shared by the loaded versions (each engine reports its own part)."""
        return {}

    @property
    def release_mode(self) -> ReleaseMode:
        """How a maintenance window frees what this backend holds on the accelerator."""
        return "stop"

    async def release(self) -> None:
        """Free in place what `release_mode` frees without closing anything (a vLLM's sleep).
        Nothing here otherwise: under `stop` the owner closes the version engines and then
        this backend; under `kept` nothing can be freed."""
        return None

    async def restore(self, engines: list[Engine]) -> None:
        """Undo `release` when the version engines were left open (`sleep`, `kept`), so that
        `engines` serve as they did."""
        return None

    def check_serves(self, version: Version) -> None:
        if version.backend not in self.serves:
            raise RegistryError(f"a `{version.backend}` version cannot be served by the "
                                f"{self.kind} engine")


class LlamaCppBackend(Backend):
    kind = "llamacpp"
    serves = frozenset({"llamacpp"})

    def __init__(self, settings: EngineSettings, models_dir: Path) -> None:
        super().__init__(settings, models_dir)
        #: Loaded bases by resolved GGUF path; dropped once closed (no engine uses it).
        self._bases: dict[Path, LlamaCppModel] = {}
        #: The engine `start` loaded for the configured model, handed to the version it serves.
        self._first: LlamaCppEngine | None = None

    @property
    def max_concurrency(self) -> int:
        return self.settings.n_parallel

    async def bootstrap(self, registry: Registry) -> RegistryState:
        state = await asyncio.to_thread(registry.read)
        if state.active is not None:
            root = next(v for v in state.versions.values() if v.parent is None)
            configured = self.settings.model_path
            if configured is not None and configured.resolve() != root.model_path:
                log.warning("engine.model_path differs from the registry's base (%s): serving "
                            "the registry's versions; move %s away to start from the configured "
                            "model", root.model_path, registry.location)
            return state
        # First start: the configured model (possibly the tiny one, built now) becomes `base`.
        first = await self._started(self.settings, None)
        assert first.model_path is not None
        state = await asyncio.to_thread(registry.bootstrap, self.kind, first.model_path,
                                        first.model_name, first.hf_dir)
        active = state.version(state.active or "")
        if active.lora_path is None and active.model_path == first.model_path.resolve():
            self._first = first
        else:  # another process bootstrapped the registry first
            await first.close()
        return state

    async def open_version(self, version: Version, model_name: str, *,
                           own_adapter: bool = True) -> Engine:
        self.check_serves(version)
        first, self._first = self._first, None
        if first is not None and version.lora_path is None and (
                version.model_path == (first.model_path or Path()).resolve()):
            first.model_name = model_name
            assert first.base is not None
            self._bases[version.model_path] = first.base
            return first
        if first is not None:
            await first.close()
        # Held while the engine starts, so the last other user cannot free it meanwhile.
        held = self._loaded_base(version.model_path)
        try:
            engine = await self._started(self.settings.model_copy(update={
                "model_path": version.model_path, "lora_path": version.lora_path,
                "hf_dir": version.hf_dir, "served_model_name": model_name}), held)
        finally:
            if held is not None:
                await asyncio.to_thread(held.release)
        assert engine.base is not None
        self._bases[version.model_path] = engine.base
        return engine

    def _loaded_base(self, path: Path) -> LlamaCppModel | None:
        """The loaded base at `path` with one more reference, or None if none is loaded."""
        base = self._bases.get(path)
        if base is not None and base.refs > 0:
            return base.share()
        self._bases.pop(path, None)
        return None

    async def _started(self, settings: EngineSettings, base: LlamaCppModel | None
                       ) -> LlamaCppEngine:
        engine = LlamaCppEngine(settings, self.models_dir, base=base)
        try:
            await engine.start()
        except BaseException:
            await engine.close()  # its worker thread
            raise
        return engine

    def publish_adapter(self, adapter_dir: Path, base_hf_dir: Path, out: Path) -> None:
        shutil.copytree(adapter_dir, out / "adapter")
        write_lora_gguf(out / "adapter", base_hf_dir, self.published_adapter(out))

    def published_adapter(self, out: Path) -> Path:
        return out / "adapter.gguf"

    @classmethod
    async def check_files(cls, model_path: Path, lora_path: Path | None) -> None:
        await asyncio.to_thread(check_gguf_file, model_path, "model")
        if lora_path is not None:
            await asyncio.to_thread(check_gguf_file, lora_path, "LoRA")
        await probe_llamacpp(model_path, lora_path)

    async def close(self) -> None:
        first, self._first = self._first, None
        if first is not None:
            await first.close()

    def memory(self) -> dict[str, Any]:
        return {"rss_bytes": rss_bytes(),
                "bases": {str(p): b.file_bytes for p, b in self._bases.items() if b.refs}}


class OpenAIBackend(Backend):
    kind = "openai"
    serves = frozenset({"openai", "vllm"})  # a vLLM is an OpenAI-compatible upstream

    def __init__(self, settings: EngineSettings, models_dir: Path) -> None:
        super().__init__(settings, models_dir)
        #: The upstream every version is served by, started first.
        self.upstream = OpenAIUpstreamEngine(settings, max_concurrency=self.max_concurrency)

    @property
    def max_concurrency(self) -> int:
        return UPSTREAM_CONCURRENCY

    async def start(self) -> None:
        await self.upstream.start()  # launches and waits for a managed upstream

    async def bootstrap(self, registry: Registry) -> RegistryState:
        upstream = self.upstream
        assert upstream.upstream_model is not None
        state = await asyncio.to_thread(registry.read)
        if state.active is None:
            state = await asyncio.to_thread(
                registry.bootstrap, self.kind, Path(upstream.upstream_model),
                upstream.model_name, self.settings.hf_dir)
        root = next(v for v in state.versions.values() if v.parent is None)
        if root.backend not in self.serves or str(root.model_path) != upstream.upstream_model:
            raise RegistryError(
                f"the registry in {registry.location} is for {root.backend} model "
                f"{root.model_path}, the upstream serves {upstream.upstream_model}: move the "
                "registry away to start over")
        return state

    async def open_version(self, version: Version, model_name: str, *,
                           own_adapter: bool = True) -> Engine:
        self.check_serves(version)
        adapter = None if version.lora_path is None else (version.id, version.lora_path)
        engine = UpstreamModel(self.upstream, adapter, unload_on_close=own_adapter)
        engine.model_name = model_name
        await engine.start()
        return engine

    def publish_adapter(self, adapter_dir: Path, base_hf_dir: Path, out: Path) -> None:
        shutil.copytree(adapter_dir, out / "adapter")

    def published_adapter(self, out: Path) -> Path:
        return out / "adapter"

    @classmethod
    async def check_files(cls, model_path: Path, lora_path: Path | None) -> None:
        # The base is the upstream's model id; an adapter is loaded when first served.
        if lora_path is not None:
            await asyncio.to_thread(check_peft_adapter, lora_path)

    async def close(self) -> None:
        await self.upstream.close()

    @property
    def release_mode(self) -> ReleaseMode:
        return "kept" if self.upstream.supervisor is None else "stop"


class VllmBackend(OpenAIBackend):
    kind = "vllm"

    @property
    def max_concurrency(self) -> int:
        return self.settings.n_parallel

    @property
    def release_mode(self) -> ReleaseMode:
        return "sleep" if self.settings.vllm_sleep_mode else super().release_mode

    async def release(self) -> None:
        if self.release_mode == "sleep":
            await self.upstream.sleep()

    async def restore(self, engines: list[Engine]) -> None:
        if self.release_mode != "sleep":
            return
        await self.upstream.wake_up()
        # Each version loads its adapter again (`load_inplace`: harmless where it survived).
        for engine in engines:
            await engine.start()


BACKENDS: dict[str, type[Backend]] = {
    b.kind: b for b in (LlamaCppBackend, OpenAIBackend, VllmBackend)}


def open_backend(settings: EngineSettings, models_dir: Path) -> Backend:
    return BACKENDS[settings.kind](settings, models_dir)


def rss_bytes() -> int:
    """This process's resident set size, from /proc (0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
