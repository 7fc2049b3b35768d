"""The model registry on each storage (its JSON file; the store's row on SQLite and on a real
Postgres): round trip, rules, rollback history, and concurrent writers (threads and processes)
that must lose nothing while readers only ever see a whole state; the stamp a replica follows;
a file registry moving into the store."""

from __future__ import annotations

import json
import multiprocessing
import threading
from pathlib import Path
from typing import Any

import pytest

from clinicloop.backends.registry import (
    BASE_ID,
    FileStorage,
    Registry,
    RegistryError,
    StoreStorage,
    UnknownVersion,
    VersionConflict,
    VersionInUse,
    open_registry,
)
from clinicloop.config import RegistrySettings
from tests.postgres import pg_server, pg_url  # noqa: F401  (fixtures)


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    out = {}
    for name in ("base.gguf", "merged.gguf", "adapter.gguf"):
        out[name] = tmp_path / name
        out[name].write_bytes(b"GGUF" + name.encode())
    return out


def _open(storage: str, directory: str, url: str) -> Registry:
    """The registry `storage` names: "file" in `directory`, "store" in the store at `url`."""
    return open_registry(RegistrySettings(dir=Path(directory), storage=storage), url)  # type: ignore[arg-type]


@pytest.fixture(params=["file", "sqlite", "postgresql"])
def where(request: pytest.FixtureRequest, tmp_path) -> tuple[str, str, str]:
    """(storage, directory, store URL) of a fresh registry."""
    if request.param == "file":
        return "file", str(tmp_path / "registry"), f"sqlite:///{tmp_path / 'unused.db'}"
    url = (f"sqlite:///{tmp_path / 'store.db'}" if request.param == "sqlite"
           else request.getfixturevalue("pg_url"))
    return "store", str(tmp_path / "registry"), url


@pytest.fixture
def registry(where, files) -> Registry:
    reg = _open(*where)
    reg.bootstrap("llamacpp", files["base.gguf"], "tiny")
    return reg


def _raw(registry: Registry) -> dict[str, Any]:
    """The state as stored (the file's JSON, or the store row's)."""
    storage = registry.storage
    if isinstance(storage, FileStorage):
        return json.loads(storage.path.read_text())
    assert isinstance(storage, StoreStorage)
    return json.loads(storage.table.read() or "")


def test_round_trip_and_rules(registry, where, files, tmp_path):
    assert registry.read().active == BASE_ID and registry.get(BASE_ID).parent is None
    v1 = registry.register(parent=BASE_ID, backend="llamacpp", model_path=files["merged.gguf"],
                           metrics={"held_out_score": 0.42})
    lora = registry.register(parent="v1", backend="llamacpp", model_path=files["base.gguf"],
                             lora_path=files["adapter.gguf"], version_id="lora-1")
    assert (v1.id, lora.id) == ("v1", "lora-1")
    again = _open(*where)  # a fresh reader (another process) sees it all
    assert [v.id for v in again.list()] == [BASE_ID, "v1", "lora-1"]
    assert again.get("v1").metrics == {"held_out_score": 0.42}
    assert again.get("lora-1").lora_path == files["adapter.gguf"].resolve()
    assert again.get("v1").created_at.tzinfo is not None
    raw = _raw(again)
    assert raw["active"] == BASE_ID and set(raw["versions"]) == {BASE_ID, "v1", "lora-1"}

    # Re-registering the same files is a no-op (a publisher that crashed re-runs); other files
    # under a taken id, an unknown parent, a missing file or a bad id are refused.
    assert registry.register(parent=BASE_ID, backend="llamacpp", model_path=files["merged.gguf"],
                             version_id="v1") == v1
    with pytest.raises(VersionConflict):
        registry.register(parent=BASE_ID, backend="llamacpp", model_path=files["base.gguf"],
                          version_id="v1")
    with pytest.raises(UnknownVersion):
        registry.register(parent="nope", backend="llamacpp", model_path=files["merged.gguf"])
    with pytest.raises(RegistryError, match="file not found"):
        registry.register(parent=BASE_ID, backend="llamacpp", model_path=tmp_path / "missing.gguf")
    with pytest.raises(RegistryError, match="must match"):
        registry.register(parent=BASE_ID, backend="llamacpp", model_path=files["merged.gguf"],
                          version_id="../evil")
    # Bootstrapping again changes nothing.
    registry.bootstrap("llamacpp", files["merged.gguf"], "tiny")
    assert registry.get(BASE_ID).model_path == files["base.gguf"].resolve()


def test_activate_canary_and_rollback_history(registry, files):
    for name in ("v1", "v2"):
        registry.register(parent=BASE_ID, backend="llamacpp", model_path=files["merged.gguf"],
                          version_id=name)
    with pytest.raises(RegistryError, match="no earlier version"):
        registry.rollback()
    with pytest.raises(RegistryError, match="already active"):
        registry.set_canary(BASE_ID, 0.5)
    assert registry.set_canary("v1", 0.25).share == 0.25
    registry.activate("v1")  # promoting the canary clears it
    assert registry.read().canary is None
    registry.activate("v2")
    with pytest.raises(VersionConflict):
        registry.rollback(expect=BASE_ID)
    # Rollback walks back one activation at a time rather than flipping between two.
    assert registry.rollback(expect="v1").id == "v1"
    assert registry.rollback().id == BASE_ID
    state = registry.read()
    assert state.active == BASE_ID and [a.version for a in state.history] == [BASE_ID]
    registry.set_canary("v2", 1.0)
    registry.clear_canary()
    assert registry.read().canary is None


def _register_many(where: tuple[str, str, str], model: str, prefix: str, count: int) -> None:
    registry = _open(*where)
    for i in range(count):
        registry.register(parent=BASE_ID, backend="llamacpp", model_path=Path(model),
                          version_id=f"{prefix}-{i}")


def test_concurrent_writers_lose_nothing_and_readers_see_whole_states(registry, where, files):
    model = str(files["merged.gguf"])
    stop = threading.Event()
    reads: list[int] = []
    failures: list[Exception] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                reads.append(len(registry.read().versions))
            except Exception as exc:  # a torn file would fail to parse
                failures.append(exc)

    watcher = threading.Thread(target=reader)
    watcher.start()
    fork = multiprocessing.get_context("fork")
    procs = [fork.Process(target=_register_many, args=(where, model, f"p{n}", 15))
             for n in range(2)]
    threads = [threading.Thread(target=_register_many, args=(where, model, f"t{n}", 15))
               for n in range(2)]
    for worker in (*procs, *threads):
        worker.start()
    for worker in (*procs, *threads):
        worker.join(60)
    stop.set()
    watcher.join()
    assert all(p.exitcode == 0 for p in procs)
    assert not failures and reads and reads == sorted(reads)
    ids = set(registry.read().versions)
    assert ids == {BASE_ID} | {f"{w}-{i}" for w in ("p0", "p1", "t0", "t1") for i in range(15)}
    assert not list(Path(where[1]).glob(".registry-*"))  # no temp file left behind


def test_remove_refuses_versions_in_use_and_leaves_no_rollback_onto_a_removed_one(registry,
                                                                                  files):
    for name, parent in (("v1", BASE_ID), ("v2", BASE_ID), ("v3", "v2")):
        registry.register(parent=parent, backend="llamacpp", model_path=files["merged.gguf"],
                          version_id=name)
    registry.activate("v1")
    registry.activate(BASE_ID)
    registry.set_canary("v3", 0.1)
    for vid, why in ((BASE_ID, "is active"), ("v3", "is the canary"), ("v2", "parent of v3")):
        with pytest.raises(VersionInUse, match=why):
            registry.remove(vid)
    registry.activate("v2")
    with pytest.raises(VersionInUse, match="registry's base"):
        registry.remove(BASE_ID)  # not active now, still the root every version descends from
    with pytest.raises(UnknownVersion):
        registry.remove("nope")
    # v1 was active once: its activation leaves the history with it.
    assert registry.remove("v1").id == "v1"
    state = registry.read()
    assert set(state.versions) == {BASE_ID, "v2", "v3"} and files["merged.gguf"].exists()
    assert [a.version for a in state.history] == [BASE_ID, "v2"]
    assert registry.rollback().id == BASE_ID


def test_the_stamp_changes_with_every_change_and_only_then(registry, files):
    """What a replica polls to follow changes made elsewhere."""
    stamps = [registry.stamp()]
    registry.register(parent=BASE_ID, backend="llamacpp", model_path=files["merged.gguf"],
                      version_id="v1")
    stamps.append(registry.stamp())
    registry.activate("v1")
    stamps.append(registry.stamp())
    registry.read()
    assert registry.stamp() == stamps[-1]
    registry.rollback()
    stamps.append(registry.stamp())
    assert None not in stamps and len(set(stamps)) == len(stamps)
    if isinstance(registry.storage, StoreStorage):
        # A no-op change (every replica bootstraps at start) moves no replica.
        registry.bootstrap("llamacpp", files["merged.gguf"], "tiny")
        assert registry.stamp() == stamps[-1]


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_a_file_registry_moves_into_the_store_on_first_use(store, request, tmp_path, files):
    directory = tmp_path / "registry"
    old = Registry(directory)
    old.bootstrap("llamacpp", files["base.gguf"], "tiny")
    old.register(parent=BASE_ID, backend="llamacpp", model_path=files["merged.gguf"],
                 version_id="v1")
    old.activate("v1")
    url = (f"sqlite:///{tmp_path / 'store.db'}" if store == "sqlite"
           else request.getfixturevalue("pg_url"))
    # `auto` keeps a SQLite store's registry in the file and moves a Postgres one's.
    auto = open_registry(RegistrySettings(dir=directory), url)
    assert isinstance(auto.storage, FileStorage if store == "sqlite" else StoreStorage)
    moved = _open("store", str(directory), url)
    assert moved.read() == old.read()  # the store's tables were created on first use too
    old.activate(BASE_ID)  # the file no longer counts once the row exists
    assert _open("store", str(directory), url).read().active == "v1"
