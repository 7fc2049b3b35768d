"""The registry's event log: every change appends one event (newest last, at most 500 kept) on
each storage, and states written before events existed still load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clinicloop.backends.registry import (
    BASE_ID,
    MAX_EVENTS,
    Registry,
    RegistryError,
    RegistryState,
    StoreStorage,
    open_registry,
)
from clinicloop.config import RegistrySettings
from clinicloop.store.db import Store
from clinicloop.store.registry_state import RegistryStateTable
from tests.postgres import pg_server, pg_url  # noqa: F401  (fixtures)


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    out = {}
    for name in ("base.gguf", "merged.gguf"):
        out[name] = tmp_path / name
        out[name].write_bytes(b"GGUF" + name.encode())
    return out


@pytest.fixture(params=["file", "sqlite", "postgresql"])
def registry(request: pytest.FixtureRequest, tmp_path, files) -> Registry:
    url = (request.getfixturevalue("pg_url") if request.param == "postgresql"
           else f"sqlite:///{tmp_path / 'store.db'}")
    storage = "file" if request.param == "file" else "store"
    reg = open_registry(RegistrySettings(dir=tmp_path / "registry", storage=storage), url)
    reg.bootstrap("llamacpp", files["base.gguf"], "tiny")
    return reg


def kinds(registry: Registry) -> list[tuple[str, str | None, float | None]]:
    return [(e.kind, e.version, e.share) for e in registry.read().events]


def test_every_change_appends_an_event_newest_last(registry, files):
    assert kinds(registry) == [("register", BASE_ID, None), ("activate", BASE_ID, None)]
    for _ in range(2):  # re-registering the same files changes nothing
        registry.register(parent=BASE_ID, backend="llamacpp", model_path=files["merged.gguf"])
    registry.register(parent=BASE_ID, backend="llamacpp", model_path=files["merged.gguf"],
                      version_id="v2")
    registry.set_canary("v1", 0.25)
    registry.clear_canary()
    registry.clear_canary()  # no canary: nothing to record
    registry.activate("v1")
    registry.activate("v1")  # already active: no change
    registry.rollback()
    registry.remove("v1")
    with pytest.raises(RegistryError):
        registry.rollback()  # refused: no event
    assert kinds(registry)[2:] == [
        ("register", "v1", None), ("register", "v2", None), ("canary", "v1", 0.25),
        ("canary_cleared", "v1", None), ("activate", "v1", None), ("rollback", BASE_ID, None),
        ("remove", "v1", None)]
    times = [e.at for e in registry.read().events]
    assert times == sorted(times) and all(t.tzinfo is not None for t in times)


def test_only_the_newest_events_are_kept(tmp_path, files):
    registry = Registry(tmp_path / "registry")
    registry.bootstrap("llamacpp", files["base.gguf"], "tiny")
    registry.register(parent=BASE_ID, backend="llamacpp", model_path=files["merged.gguf"])
    for i in range(MAX_EVENTS // 2 + 1):
        registry.set_canary("v1", (i + 1) / 1000)
        registry.clear_canary()
    events = Registry(tmp_path / "registry").read().events  # as stored in the file
    # 3 + 502 written: the 5 oldest (bootstrap, register, the first canary pair) are gone.
    assert len(events) == MAX_EVENTS
    assert (events[0].kind, events[0].share) == ("canary", 0.002)
    assert (events[-1].kind, events[-1].version) == ("canary_cleared", "v1")


def test_a_state_without_events_loads_and_gets_them_on_the_next_change(tmp_path, files):
    legacy = {
        "versions": {BASE_ID: {"id": BASE_ID, "parent": None, "kind": "gguf",
                               "model_path": str(files["base.gguf"]),
                               "created_at": "2026-01-01T00:00:00Z"}},
        "active": BASE_ID, "canary": None,
        "history": [{"version": BASE_ID, "at": "2026-01-01T00:00:00Z"}], "model_name": "tiny",
    }
    directory = tmp_path / "registry"
    directory.mkdir()
    (directory / "registry.json").write_text(json.dumps(legacy))
    from_file = Registry(directory)
    assert from_file.read().events == [] and from_file.read().active == BASE_ID

    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.migrate()
    RegistryStateTable(store).create(json.dumps(legacy))
    from_store = Registry(StoreStorage(store, tmp_path / "elsewhere"))
    assert from_store.read().events == [] and from_store.read().model_name == "tiny"
    from_store.register(parent=BASE_ID, backend="llamacpp", model_path=files["merged.gguf"])
    assert [(e.kind, e.version) for e in from_store.read().events] == [("register", "v1")]
    store.dispose()


def test_record_drops_the_oldest_beyond_the_limit():
    state = RegistryState()
    for i in range(MAX_EVENTS + 7):
        state.record("canary", f"v{i}", 0.1)
    assert len(state.events) == MAX_EVENTS
    assert state.events[0].version == "v7" and state.events[-1].version == f"v{MAX_EVENTS + 6}"
