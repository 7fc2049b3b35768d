"""Releasing the engine for a maintenance window and taking it back (`VersionedEngine.suspend` /
`resume`), on each way a backend frees the accelerator: llama.cpp closes its bases (`stop`), a
supervised upstream's process group is stopped and launched again (`stop`), a vLLM launched with
sleep mode sleeps in place (`sleep`, here the scripted upstream's stand-in for vLLM's dev routes),
and an upstream clinicloop did not launch is left as it is (`kept`). While released, requests and
changes are refused; afterwards the registry's versions serve again, adapters re-loaded."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from clinicloop.backends.base import EngineUnavailable, SamplingParams, Usage
from clinicloop.backends.kinds import rss_bytes
from clinicloop.backends.registry import Registry
from clinicloop.config import EngineSettings, Settings
from clinicloop.serving.admin.api_router import _errors
from clinicloop.serving.errors import OpenAIError
from clinicloop.serving.versions import EngineReleased, VersionedEngine
from tests.conftest import free_port, group_gone, wait_until
from tests.serving import scripted_upstream

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
QUESTION = [{"role": "user", "content": "I have a headache and a fever."}]


async def _answer(versions: VersionedEngine) -> tuple[str, str]:
    """(the version that served it, the greedy reply) of one chat through the engine."""
    lease = await versions.lease("conversation-1")
    try:
        text = "".join([e.content async for e in lease.engine.chat(QUESTION, GREEDY, {})
                        if not isinstance(e, Usage)])
    finally:
        lease.release()
    return lease.version, text


async def _refused_while_released(versions: VersionedEngine) -> None:
    assert not versions.healthy()
    with pytest.raises(EngineUnavailable, match="released for maintenance"):
        await versions.lease("conversation-2")
    with pytest.raises(EngineUnavailable, match="released for maintenance"):
        await versions.lease(None, version="base")  # a request pinning a version
    with pytest.raises(EngineReleased):
        await versions.activate("base")
    with pytest.raises(EngineReleased):
        await versions.rollback()
    with pytest.raises(EngineReleased):
        await versions.clear_canary()


def test_llamacpp_stop_frees_the_bases_and_resumes_the_same_version(tmp_path, bench,
                                                                    bench_lora):
    settings = Settings(engine=EngineSettings(model_path=bench.gguf_f16, n_ctx=512,
                                              prefix_cache_slots=0),
                        registry={"dir": tmp_path / "registry"})

    async def main() -> None:
        versions = VersionedEngine(settings, Registry(tmp_path / "registry"))
        await versions.start()
        try:
            versions.registry.register(parent="base", backend="llamacpp",
                                       model_path=bench.gguf_f16, lora_path=bench_lora.gguf,
                                       version_id="v1")
            await versions.activate("v1")
            before = await _answer(versions)
            assert before[0] == "v1" and before[1]
            stats = versions.stats()
            loaded_rss = rss_bytes()

            assert await versions.suspend() == "stop"
            assert versions.released == "stop"
            assert await versions.suspend() == "stop"  # idempotent
            memory = versions.memory()
            assert memory["bases"] == {} and memory["versions"] == {}
            # The weights (mmapped, all pages touched) and the contexts went back to the OS.
            freed = loaded_rss - memory["rss_bytes"]
            assert freed > bench.gguf_f16.stat().st_size // 2, freed
            assert versions.kv_cells() == (0, 0)
            assert all(versions.stats().get(k, 0) >= n for k, n in stats.items())
            await _refused_while_released(versions)

            await versions.resume()
            await versions.resume()  # idempotent
            assert versions.released is None and versions.healthy()
            assert versions.active == "v1"
            assert await _answer(versions) == before
            assert list(versions.memory()["bases"]) == [str(bench.gguf_f16.resolve())]
        finally:
            await versions.close()

    asyncio.run(main())


def _adapter(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    (path / "adapter_config.json").write_text("{}")
    return path


def _upstream_settings(tmp_path: Path, **engine: Any) -> tuple[Settings, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    command = [sys.executable, scripted_upstream.__file__, str(port)]
    return Settings(engine=EngineSettings(upstream_url=url, upstream_command=command, **engine),
                    registry={"dir": tmp_path / "registry"}), url


def _lora_loads(url: str) -> list[str]:
    return httpx.get(url.removesuffix("/v1") + "/lora_calls").json()["load"]


async def _with_adapter_version(versions: VersionedEngine, tmp_path: Path, vid: str) -> None:
    versions.registry.register(parent="base", backend=versions.backend.kind,
                               model_path=versions.registry.get("base").model_path,
                               lora_path=_adapter(tmp_path, vid), version_id=vid)
    await versions.activate(vid)


async def _upstream_with_v1(settings: Settings, tmp_path: Path) -> VersionedEngine:
    """A started VersionedEngine on the scripted upstream, serving the adapter version v1."""
    versions = VersionedEngine(settings, Registry(tmp_path / "registry"))
    await versions.start()
    try:
        await _with_adapter_version(versions, tmp_path, "v1")
    except BaseException:
        await versions.close()
        raise
    return versions


def test_supervised_upstream_is_stopped_and_launched_again(tmp_path, caplog):
    settings, url = _upstream_settings(tmp_path, kind="openai")

    async def main() -> None:
        versions = await _upstream_with_v1(settings, tmp_path)
        supervisor = versions.backend.upstream.supervisor  # type: ignore[attr-defined]
        try:
            assert _lora_loads(url) == ["v1"]
            pid, launches = supervisor.pid, supervisor.launches
            children = psutil.Process(pid).children(recursive=True)

            with caplog.at_level(logging.WARNING, logger="clinicloop.backends.supervisor"):
                assert await versions.suspend() == "stop"
            assert group_gone(pid) and not any(p.is_running() for p in children)
            # A deliberate stop: not watched as a crash, so never restarted.
            assert not supervisor.alive and supervisor.launches == launches
            assert "upstream exited" not in caplog.text
            with pytest.raises(httpx.ConnectError):
                httpx.get(url + "/models")
            await _refused_while_released(versions)

            await versions.resume()
            assert supervisor.pid != pid and supervisor.alive and versions.healthy()
            assert versions.active == "v1"
            assert await _answer(versions) == ("v1", "Hello there.")
            assert _lora_loads(url) == ["v1"]  # the new process has the adapter again
            # Watched again as before the window: a crash now is restarted.
            relaunched = supervisor.pid
            os.killpg(relaunched, signal.SIGKILL)
            await asyncio.to_thread(wait_until, lambda: supervisor.launches == launches + 2, 30,
                                    "restart after a crash")
        finally:
            await versions.close()
        assert group_gone(supervisor.pid)

    asyncio.run(main())


def test_vllm_sleep_mode_sleeps_in_place_and_serves_the_registry_after(tmp_path):
    settings, url = _upstream_settings(tmp_path, kind="vllm", vllm_sleep_mode=True)
    root = url.removesuffix("/v1")

    async def main() -> None:
        versions = await _upstream_with_v1(settings, tmp_path)
        supervisor = versions.backend.upstream.supervisor  # type: ignore[attr-defined]
        try:
            pid = supervisor.pid

            assert await versions.suspend() == "sleep"
            assert httpx.get(root + "/is_sleeping").json() == {"is_sleeping": True}
            assert supervisor.pid == pid and supervisor.alive
            await _refused_while_released(versions)
            assert "versions" in versions.memory()
            # A publish that wrote the registry file during the window (not through the
            # engine, which refuses changes now) is what serves after it.
            versions.registry.register(parent="v1", backend="vllm",
                                       model_path=versions.registry.get("base").model_path,
                                       lora_path=_adapter(tmp_path, "v2"), version_id="v2")
            versions.registry.activate("v2")

            await versions.resume()
            assert httpx.get(root + "/is_sleeping").json() == {"is_sleeping": False}
            assert supervisor.pid == pid and versions.healthy()
            # The adapter loaded before the sleep is loaded again, then the new version.
            assert _lora_loads(url) == ["v1", "v1", "v2"]
            assert versions.active == "v2"
            assert await _answer(versions) == ("v2", "Hello there.")
        finally:
            await versions.close()

    asyncio.run(main())


def test_an_upstream_not_launched_here_is_kept(tmp_path):
    with scripted_upstream.running() as url:
        settings = Settings(engine=EngineSettings(kind="openai", upstream_url=url),
                            registry={"dir": tmp_path / "registry"})

        async def main() -> None:
            versions = VersionedEngine(settings, Registry(tmp_path / "registry"))
            await versions.start()
            try:
                assert await versions.suspend() == "kept"
                await _refused_while_released(versions)
                httpx.get(url + "/models").raise_for_status()  # still running: not ours
                await versions.resume()
                assert await _answer(versions) == ("base", "Hello there.")
            finally:
                await versions.close()

        asyncio.run(main())


def test_admin_api_answers_409_to_a_change_while_released():
    with pytest.raises(OpenAIError) as refused, _errors():
        raise EngineReleased("the engine is released for maintenance (stop)")
    assert (refused.value.status, refused.value.code) == (409, "engine_released")
