"""Engine over any OpenAI-compatible upstream: `vllm serve`, `llama-server`, SGLang, a hosted model.

Every request is forwarded as a streamed `/chat/completions` or `/completions` call, and the
upstream's SSE chunks are turned into the same `Delta` / `Usage` events the in-process engine
produces, so the gateway (logging, metrics, admission, the OpenAI response shapes) works unchanged
in front of it.
The upstream batches concurrent requests itself, so many run at once here.

A stream that goes wrong upstream is an `EngineError` here, never a stream that just stops: an
error chunk, a finish reason OpenAI does not know (vLLM's `abort`), a malformed chunk or a choice
nobody asked for is `UpstreamFailed` (502); a broken or timed-out connection, or a stream without
`[DONE]`, is `EngineUnavailable` (503). Finish reasons OpenAI knows pass through unchanged.

With `upstream_command` set the upstream is launched and supervised (`supervisor.py`): started and
waited for in `start()`, restarted if it dies, stopped in `close()`; `start()` after `close()`
launches it again (a maintenance window's stop and restart). Health is kept by a background
probe rather than a request per `healthy()` call, which the gateway makes on every /health hit.
A vLLM launched with `--enable-sleep-mode` can instead `sleep()` and `wake_up()`: the process
keeps running while its GPU memory is released.

With `lora_resolver_dir` set, an adapter is copied to `<dir>/<name>/` before it is loaded, and
loaded from there: several vLLM replicas behind one Service share that directory, and the ones
the load call did not reach find the adapter by name through vLLM's `lora_filesystem_resolver`
plugin, which takes `<dir>/<name>/` only when its `adapter_config.json` is a LoRA whose
`base_model_name_or_path` is vLLM's `--model` (what `/v1/models` reports as the base's `root`).
"""

from __future__ import annotations

import asyncio
import contextlib
import filecmp
import json
import logging
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

from clinicloop.backends.base import (
    Delta,
    Engine,
    EngineError,
    EngineUnavailable,
    Event,
    SamplingParams,
    TokenLogprob,
    Tokens,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from clinicloop.backends.supervisor import ProcessSupervisor, wait_for_http
from clinicloop.backends.toolcalls import with_tool_calls
from clinicloop.config import EngineSettings

log = logging.getLogger(__name__)

# vLLM reports a token with no logprob (e.g. an echoed first prompt token) as this.
_NO_LOGPROB = -9999.0
# Passed through as they are; any other finish reason means the generation failed.
_OPENAI_FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter"})


class UpstreamFailed(EngineError):
    """The upstream accepted a request and then failed it, or answered it with something that is
    not an OpenAI stream: the gateway's fault is none, hence 502."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=502, code="upstream_error")


class OpenAIUpstreamEngine(Engine):
    def __init__(self, settings: EngineSettings, *, max_concurrency: int = 64,
                 log_dir: Path = Path("var/logs"), health_interval_s: float = 2.0) -> None:
        """`max_concurrency`: requests sent at once (the gateway's admission limit); the
        upstream's own scheduler batches them."""
        if not settings.upstream_url:
            raise ValueError("engine.upstream_url is required for the openai engine")
        self.settings = settings
        self.max_concurrency = max_concurrency
        self.url = settings.upstream_url.rstrip("/")
        self.model_name = settings.served_model_name or "loading"
        self.model_version = "loading"
        self.upstream_model = settings.upstream_model
        self.upstream_root: str | None = None  # the base's `root` in /v1/models: vLLM's --model
        self.headers = (
            {"Authorization": f"Bearer {settings.upstream_api_key}"}
            if settings.upstream_api_key else {}
        )
        self.supervisor = (
            ProcessSupervisor(settings.upstream_command, log_path=log_dir / "upstream.log")
            if settings.upstream_command else None
        )
        self.health_interval_s = health_interval_s
        self._client: httpx.AsyncClient | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._answering = False
        # Supervisor launch count at the last answer: an answer from before a restart must not
        # vouch for the process that replaced it.
        self._answered_launch = 0

    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            headers=self.headers,
            timeout=httpx.Timeout(self.settings.upstream_timeout_s, connect=10.0),
            # A few connections beyond the request limit so the health probe never queues.
            limits=httpx.Limits(max_connections=self.max_concurrency + 4),
        )
        models_url = f"{self.url}/models"
        timeout = self.settings.upstream_startup_timeout_s
        try:
            if self.supervisor is not None:
                await self.supervisor.start()
                await self.supervisor.wait_ready(models_url, timeout, self.headers)
            else:
                # A remote upstream may be starting alongside us (compose, k8s): wait for it too.
                await wait_for_http(models_url, timeout, self.headers)
            await self._discover_model()
        except BaseException:
            await self.close()
            raise
        self._answering, self._answered_launch = True, self._launches()
        self._health_task = asyncio.create_task(self._poll_health(), name="upstream-health")

    async def _discover_model(self) -> None:
        assert self._client is not None
        resp = await self._client.get(f"{self.url}/models")
        resp.raise_for_status()
        models = resp.json().get("data", [])
        ids = [m["id"] for m in models]
        if self.upstream_model is None:
            if not ids:
                raise RuntimeError(f"{self.url}/models lists no model")
            self.upstream_model = ids[0]
        elif self.upstream_model not in ids:
            log.warning("upstream_model %r is not among the upstream's models %s",
                        self.upstream_model, ids)
        self.model_name = self.settings.served_model_name or self.upstream_model
        self.model_version = f"upstream:{self.upstream_model}"
        self.upstream_root = next(
            (m.get("root") for m in models if m["id"] == self.upstream_model), None)
        log.info("upstream %s serves %s", self.url, self.upstream_model)

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self.supervisor is not None:
            await self.supervisor.stop()
        self._answering = False

    def healthy(self) -> bool:
        if self._client is None or not self._answering:
            return False
        alive = self.supervisor is None or self.supervisor.alive
        return alive and self._answered_launch == self._launches()

    def _launches(self) -> int:
        return 0 if self.supervisor is None else self.supervisor.launches

    async def _poll_health(self) -> None:
        assert self._client is not None
        while True:
            await asyncio.sleep(self.health_interval_s)
            launch = self._launches()
            try:
                resp = await self._client.get(f"{self.url}/models",
                                              timeout=httpx.Timeout(5.0, connect=2.0))
            except (httpx.ConnectError, httpx.ConnectTimeout):
                self._answering = False
                continue
            except httpx.HTTPError:
                # Slow or a stale kept-alive connection: some servers (llama-cpp-python's) answer
                # /models only between generations, and a busy upstream is not a dead one.
                continue
            self._answering = resp.status_code < 500
            self._answered_launch = launch

    async def load_adapter(self, name: str, path: Path) -> None:
        """Load a peft LoRA adapter into the upstream under model id `name` (vLLM's runtime
        loading; it needs `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING`).
        `load_inplace` replaces the weights of a name already loaded instead of failing, so
        loading the same version again (a retried publish, a restart) is harmless. With
        `lora_resolver_dir`, the adapter is loaded from its copy there (see the module's doc)."""
        if self.settings.lora_resolver_dir is not None:
            if name.startswith(".") or Path(name).name != name:
                raise ValueError(f"adapter name {name!r} cannot name a directory")
            path = await asyncio.to_thread(_place_for_resolver, path,
                                           self.settings.lora_resolver_dir / name,
                                           self.upstream_root)
        await self._admin("/load_lora_adapter", _load_body(name, path))

    async def unload_adapter(self, name: str) -> None:
        await self._admin("/unload_lora_adapter", {"lora_name": name})

    async def sleep(self) -> None:
        """Put vLLM to sleep at level 1: weights offloaded to CPU RAM, KV cache dropped, the
        process and its adapters' names kept (`--enable-sleep-mode`; the route is served only
        with `VLLM_SERVER_DEV_MODE=1`). Requests in flight are aborted: drain first."""
        await self._root_call("/sleep?level=1", {})

    async def wake_up(self) -> None:
        """Bring the weights back and reallocate the KV cache after `sleep`."""
        answer = await self._root_call("/wake_up", {})
        if isinstance(answer, dict) and answer.get("status") not in (None, "awake"):
            raise UpstreamFailed(f"upstream did not wake fully: {answer}")

    async def _admin(self, path: str, body: dict[str, Any]) -> None:
        if self._client is None:
            raise EngineUnavailable("the upstream engine is not started")
        await _post_ok(self._client, self.url + path, body)

    async def tokenize(self, prompt: str | list[dict[str, Any]], *, add_special_tokens: bool,
                       add_generation_prompt: bool = True,
                       template_kwargs: dict[str, Any] | None = None,
                       token_strs: bool = False, model: str | None = None) -> Tokens:
        """vLLM's /tokenize, which it serves beside /v1 (not under it)."""
        body: dict[str, Any] = {"model": model or self.upstream_model,
                                "add_special_tokens": add_special_tokens,
                                "return_token_strs": token_strs}
        if isinstance(prompt, str):
            body["prompt"] = prompt
        else:
            body.update(messages=prompt, add_generation_prompt=add_generation_prompt)
            if template_kwargs:
                body["chat_template_kwargs"] = _with_enable_thinking(template_kwargs)
        answer = await self._root_call("/tokenize", body)
        try:
            strs = answer.get("token_strs")
            return Tokens([int(t) for t in answer["tokens"]], int(answer["max_model_len"]),
                          None if strs is None else [_text(t) for t in strs])
        except (AttributeError, KeyError, TypeError, ValueError):
            raise UpstreamFailed(
                "upstream answered /tokenize in a shape that is not vLLM's") from None

    async def detokenize(self, tokens: list[int], *, model: str | None = None) -> str:
        answer = await self._root_call("/detokenize",
                                       {"model": model or self.upstream_model, "tokens": tokens})
        try:
            return _text(answer["prompt"])
        except (KeyError, TypeError):
            raise UpstreamFailed(
                "upstream answered /detokenize in a shape that is not vLLM's") from None

    async def _root_call(self, path: str, body: dict[str, Any]) -> Any:
        """POST `body` to `path` at the upstream's root (its URL without `/v1`): its JSON."""
        if self._client is None:
            raise EngineUnavailable("the upstream engine is not started")
        try:
            resp = await self._client.post(self.url.removesuffix("/v1") + path, json=body)
        except httpx.ConnectError as exc:
            raise EngineUnavailable(f"upstream unreachable: {exc}") from exc
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"upstream failed ({type(exc).__name__})") from exc
        if resp.status_code == 404:  # not vLLM: llama-server and hosted APIs have no such route
            raise EngineError(f"the upstream model server does not serve {path}", status=404,
                              code="not_supported")
        if resp.status_code >= 400:
            raise _upstream_error(resp.status_code, resp.content)
        try:
            return resp.json()
        except ValueError:
            raise UpstreamFailed(
                f"upstream answered {path} with something that is not JSON") from None

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams,
             template_kwargs: dict[str, Any], *, model: str | None = None
             ) -> AsyncIterator[Event]:
        body: dict[str, Any] = {"messages": messages, **self._sampling(params, model)}
        if params.top_logprobs is not None:
            body["logprobs"] = True
            body["top_logprobs"] = params.top_logprobs
        if template_kwargs:
            body["chat_template_kwargs"] = _with_enable_thinking(template_kwargs)
        if not params.tools:
            return self._stream("/chat/completions", body, _chat_delta, params.n)
        body.update(tools=params.tools, tool_choice=params.tool_choice,
                    parallel_tool_calls=params.parallel_tool_calls)
        events = self._stream("/chat/completions", body, _chat_delta, params.n)
        if params.tool_choice == "none":
            return events
        # The upstream's parser (vLLM's `--tool-call-parser hermes`) sends its calls as
        # tool_calls; a block it left in the text (one written inside the reasoning, or an
        # upstream without a parser) is parsed here, by the same rule as the embedded engine.
        return with_tool_calls(events, params.n, params.parallel_tool_calls)

    def complete(self, prompt: str, params: SamplingParams, *, model: str | None = None
                 ) -> AsyncIterator[Event]:
        body: dict[str, Any] = {"prompt": prompt, **self._sampling(params, model)}
        if params.top_logprobs is not None:
            body["logprobs"] = params.top_logprobs
        return self._stream("/completions", body, _text_delta, params.n)

    def _sampling(self, params: SamplingParams, model: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model or self.upstream_model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": params.temperature,
            "top_p": params.top_p,
            "n": params.n,
        }
        if params.max_tokens is not None:
            body["max_tokens"] = params.max_tokens
        if params.seed is not None:
            body["seed"] = params.seed
        if params.ignore_eos:
            body["ignore_eos"] = True
        if params.stop:
            body["stop"] = params.stop
        # The other sampling fields under OpenAI's and vLLM's names, only when they do anything.
        defaults = SamplingParams()
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
                     "top_k", "min_p", "min_tokens", "stop_token_ids"):
            if getattr(params, name) != getattr(defaults, name):
                body[name] = getattr(params, name)
        if params.json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "response", "schema": params.json_schema},
            }
        elif params.json_object:
            body["response_format"] = {"type": "json_object"}
        return body

    async def _stream(self, path: str, body: dict[str, Any],
                      to_delta: Callable[[dict[str, Any]], Delta | None], n: int
                      ) -> AsyncIterator[Event]:
        """POST a streamed request for `n` choices; yield its deltas, then one Usage.

        Upstreams that ignore `include_usage` (llama-cpp-python's server) get their completion
        tokens counted from the stream instead: one per logprob entry when logprobs were asked
        for, else one per text chunk, which is what token-by-token servers send.
        """
        if self._client is None:
            raise EngineUnavailable("the upstream engine is not started")
        usage: Usage | None = None
        counted = 0
        done = False
        try:
            resp = await self._send(self._client.build_request("POST", self.url + path, json=body))
            # Closing the response, also when the consumer closes us early, closes the HTTP
            # stream, and the upstream stops generating for a client that went away.
            try:
                if resp.status_code >= 400:
                    raise _upstream_error(resp.status_code, await resp.aread())
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue  # blank separators, `: ping` comments, `event:` lines
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    chunk_usage, deltas = _read_chunk(data, to_delta, n)
                    usage = chunk_usage or usage
                    for delta in deltas:
                        delta.tokens = len(delta.logprobs) or int(bool(
                            delta.content or delta.reasoning or delta.tool_calls))
                        counted += delta.tokens
                        yield delta
            finally:
                await resp.aclose()
        except httpx.ConnectError as exc:
            self._answering = False
            raise EngineUnavailable(f"upstream unreachable: {exc}") from exc
        except httpx.TimeoutException as exc:
            raise EngineUnavailable(f"upstream timed out ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise EngineUnavailable(f"upstream broke off the response: {exc}") from exc
        if not done:
            raise EngineUnavailable("upstream closed the stream before [DONE]")
        yield usage if usage is not None else Usage(0, counted)

    async def _send(self, request: httpx.Request) -> httpx.Response:
        assert self._client is not None
        try:
            return await self._client.send(request, stream=True)
        except (httpx.RemoteProtocolError, httpx.ReadError):
            # The kept-alive connection we picked had just been closed by the upstream (servers
            # close after a failed response): no response began, so try once on a fresh one.
            return await self._client.send(request, stream=True)


def _with_enable_thinking(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Our `thinking_mode` on/off, also as Qwen3's `enable_thinking`: vLLM's qwen3 reasoning
    parser reads the whole reply as reasoning unless that is false, and templates ignore the key
    they do not use."""
    mode = kwargs.get("thinking_mode")
    if mode not in ("on", "off") or "enable_thinking" in kwargs:
        return kwargs
    return {**kwargs, "enable_thinking": mode == "on"}


def _place_for_resolver(source: Path, target: Path, base_model: str | None) -> Path:
    """Copy the peft adapter `source` to `target` (returned) as vLLM's filesystem resolver reads
    it: its `base_model_name_or_path` set to `base_model` (the upstream's `--model`; left as it is
    when the upstream does not say), and whole before it appears (copied beside it, then renamed
    into place). An identical copy already there is kept: another gateway placed it."""
    config = (source / "adapter_config.json").read_bytes()
    if base_model is not None:
        config = json.dumps(json.loads(config) | {"base_model_name_or_path": base_model},
                            indent=2).encode()
    if _same_adapter(source, target, config):
        return target
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    try:
        shutil.copytree(source, staging)
        (staging / "adapter_config.json").write_bytes(config)
        os.chmod(staging, 0o755)  # vLLM may run as another user
        try:
            os.rename(staging, target)
        except OSError:  # a copy is there already: another gateway's, or a stale one
            if _same_adapter(source, target, config):
                return target
            # No rename swaps two directories at once: a resolve in between finds none, and
            # vLLM answers that request 404.
            stale = staging.with_name(staging.name + ".stale")
            os.rename(target, stale)
            os.rename(staging, target)
            shutil.rmtree(stale, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _same_adapter(source: Path, target: Path, config: bytes) -> bool:
    """Whether `target` holds the files of `source`, byte for byte, with `config` as its
    adapter_config.json."""
    if not target.is_dir():
        return False
    names = {p.relative_to(source) for p in source.rglob("*") if p.is_file()}
    if names != {p.relative_to(target) for p in target.rglob("*") if p.is_file()}:
        return False
    return (target / "adapter_config.json").read_bytes() == config and all(
        filecmp.cmp(source / name, target / name, shallow=False)
        for name in names if name != Path("adapter_config.json"))


def _load_body(name: str, path: Path) -> dict[str, Any]:
    return {"lora_name": name, "lora_path": str(path), "load_inplace": True}


async def _post_ok(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> None:
    resp = await client.post(url, json=body)
    if resp.status_code >= 400:
        raise _upstream_error(resp.status_code, resp.content)


class UpstreamModel(Engine):
    """One model id of a shared, started upstream: its own model, or a LoRA adapter it loads on
    `start` and unloads on `close`. The upstream itself (its process, client and health) belongs
    to whoever started it; closing this never stops it."""

    def __init__(self, upstream: OpenAIUpstreamEngine, adapter: tuple[str, Path] | None = None,
                 *, unload_on_close: bool = True) -> None:
        self.upstream = upstream
        self.adapter = adapter
        self.unload_on_close = unload_on_close
        self.max_concurrency = upstream.max_concurrency
        self.model_name = upstream.model_name
        self.model_version = upstream.model_version if adapter is None else f"lora:{adapter[0]}"

    async def start(self) -> None:
        """Load the adapter; again after a wake it is harmless (`load_inplace`)."""
        if self.adapter is not None:
            await self.upstream.load_adapter(*self.adapter)

    async def close(self) -> None:
        if self.adapter is not None and self.unload_on_close and self.upstream.healthy():
            try:
                await self.upstream.unload_adapter(self.adapter[0])
            except (EngineError, httpx.HTTPError) as exc:  # it only costs upstream memory
                log.warning("could not unload adapter %s: %s", self.adapter[0], exc)

    def healthy(self) -> bool:
        return self.upstream.healthy()

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams,
             template_kwargs: dict[str, Any]) -> AsyncIterator[Event]:
        return self.upstream.chat(messages, params, template_kwargs, model=self._model)

    def complete(self, prompt: str, params: SamplingParams) -> AsyncIterator[Event]:
        return self.upstream.complete(prompt, params, model=self._model)

    async def tokenize(self, prompt: str | list[dict[str, Any]], *, add_special_tokens: bool,
                       add_generation_prompt: bool = True,
                       template_kwargs: dict[str, Any] | None = None,
                       token_strs: bool = False) -> Tokens:
        return await self.upstream.tokenize(
            prompt, add_special_tokens=add_special_tokens,
            add_generation_prompt=add_generation_prompt, template_kwargs=template_kwargs,
            token_strs=token_strs, model=self._model)

    async def detokenize(self, tokens: list[int]) -> str:
        return await self.upstream.detokenize(tokens, model=self._model)

    @property
    def _model(self) -> str | None:
        return None if self.adapter is None else self.adapter[0]


def _read_chunk(data: str, to_delta: Callable[[dict[str, Any]], Delta | None], n: int
                ) -> tuple[Usage | None, list[Delta]]:
    """The usage and the deltas of one stream chunk; `UpstreamFailed` for an error chunk or
    anything that is not a chunk of an `n`-choice stream."""
    try:
        chunk = json.loads(data)
    except ValueError:
        raise UpstreamFailed("upstream sent a stream chunk that is not JSON") from None
    if isinstance(chunk, dict) and "error" in chunk:
        # vLLM reports a failure after the response started as an error chunk in the stream.
        raise UpstreamFailed(f"upstream failed mid-stream: {_error_fields(chunk)[0]}")
    try:
        raw = chunk.get("usage")
        usage = Usage(int(raw.get("prompt_tokens") or 0),
                      int(raw.get("completion_tokens") or 0)) if raw else None
        deltas = [d for d in map(to_delta, chunk.get("choices") or []) if d is not None]
    except (AttributeError, KeyError, OverflowError, TypeError, ValueError) as exc:
        raise UpstreamFailed(
            f"upstream sent a malformed stream chunk ({type(exc).__name__})") from None
    if any(not 0 <= d.index < n for d in deltas):
        raise UpstreamFailed(f"upstream sent a choice index outside the {n} asked for")
    return usage, deltas


def _finish_reason(reason: Any) -> str | None:
    """An upstream's finish reason as OpenAI's; `UpstreamFailed` for one that means the generation
    failed (vLLM's `abort`) or that OpenAI does not know."""
    if reason is None or reason in _OPENAI_FINISH_REASONS:
        return reason
    if reason == "abort":
        raise UpstreamFailed("upstream aborted the generation (finish_reason 'abort')")
    raise UpstreamFailed(f"upstream ended the generation with finish_reason "
                         f"{str(reason)[:40]!r}, which OpenAI does not define")


def _error_fields(body: Any) -> tuple[str, str | None, str | None]:
    """(message, code, param) from the error shapes in use: OpenAI's `{"error": {...}}`, vLLM's
    flat `{"object": "error", "message": ...}`, FastAPI's `{"detail": ...}`."""
    if not isinstance(body, dict):
        return str(body), None, None
    err = body["error"] if isinstance(body.get("error"), dict) else body
    detail = body.get("detail")
    if isinstance(detail, list):
        detail = "; ".join(str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail)
    message = err.get("message") or detail or json.dumps(body)
    code = err.get("code")
    param = err.get("param")
    return (
        message if isinstance(message, str) else json.dumps(message),
        code if isinstance(code, str) else None,  # vLLM puts the HTTP status (an int) there
        param if isinstance(param, str) else None,
    )


def _upstream_error(status: int, raw: bytes) -> EngineError:
    try:
        body: Any = json.loads(raw)
    except ValueError:
        body = raw.decode("utf-8", "replace")[:500] or f"HTTP {status}"
    message, code, param = _error_fields(body)
    if status >= 500 or status in (401, 403):
        # A failing upstream, or one that rejects *our* credentials, is our outage, not the
        # client's mistake.
        return EngineUnavailable(f"upstream answered {status}: {message}")
    return EngineError(message, status=status, code=code, param=param)


def _text(value: Any) -> str:
    """A text field of a chunk; a TypeError (a malformed chunk) unless it is a string or null."""
    if value is None or isinstance(value, str):
        return value or ""
    raise TypeError(f"expected a string, got {type(value).__name__}")


def _top(entry: dict[str, Any]) -> TopLogprob:
    token = _text(entry.get("token"))
    raw = entry.get("bytes")
    logprob = entry.get("logprob")
    return TopLogprob(token, _NO_LOGPROB if logprob is None else float(logprob),
                      [int(b) for b in raw] if raw is not None else list(token.encode()))


def _chat_delta(choice: dict[str, Any]) -> Delta | None:
    delta = choice.get("delta") or {}
    logprobs = [
        TokenLogprob(**vars(_top(entry)), top=[_top(t) for t in entry.get("top_logprobs") or []])
        for entry in (choice.get("logprobs") or {}).get("content") or []
    ]
    out = Delta(
        index=int(choice.get("index", 0)),
        content=_text(delta.get("content")),
        reasoning=_text(delta.get("reasoning_content") or delta.get("reasoning")),
        tool_calls=[_call_piece(piece) for piece in delta.get("tool_calls") or []],
        logprobs=logprobs,
        finish_reason=_finish_reason(choice.get("finish_reason")),
    )
    # The opening role-only chunk carries nothing.
    if not (out.content or out.reasoning or out.tool_calls or out.logprobs or out.finish_reason):
        return None
    return out


def _call_piece(piece: dict[str, Any]) -> ToolCallDelta:
    """A streamed call piece as OpenAI (and vLLM) send it; a malformed one is a TypeError or
    KeyError, which makes the chunk malformed."""
    function = piece.get("function") or {}
    index = piece["index"]
    if not isinstance(index, int) or not 0 <= index < 1024:
        raise ValueError("a tool call's index must be a small integer")
    return ToolCallDelta(index=index, id=_text(piece.get("id")) or None,
                         name=_text(function.get("name")) or None,
                         arguments=_text(function.get("arguments")))


def _text_delta(choice: dict[str, Any]) -> Delta | None:
    lp = choice.get("logprobs") or {}
    tops = lp.get("top_logprobs") or []
    logprobs = []
    for i, (token, logprob) in enumerate(zip(lp.get("tokens") or [], lp.get("token_logprobs") or [],
                                             strict=False)):
        top = tops[i] if i < len(tops) and tops[i] else {}
        token = _text(token)
        logprobs.append(TokenLogprob(
            token, _NO_LOGPROB if logprob is None else float(logprob), list(token.encode()),
            top=[TopLogprob(t, _NO_LOGPROB if v is None else float(v), list(t.encode()))
                 for t, v in top.items()],
        ))
    out = Delta(index=int(choice.get("index", 0)), content=_text(choice.get("text")),
                logprobs=logprobs, finish_reason=_finish_reason(choice.get("finish_reason")))
    if not (out.content or out.logprobs or out.finish_reason):
        return None
    return out
