"""The `openai` engine against a real OpenAI-compatible upstream: llama-cpp-python's server on the
tiny model, started once for the module; the supervisor tests launch their own through the engine.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from clinicloop.backends.base import (
    Delta,
    EngineError,
    EngineUnavailable,
    Event,
    SamplingParams,
    Usage,
)
from clinicloop.backends.openai_upstream import OpenAIUpstreamEngine, _upstream_error
from clinicloop.backends.supervisor import UpstreamStartError
from clinicloop.config import EngineSettings
from tests.conftest import free_port, group_gone, until, wait_until

MESSAGES = [{"role": "user", "content": "What helps a mild headache?"}]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, seed=7)
KEY = "sk-upstream-test"
AUTH = {"authorization": f"Bearer {KEY}"}


def server_command(gguf: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
            "--host", "127.0.0.1", "--port", str(port), "--n_threads", "1", "--n_ctx", "1024",
            "--interrupt_requests", "False"]


@pytest.fixture(scope="module")
def upstream(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL (…/v1) of a llama-cpp-python server on the tiny model."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("upstream") / "llama_cpp_server.log"
    proc = subprocess.Popen([*server_command(tiny_model.gguf_q8_0, port), "--api_key", KEY],
                            stdout=log_path.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until(lambda: httpx.get(url + "/models", headers=AUTH).status_code == 200, 60,
                   f"llama_cpp.server (log: {log_path})", proc)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def keyed(url: str, **kwargs: Any) -> EngineSettings:
    return EngineSettings(kind="openai", upstream_url=url, upstream_api_key=KEY, **kwargs)


def run_engine(settings: EngineSettings,
               body: Callable[[OpenAIUpstreamEngine], Awaitable[None]], **kwargs: Any) -> None:
    async def main() -> None:
        engine = OpenAIUpstreamEngine(settings, **kwargs)
        await engine.start()
        try:
            await body(engine)
        finally:
            await engine.close()

    asyncio.run(main())


async def collect(events: Any) -> list[Event]:
    return [event async for event in events]


def text(events: list[Event]) -> str:
    return "".join(e.content for e in events if isinstance(e, Delta))


def check_shape(events: list[Event]) -> Usage:
    """Deltas, the last one finished, then exactly one Usage."""
    *deltas, usage = events
    assert deltas and all(isinstance(d, Delta) for d in deltas)
    assert isinstance(usage, Usage)
    assert deltas[-1].finish_reason in ("stop", "length")
    assert all(d.finish_reason is None for d in deltas[:-1])
    return usage


def test_chat_stream_matches_a_direct_call(upstream: str) -> None:
    direct = httpx.post(upstream + "/chat/completions", timeout=60, headers=AUTH, json={
        "messages": MESSAGES, "max_tokens": 24, "temperature": 0.0, "seed": 7}).json()

    async def body(engine: OpenAIUpstreamEngine) -> None:
        assert engine.healthy()
        assert engine.model_version == f"upstream:{direct['model']}"
        events = await collect(engine.chat(MESSAGES, GREEDY, {"thinking_mode": "off"}))
        usage = check_shape(events)
        assert usage.completion_tokens > 0
        assert text(events) == direct["choices"][0]["message"]["content"]

    run_engine(keyed(upstream), body)


def test_served_name_and_logprobs(upstream: str) -> None:
    async def body(engine: OpenAIUpstreamEngine) -> None:
        assert engine.model_name == "clinic-tiny"
        params = SamplingParams(max_tokens=8, temperature=0.0, top_logprobs=2)
        events = await collect(engine.chat(MESSAGES, params, {}))
        check_shape(events)
        logprobs = [lp for e in events if isinstance(e, Delta) for lp in e.logprobs]
        assert logprobs and all(lp.logprob <= 0 and len(lp.top) == 2 for lp in logprobs)
        assert "".join(lp.token for lp in logprobs) == text(events)

    run_engine(keyed(upstream, served_model_name="clinic-tiny"), body)


def test_completions(upstream: str) -> None:
    prompt = "The patient reports"
    direct = httpx.post(upstream + "/completions", timeout=60, headers=AUTH, json={
        "prompt": prompt, "max_tokens": 16, "temperature": 0.0, "seed": 7}).json()

    async def body(engine: OpenAIUpstreamEngine) -> None:
        params = SamplingParams(max_tokens=16, temperature=0.0, seed=7, top_logprobs=2)
        events = await collect(engine.complete(prompt, params))
        usage = check_shape(events)
        assert usage.completion_tokens > 0
        assert text(events) == direct["choices"][0]["text"]
        logprobs = [lp for e in events if isinstance(e, Delta) for lp in e.logprobs]
        assert logprobs and all(lp.top and lp.logprob <= 0 for lp in logprobs)

    run_engine(keyed(upstream), body)


def test_upstream_rejection_is_an_engine_error(upstream: str) -> None:
    """A 4xx before the stream starts (llama-cpp-python's server validates nothing before it
    streams, so a wrong path stands in for vLLM's 400s and 404s)."""
    wrong = upstream.removesuffix("/v1") + "/v9"
    direct = httpx.post(wrong + "/chat/completions", headers=AUTH, json={"messages": MESSAGES})
    assert direct.status_code == 404

    async def body(engine: OpenAIUpstreamEngine) -> None:
        engine.url = wrong
        with pytest.raises(EngineError) as caught:
            await anext(engine.chat(MESSAGES, GREEDY, {}))
        assert caught.value.status == 404 and not isinstance(caught.value, EngineUnavailable)
        assert str(caught.value) == direct.json()["detail"]

    run_engine(keyed(upstream), body)


def test_upstream_failing_mid_stream_is_unavailable(upstream: str) -> None:
    """llama-cpp-python's server answers 200 to a prompt beyond its context, then breaks off the
    stream (cleanly or not: both happen); that is the upstream failing, not our link to it."""
    too_long = [{"role": "user", "content": "headache " * 1500}]

    async def body(engine: OpenAIUpstreamEngine) -> None:
        with pytest.raises(EngineUnavailable):
            await collect(engine.chat(too_long, SamplingParams(max_tokens=16), {}))
        assert engine.healthy()
        check_shape(await collect(engine.chat(MESSAGES, GREEDY, {})))

    run_engine(keyed(upstream), body)


def test_wrong_upstream_key_fails_start_at_once(upstream: str) -> None:
    async def main() -> None:
        engine = OpenAIUpstreamEngine(EngineSettings(
            kind="openai", upstream_url=upstream, upstream_api_key="sk-wrong"))
        with pytest.raises(UpstreamStartError, match="401"):
            await engine.start()

    asyncio.run(main())


@pytest.mark.parametrize(("status", "body", "expected"), [
    (400, {"error": {"message": "bad n", "type": "invalid_request_error", "param": "n",
                     "code": "invalid_value"}}, (400, "bad n", "invalid_value", "n")),
    (404, {"object": "error", "message": "The model `x` does not exist.", "type": "NotFoundError",
           "param": None, "code": 404}, (404, "The model `x` does not exist.", None, None)),
    (422, {"detail": [{"loc": ["body", "n"], "msg": "Input should be a valid integer"}]},
     (422, "Input should be a valid integer", None, None)),
    (401, {"error": {"message": "Invalid API key"}}, (503, None, "engine_unavailable", None)),
    (500, b"Internal Server Error", (503, None, "engine_unavailable", None)),
])
def test_error_bodies(status: int, body: Any, expected: tuple[Any, ...]) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    error = _upstream_error(status, raw)
    message = None if isinstance(error, EngineUnavailable) else str(error)
    assert (error.status, message, error.code, error.param) == expected


def test_closing_early_leaves_the_upstream_serving(upstream: str) -> None:
    async def body(engine: OpenAIUpstreamEngine) -> None:
        params = SamplingParams(max_tokens=32, temperature=1.0)
        events = engine.chat(MESSAGES, params, {})
        first = await anext(events)
        assert isinstance(first, Delta)
        await events.aclose()  # type: ignore[attr-defined]
        check_shape(await collect(engine.chat(MESSAGES, GREEDY, {})))

    run_engine(keyed(upstream), body)


def test_unreachable_upstream() -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"

    async def main() -> None:
        engine = OpenAIUpstreamEngine(EngineSettings(
            kind="openai", upstream_url=dead, upstream_startup_timeout_s=0.5))
        with pytest.raises(UpstreamStartError):
            await engine.start()
        assert not engine.healthy()

    asyncio.run(main())


def test_upstream_going_away_is_unavailable(upstream: str) -> None:
    async def body(engine: OpenAIUpstreamEngine) -> None:
        engine.url = f"http://127.0.0.1:{free_port()}/v1"
        with pytest.raises(EngineUnavailable):
            await anext(engine.chat(MESSAGES, GREEDY, {}))
        assert not engine.healthy()

    run_engine(keyed(upstream), body)


def test_supervised_upstream_is_restarted_after_a_crash(tiny_model: Any, tmp_path: Path) -> None:
    port = free_port()
    settings = EngineSettings(
        kind="openai", upstream_url=f"http://127.0.0.1:{port}/v1",
        upstream_command=server_command(tiny_model.gguf_q8_0, port),
        upstream_startup_timeout_s=60,
    )
    pgids: list[int] = []

    async def body(engine: OpenAIUpstreamEngine) -> None:
        sup = engine.supervisor
        assert sup is not None and sup.pid is not None and engine.healthy()
        first = sup.pid
        pgids.append(first)
        os.kill(first, signal.SIGKILL)
        await until(lambda: not engine.healthy(), 10, "unhealthy after the kill")
        await until(engine.healthy, 60, "healthy after the restart")
        assert sup.pid is not None and sup.pid != first and sup.launches == 2
        pgids.append(sup.pid)
        check_shape(await collect(engine.chat(MESSAGES, GREEDY, {})))

    run_engine(settings, body, log_dir=tmp_path, health_interval_s=0.1)
    assert "launch:" in (tmp_path / "upstream.log").read_text()
    assert all(group_gone(pgid) for pgid in pgids)


def test_supervised_upstream_that_cannot_start_fails_fast(tmp_path: Path) -> None:
    port = free_port()
    settings = EngineSettings(
        kind="openai", upstream_url=f"http://127.0.0.1:{port}/v1",
        upstream_command=[sys.executable, "-c", "import sys; print('no GPU here'); sys.exit(3)"],
        upstream_startup_timeout_s=60,
    )

    async def main() -> None:
        engine = OpenAIUpstreamEngine(settings, log_dir=tmp_path)
        started = time.monotonic()
        with pytest.raises(UpstreamStartError, match="no GPU here"):
            await engine.start()
        assert time.monotonic() - started < 10
        assert engine.supervisor is not None and not engine.supervisor.alive

    asyncio.run(main())


def test_versions_of_an_upstream(upstream: str, tiny_model: Any, tmp_path: Path) -> None:
    """Over an upstream the registry's base is the upstream's own model; an adapter version the
    upstream cannot load (llama_cpp.server has no /v1/load_lora_adapter) is refused and the base
    keeps serving; a registry made for GGUF files is refused at start."""
    from clinicloop.backends.registry import Registry, RegistryError
    from clinicloop.config import Settings
    from clinicloop.serving.versions import VersionedEngine, VersionLoadError

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")

    def settings(registry: Path) -> Settings:
        return Settings(engine=keyed(upstream), registry={"dir": registry})

    async def main() -> None:
        versions = VersionedEngine(settings(tmp_path / "ours"), Registry(tmp_path / "ours"))
        await versions.start()
        try:
            base = versions.registry.get("base")
            assert base.backend == "openai" and str(base.model_path) == str(tiny_model.gguf_q8_0)
            versions.registry.register(parent="base", backend="openai", model_path=base.model_path,
                                       lora_path=adapter, version_id="rl-1")
            with pytest.raises(VersionLoadError, match="rl-1"):
                await versions.activate("rl-1")
            assert versions.active == "base" and versions.healthy()
            assert text(await collect(versions.chat(
                [{"role": "user", "content": "Hello"}], SamplingParams(max_tokens=4), {})))
        finally:
            await versions.close()

        gguf_registry = Registry(tmp_path / "gguf")
        gguf_registry.bootstrap("llamacpp", tiny_model.gguf_q8_0, tiny_model.name)
        other = VersionedEngine(settings(tmp_path / "gguf"), gguf_registry)
        with pytest.raises(RegistryError, match="move the registry away"):
            await other.start()
        await other.close()

    asyncio.run(main())
