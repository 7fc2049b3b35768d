"""The versioned engine: serves the registry's versions, routes each conversation, swaps safely.

`VersionedEngine` is the `Engine` the gateway talks to. It holds one started engine per loaded
version, each opened by the configured backend (`backends/kinds.py`): on llama.cpp a context on
the one loaded base with the version's LoRA applied; on an OpenAI-compatible upstream (vLLM) the
upstream's own model, or a LoRA adapter loaded into it under the version's id. Which kind it is
never matters here.

A request is routed when it is admitted (`lease`, called by the gateway once the request has a
slot): a conversation seen before stays on the version it began on (a bounded, expiring LRU
map); a new one goes to the canary with probability `share`, decided by a hash of its id so the
split is deterministic, else to the active version. The chosen version's engine then serves it.
When the registry lives in the store (several replicas), the pins do too (`registry.pins`): the
LRU map is then a cache, a conversation new to this replica claims its pin in the store (the
first replica's choice wins, so a conversation whose next turn lands on another replica stays on
its version, which is loaded there if need be), pins in use are marked used every ttl/10, and
unused ones are deleted now and then. A store that is down fails no request: the conversation
is routed by the rule above and the failure logged.
A request whose `model` names a version (`<served>@<version>` as /v1/models lists it, or the bare
version id; `resolve`) is served by that version instead, loaded first if it is not (as a change
loads it), without touching its conversation's pin.

Every change (activate, canary, rollback) loads the version it needs first; if loading fails
nothing changes and the old version keeps serving. Only then is the registry written and the
in-memory pointer moved. Requests in flight hold a reference to the engine they started on and
finish there; an engine that is no longer active, canary or pinned by a conversation is closed
once its last request ends.

Conversations pinned to a version that a rollback or a cleared canary retires are unpinned: a
version taken out of service for cause should not keep serving the conversations it began.

The registry is the source of truth even when another process writes it (`rl refresh` without
`--server-url`, another replica's admin API): the engine checks its stamp (the file's, or the
store row's revision) every `registry.follow_interval_s` and, when it changed, serves what it
names through the same steps as the admin routes (load first, then move routing), so a change
made anywhere is served here within that interval plus the time to load the version. A version
the registry names that fails to load is refused there too: the old version keeps serving and
the registry is set back.

A start that fails closes whatever it had started (a launched upstream's process group included).
Versions are registered only once their files pass `artifacts.py`'s checks.

A maintenance window (its caller drains the requests first) `suspend`s the engine to free the
accelerator for training, the backend's way (`Backend.release_mode`): `sleep` (vLLM sleeps in
place; on wake every loaded adapter is loaded again), `stop` (every version engine and what the
backend started are closed, as `close` does; `resume` starts them again as `start` does, and a
conversation pinned to a version no longer loaded starts over), or `kept` (nothing to free).
While released, requests are refused (503), changes are refused (`EngineReleased`), the
registry file is not followed, and `resume` serves what it names then.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from clinicloop.backends.base import (
    Engine,
    EngineError,
    EngineUnavailable,
    Event,
    Lease,
    ModelNotFound,
    SamplingParams,
    Tokens,
)
from clinicloop.backends.kinds import BACKENDS, ReleaseMode, open_backend
from clinicloop.backends.registry import (
    Canary,
    Registry,
    RegistryError,
    RegistryState,
    UnknownVersion,
    Version,
)
from clinicloop.config import BackendKind, Settings
from clinicloop.store.registry_state import StickyPins

log = logging.getLogger(__name__)


class VersionLoadError(Exception):
    """A version's engine failed to load; nothing was changed."""


class EngineReleased(Exception):
    """A change refused while the engine is released for maintenance (`suspend`)."""


#: Why a request is refused (503) while the engine is released.
RELEASED = "the engine is released for maintenance"

#: How long sticky pins stay local after the store failed.
_SHARED_RETRY_S = 5.0


@dataclass
class _Slot:
    version: Version
    engine: Engine
    in_flight: int = 0


@dataclass
class _Pin:
    version: str
    last_used: float
    #: When the shared pin was last marked used (monotonic).
    shared_at: float = 0.0


def canary_bucket(conversation: str) -> float:
    """A conversation's fixed point in [0, 1): below the canary share means the canary."""
    return int.from_bytes(hashlib.sha256(conversation.encode()).digest()[:8], "big") / 2.0**64


class VersionedEngine(Engine):
    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings.engine
        self.backend = open_backend(settings.engine, settings.models_dir)
        # The gateway admits this many requests over all versions: during a swap or a canary two
        # versions share the engine, the rest queue in admission (none is dropped), and a queued
        # request is routed when it starts, so after a swap it starts on the new version.
        self.max_concurrency = self.backend.max_concurrency
        self.registry = registry
        self.model_name = settings.engine.served_model_name or "loading"
        self._slots: dict[str, _Slot] = {}
        self._active: str | None = None
        self._canary: Canary | None = None
        self._pins: OrderedDict[str, _Pin] = OrderedDict()
        self._pinned: Counter[str] = Counter()
        self._max_pins = settings.registry.sticky_conversations
        self._pin_ttl_s = settings.registry.sticky_ttl_s
        self._shared = registry.pins
        #: Conversations whose shared pins are due to be marked used (by the follower).
        self._to_touch: set[str] = set()
        self._expired_at = time.monotonic()
        self._shared_retry_at = 0.0
        self._background: set[asyncio.Task[None]] = set()
        self._changing = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        #: Counters of engines already closed, so the exported totals never go down.
        self._closed_stats: Counter[str] = Counter()
        #: The versions a change is loading: kept even though nothing routes to them yet.
        self._staged: set[str] = set()
        self._follow_interval_s = settings.registry.follow_interval_s
        self._follower: asyncio.Task[None] | None = None
        self._released: ReleaseMode | None = None

    @property  # type: ignore[override]
    def model_version(self) -> str:
        return self._active or "loading"

    @property
    def active(self) -> str | None:
        return self._active

    @property
    def canary(self) -> Canary | None:
        return self._canary

    @property
    def released(self) -> ReleaseMode | None:
        """How the engine is released for maintenance; None while it serves."""
        return self._released

    def loaded(self) -> dict[str, int]:
        """Loaded version ids and the requests each is serving now."""
        return {vid: slot.in_flight for vid, slot in self._slots.items()}

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        async with self._changing:
            try:
                await self._start()
            except BaseException:
                await self._close_engines()  # a launched upstream included
                raise
        self._follower = asyncio.create_task(self._follow(), name="registry-follower")

    async def _start(self) -> None:
        await self.backend.start()
        state = await self.backend.bootstrap(self.registry)
        root = next(v for v in state.versions.values() if v.parent is None)
        if self.settings.served_model_name is None:
            self.model_name = state.model_name or root.model_path.name
        await self._serve_registry(state)

    async def _serve_registry(self, state: RegistryState) -> None:
        """Load the registry's active version (and its canary, if it still loads)."""
        active = state.version(state.active or "")
        await self._load(active)
        self._point(active.id, await self._loaded_canary(state.canary))

    async def _loaded_canary(self, canary: Canary | None) -> Canary | None:
        """`canary` once loaded; None (and cleared in the registry) if it does not load."""
        if canary is None:
            return None
        try:
            await self._load(await self._version(canary.version))
            return canary
        except (VersionLoadError, RegistryError) as exc:
            log.error("canary dropped: %s", exc)
            await asyncio.to_thread(self.registry.clear_canary)
            return None

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
            self._follower = None
        await asyncio.gather(*self._background)
        await self._close_engines()

    async def _close_engines(self) -> None:
        slots, self._slots = list(self._slots.values()), {}
        for slot in slots:
            self._closed_stats.update(slot.engine.stats())
        await asyncio.gather(*(s.engine.close() for s in slots), *self._closing)
        await self.backend.close()

    # -- maintenance --------------------------------------------------------------------------

    async def suspend(self) -> ReleaseMode:
        """Free what the served versions hold on the accelerator. The caller has drained
        requests first (none in flight). Idempotent (returns the current mode if released)."""
        async with self._changing:
            if self._released is not None:
                return self._released
            mode = self.backend.release_mode
            await self.backend.release()  # if a sleep fails, nothing was released
            # Before a stop, so that one which fails half-way can still be resumed.
            self._released = mode
            if mode == "stop":
                await self._close_engines()
        log.info("engine released for maintenance (%s)", mode)
        return mode

    async def resume(self) -> None:
        """Wake or restart, then serve what the registry names now (active + canary, loaded
        first), exactly as start does. Idempotent (no-op while serving)."""
        async with self._changing:
            mode = self._released
            if mode is None:
                return
            try:
                if mode == "stop":
                    try:
                        await self._start()
                    except BaseException:
                        await self._close_engines()  # released still: resume may be tried again
                        raise
                    for version in [v for v in self._pinned if v not in self._slots]:
                        self._unpin(version)
                else:
                    await self.backend.restore([s.engine for s in self._slots.values()])
                    await self._apply_registry()
            finally:
                self._staged.clear()
                self._retire()
            self._released = None
        log.info("engine resumed after maintenance (%s): %s active", mode, self._active)

    def memory(self) -> dict[str, Any]:
        """What the loaded versions take (the backend's account) and which are loaded."""
        return {**self.backend.memory(),
                "versions": {vid: slot.engine.memory() for vid, slot in self._slots.items()}}

    def healthy(self) -> bool:
        slot = self._slots.get(self._active or "")
        return self._released is None and slot is not None and slot.engine.healthy()

    def stats(self) -> dict[str, int]:
        total = Counter(self._closed_stats)
        for slot in self._slots.values():
            total.update(slot.engine.stats())
        return dict(total)

    def kv_cells(self) -> tuple[int, int]:
        """Summed over the loaded versions: each has a KV cache of its own."""
        cells = [slot.engine.kv_cells() for slot in self._slots.values()]
        return sum(used for used, _ in cells), sum(total for _, total in cells)

    async def _load(self, version: Version) -> _Slot:
        # A request that ends while a change is under way must not retire what it loads.
        self._staged.add(version.id)
        slot = self._slots.get(version.id)
        if slot is not None:
            return slot
        try:
            engine = await self.backend.open_version(version, self.model_name)
        except Exception as exc:
            raise VersionLoadError(
                f"version {version.id!r} failed to load: {type(exc).__name__}: {exc}") from exc
        log.info("version %s loaded from %s", version.id, version.lora_path or version.model_path)
        slot = self._slots[version.id] = _Slot(version, engine)
        return slot

    # -- changes (admin) ----------------------------------------------------------------------

    @asynccontextmanager
    async def _change(self) -> AsyncIterator[None]:
        """One change at a time, refused while released; however it ends, engines nothing
        needs any more are closed."""
        async with self._changing:
            if self._released is not None:
                raise EngineReleased(f"{RELEASED} ({self._released}); changes wait until it "
                                     "resumes")
            try:
                yield
            finally:
                self._staged.clear()
                self._retire()

    def _point(self, active: str, canary: Canary | None, retired: str | None = None) -> None:
        """Route to `active` and `canary`, both loaded. Conversations on a canary that is
        replaced or cleared (not promoted), and on a `retired` version, start over."""
        old = self._canary
        if old is not None and old.version != active and (canary is None
                                                          or canary.version != old.version):
            self._unpin(old.version, shared=True)
        if retired is not None and retired != active:
            self._unpin(retired, shared=True)
        self._active, self._canary = active, canary

    def _canary_unless(self, version_id: str) -> Canary | None:
        """The canary, unless `version_id` is it (which activating promotes)."""
        canary = self._canary
        return None if canary is not None and canary.version == version_id else canary

    async def activate(self, version_id: str) -> Version:
        async with self._change():
            slot = await self._load(await self._version(version_id))
            await asyncio.to_thread(self.registry.activate, version_id)
            self._point(version_id, self._canary_unless(version_id))
        log.info("version %s active", version_id)
        return slot.version

    async def set_canary(self, version_id: str, share: float) -> Canary:
        async with self._change():
            await self._load(await self._version(version_id))
            canary = await asyncio.to_thread(self.registry.set_canary, version_id, share)
            assert self._active is not None
            self._point(self._active, canary)
        return canary

    async def clear_canary(self) -> None:
        async with self._change():
            await asyncio.to_thread(self.registry.clear_canary)
            if self._active is not None:
                self._point(self._active, None)

    async def rollback(self) -> Version:
        async with self._change():
            previous = (await asyncio.to_thread(self.registry.read)).previous()
            if previous is None:
                raise RegistryError("no earlier version to roll back to")
            await self._load(previous)
            await asyncio.to_thread(self.registry.rollback, expect=previous.id)
            self._point(previous.id, self._canary_unless(previous.id), retired=self._active)
        log.info("rolled back to version %s", previous.id)
        return previous

    async def check_files(self, backend: BackendKind | None, model_path: Path,
                          lora_path: Path | None) -> BackendKind:
        """Refuse files this server could not serve, before they are registered:
        `VersionFilesError` naming the problem, `RegistryError` for a version of a backend kind
        this server does not serve. Returns the kind to register (default: this server's)."""
        kind = backend or self.backend.kind
        await BACKENDS[kind].check_files(model_path, lora_path)
        if kind not in self.backend.serves:
            raise RegistryError(f"a `{kind}` version cannot be served by the "
                                f"{self.backend.kind} engine")
        return kind

    async def remove(self, version_id: str) -> Version:
        """Take a version out of the registry (`Registry.remove` says which are refused) and
        out of memory: its pinned conversations start over, its engine closes once idle."""
        async with self._change():
            version = await asyncio.to_thread(self.registry.remove, version_id)
            self._unpin(version_id, shared=True)
        log.info("version %s removed", version_id)
        return version

    # -- following the registry ---------------------------------------------------------------

    async def _follow(self) -> None:
        stamp = await self._stamp()
        while True:
            await asyncio.sleep(self._follow_interval_s)
            await self._keep_pins()
            now = await self._stamp()
            if now is None or now == stamp or self._released is not None:
                continue  # while released: `resume` serves the registry as it is then
            stamp = now
            try:
                await self.follow_registry()
            except EngineReleased:
                pass  # released meanwhile: `resume` serves it
            except Exception as exc:  # the next change is tried again
                log.error("registry change not applied: %s: %s", type(exc).__name__, exc)

    async def _stamp(self) -> Any:
        """The registry's stamp; None if it cannot be read now (tried again next time)."""
        try:
            return await asyncio.to_thread(self.registry.stamp)
        except Exception as exc:  # e.g. the store is down
            log.error("registry not readable: %s", type(exc).__name__)
            return None

    async def follow_registry(self) -> None:
        """Serve the active version and canary the registry names now, if they differ from
        what is served: loaded first; an active version that does not load is refused and the
        registry set back to the version serving."""
        async with self._change():
            await self._apply_registry()

    async def _apply_registry(self) -> None:
        """`follow_registry`'s steps, under the change lock."""
        state = await asyncio.to_thread(self.registry.read)
        if state.active is None or (state.active, state.canary) == (self._active, self._canary):
            return
        try:
            await self._load(state.version(state.active))
        except (VersionLoadError, RegistryError) as exc:
            log.error("registry names %s active, which is refused: %s; %s keeps serving",
                      state.active, exc, self._active)
            await asyncio.to_thread(self._set_back, state.active)
            return
        # An activation records the version it replaces just before it; anything else
        # (a rollback) took this one out of service.
        replaced = len(state.history) > 1 and state.history[-2].version == self._active
        canary = await self._loaded_canary(state.canary)
        self._point(state.active, canary, retired=None if replaced else self._active)
        log.info("registry followed: %s active, canary %s", state.active,
                 canary and canary.version)

    def _set_back(self, refused: str) -> None:
        """Make the registry name the version serving again instead of `refused`."""
        assert self._active is not None
        state = self.registry.read()
        if state.active != refused:
            return  # it changed again: followed next time
        previous = state.previous()
        if previous is not None and previous.id == self._active:
            with contextlib.suppress(RegistryError):  # it changed again: followed next time
                self.registry.rollback(expect=self._active)
                return
        self.registry.activate(self._active)

    async def _version(self, version_id: str) -> Version:
        return (await asyncio.to_thread(self.registry.read)).version(version_id)

    # -- routing ------------------------------------------------------------------------------

    async def resolve(self, model: str | None) -> str | None:
        """The version a request's `model` pins: none for the served name (routed: active,
        canary, sticky); for a card of /v1/models, `<served>@<version>`, or a bare version id
        (ids hold no `@`, so neither form can be read as the other), that registered version.
        Anything else is `ModelNotFound`."""
        if model is None or model == self.model_name:
            return None
        if self._active is None:  # the served name is not known yet
            raise EngineUnavailable("the model is not loaded")
        versions = (await asyncio.to_thread(self.registry.read)).versions
        version_id = model.removeprefix(self.model_name + "@")
        if version_id not in versions:
            raise ModelNotFound(model)
        return version_id

    async def lease(self, conversation: str | None, version: str | None = None) -> Lease:
        """The engine that serves this conversation's next request, or the pinned `version`
        (which leaves the conversation's own pin as it was), referenced until the lease is
        released."""
        if self._released is not None:
            raise EngineUnavailable(RELEASED)
        slot = await (self._hold(version) if version is not None else self._routed(conversation))
        return Lease(slot.engine, slot.version.id, lambda: self.release(slot))

    async def _routed(self, conversation: str | None) -> _Slot:
        """The engine of the version routing picks for `conversation`, with one more request
        on it."""
        if self._active is None:
            raise EngineUnavailable("the model is not loaded")
        version = self._active
        if conversation is not None:
            now = time.monotonic()
            pinned = self._local_pin(conversation, now)
            if pinned is not None:
                version = pinned
            else:
                version = self._rule(conversation)
                claimed = await self._claim(conversation, version)
                self._pin(conversation, claimed or version, now, now if claimed else 0.0)
                version = claimed or version
        slot = self._slots.get(version)
        if slot is not None:
            slot.in_flight += 1
            return slot
        assert conversation is not None  # the active version is always loaded
        try:
            return await self._hold(version)  # pinned by another replica: served here too
        except EngineUnavailable:
            raise
        except EngineError as exc:  # removed meanwhile, or it fails to load here
            log.error("conversation pinned to version %s, which does not serve here (%s): "
                      "routed anew", version, type(exc).__name__)
            version = self._rule(conversation)
            self._pin(conversation, version, time.monotonic())
            return await self._hold(version)

    async def _hold(self, version_id: str) -> _Slot:
        """`version_id`'s engine with one more request on it; loaded first if it is not, as
        the admin routes load (it is unloaded again once idle, unless it serves by then)."""
        slot = self._slots.get(version_id)
        if slot is None:
            try:
                async with self._change():
                    try:
                        slot = await self._load(await self._version(version_id))
                    except UnknownVersion:  # removed since it was resolved
                        raise ModelNotFound(version_id) from None
                    except VersionLoadError as exc:
                        raise EngineError(str(exc), status=422, code="version_load_failed",
                                          param="model") from None
                    slot.in_flight += 1  # before the change ends, which retires what is idle
            except EngineReleased:  # released while this request waited for the change lock
                raise EngineUnavailable(RELEASED) from None
        else:
            slot.in_flight += 1
        return slot

    def release(self, slot: _Slot) -> None:
        slot.in_flight -= 1
        self._retire()

    def _rule(self, conversation: str) -> str:
        """The version a conversation not pinned yet goes to: the canary for its share of
        conversations, else the active version."""
        assert self._active is not None
        canary = self._canary
        return (canary.version if canary is not None
                and canary_bucket(conversation) < canary.share else self._active)

    def _local_pin(self, conversation: str, now: float) -> str | None:
        """The version this process has `conversation` pinned to, marked used (expired pins
        are dropped first)."""
        while self._pins and next(iter(self._pins.values())).last_used < now - self._pin_ttl_s:
            self._drop_pin(next(iter(self._pins)))
        pin = self._pins.get(conversation)
        if pin is None:
            return None
        pin.last_used = now
        self._pins.move_to_end(conversation)
        if self._shared is not None and now - pin.shared_at >= self._pin_ttl_s / 10:
            pin.shared_at = now  # the follower marks the shared pin used: not on the hot path
            self._to_touch.add(conversation)
        return pin.version

    def _pin(self, conversation: str, version: str, now: float, shared_at: float = 0.0) -> None:
        if conversation in self._pins:  # pinned by a request of the same conversation meanwhile
            self._drop_pin(conversation)
        while len(self._pins) >= self._max_pins:
            self._drop_pin(next(iter(self._pins)))
        self._pins[conversation] = _Pin(version, now, shared_at)
        self._pinned[version] += 1

    async def _claim(self, conversation: str, version: str) -> str | None:
        """With shared pins: the version the store pins `conversation` to (`version` unless
        another replica pinned it first); None without them or while the store fails (the
        conversation is then pinned here only)."""
        if self._shared is None or time.monotonic() < self._shared_retry_at:
            return None
        try:
            return await asyncio.to_thread(self._shared.claim, conversation, version,
                                           datetime.now(UTC), self._pin_ttl_s)
        except Exception as exc:
            # Not again for a while: a hung store would otherwise delay every new conversation.
            self._shared_retry_at = time.monotonic() + _SHARED_RETRY_S
            log.error("sticky pins not shared for %.0f s: the store failed (%s)",
                      _SHARED_RETRY_S, type(exc).__name__)
            return None

    async def _keep_pins(self) -> None:
        """Mark the shared pins this process used as used, and every ttl/10 delete the expired
        ones (the follower calls it)."""
        if self._shared is None:
            return
        touch, self._to_touch = self._to_touch, set()
        now = time.monotonic()
        try:
            if touch:
                await asyncio.to_thread(self._shared.touch, touch, datetime.now(UTC))
            if now - self._expired_at >= self._pin_ttl_s / 10:
                self._expired_at = now
                await asyncio.to_thread(self._shared.expire, datetime.now(UTC),
                                        self._pin_ttl_s)
        except Exception as exc:  # tried again next time
            log.error("sticky pins not kept up: the store failed (%s)", type(exc).__name__)

    def _drop_pin(self, conversation: str) -> None:
        version = self._pins.pop(conversation).version
        self._pinned[version] -= 1
        if not self._pinned[version]:
            del self._pinned[version]

    def _unpin(self, version_id: str, *, shared: bool = False) -> None:
        """Drop the pins to `version_id`; `shared`: in the store too (the version was taken out
        of service, which every replica does alike)."""
        for conversation in [c for c, p in self._pins.items() if p.version == version_id]:
            self._drop_pin(conversation)
        if shared and self._shared is not None:
            task = asyncio.create_task(self._unpin_shared(self._shared, version_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    @staticmethod
    async def _unpin_shared(pins: StickyPins, version_id: str) -> None:
        try:
            await asyncio.to_thread(pins.unpin, version_id)
        except Exception as exc:  # its pins expire in time; until then they are routed anew here
            log.error("pins to version %s not dropped from the store (%s)", version_id,
                      type(exc).__name__)

    def _retire(self) -> None:
        """Close every engine nothing needs: not active, not canary, not pinned, not serving."""
        needed = {self._active, *self._staged, *self._pinned}
        if self._canary is not None:
            needed.add(self._canary.version)
        for vid, slot in list(self._slots.items()):
            if vid not in needed and slot.in_flight == 0:
                del self._slots[vid]
                self._closed_stats.update(slot.engine.stats())
                task = asyncio.create_task(slot.engine.close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
                log.info("version %s unloaded", vid)

    # -- Engine -------------------------------------------------------------------------------

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams,
             template_kwargs: dict[str, Any]) -> AsyncIterator[Event]:
        return self._leased(None, lambda engine: engine.chat(messages, params, template_kwargs))

    def complete(self, prompt: str, params: SamplingParams) -> AsyncIterator[Event]:
        return self._leased(None, lambda engine: engine.complete(prompt, params))

    async def _leased(self, conversation: str | None,
                      start: Callable[[Engine], AsyncIterator[Event]]) -> AsyncIterator[Event]:
        """A stream for a caller that does not lease first (a client of the engine itself, not
        the gateway): the active version's, holding it until the stream ends."""
        lease = await self.lease(conversation)
        try:
            async for event in start(lease.engine):
                yield event
        finally:
            lease.release()

    async def tokenize(self, prompt: str | list[dict[str, Any]], *, add_special_tokens: bool,
                       add_generation_prompt: bool = True,
                       template_kwargs: dict[str, Any] | None = None,
                       token_strs: bool = False) -> Tokens:
        lease = await self.lease(None)
        try:
            return await lease.engine.tokenize(
                prompt, add_special_tokens=add_special_tokens,
                add_generation_prompt=add_generation_prompt, template_kwargs=template_kwargs,
                token_strs=token_strs)
        finally:
            lease.release()

    async def detokenize(self, tokens: list[int]) -> str:
        lease = await self.lease(None)
        try:
            return await lease.engine.detokenize(tokens)
        finally:
            lease.release()
