"""One way for verifier parts (judge, rubric generator, patient simulator) to call a model.

`ChatClient.chat` sends messages and returns the reply text. `HttpChatClient` talks to any
OpenAI-compatible base URL (our server, vLLM, a hosted judge); `EngineChatClient` drives one of our
engines in-process (no HTTP), which is how tests and the CLI run on the tiny model. Both bound their
concurrency, and both pass `response_format` through, so a json_schema is enforced wherever the
engine can (a grammar on llama.cpp).

An HTTP client takes its API key from `open_client(api_key=...)`, else from the environment: the
variable named after the command's option (`--judge-key` reads `CLINICLOOP_JUDGE_API_KEY`), then
`CLINICLOOP_CLIENT_API_KEY`, then `OPENAI_API_KEY`. A key the server refuses (401/403) is a
`KeyRefused`, one line naming the URL and where the key comes from; other failed calls are a
`ChatError` whose `retryable` says whether trying again can help (a 4xx cannot).

Our clients are the project's own traffic: by default they send `X-Clinicloop-Origin: service`, so
a clinicloop gateway logs their turns apart from patient traffic (with a service key it does so
anyway), never to be trained on or scored. `verify simulate`'s doctor is the exception: its turns
are the consultations to score.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx

from clinicloop.backends.base import Delta, Engine, EngineError, SamplingParams
from clinicloop.config import DEFAULT_MODELS_DIR, EngineSettings
from clinicloop.errors import UserError

Origin = Literal["client", "service"]
ORIGIN_HEADER = "X-Clinicloop-Origin"
#: What a benchmark or load test tells its user about where its requests end up.
TRAFFIC_NOTE = (
    f"Traffic: sent with `{ORIGIN_HEADER}: service`, so a clinicloop server logs it in its own "
    "store (its store.url) as service traffic, never trained on or scored. A server with keys "
    "honours the header for an admin key, and a service key (server.service_keys) marks it "
    "anyway; with a client key it is logged as patients' traffic.")
#: Where a key comes from when its own option and variable are unset, in order.
FALLBACK_KEY_ENV = ("CLINICLOOP_CLIENT_API_KEY", "OPENAI_API_KEY")


class ChatError(Exception):
    """The model endpoint failed (not: the model said something unparseable). `status` is the
    HTTP status (None: no answer); the message is the server's own."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message if status is None else f"{status}: {message}")
        self.status = status

    @property
    def retryable(self) -> bool:
        """No answer, 429 or 5xx: another try may succeed; any other 4xx will fail again."""
        return self.status is None or self.status == 429 or self.status >= 500


class KeyRefused(UserError):
    """The server refused the API key, or wanted one."""


def key_env(option: str) -> str:
    """The variable that stands in for a key option: `--judge-key` -> CLINICLOOP_JUDGE_API_KEY."""
    name = option.lstrip("-").removesuffix("-key").replace("-", "_").upper()
    return f"CLINICLOOP_{name}_API_KEY"


def resolve_key(api_key: str | None, option: str | None) -> str | None:
    """`api_key`, else the option's variable, else the fallbacks (`FALLBACK_KEY_ENV`)."""
    if api_key:
        return api_key
    names = ([key_env(option)] if option else []) + list(FALLBACK_KEY_ENV)
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def _server_message(r: httpx.Response) -> str:
    """The OpenAI error body's message, else the start of the body."""
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text[:500]


class ChatClient(Protocol):
    model: str

    async def chat(self, messages: list[dict[str, Any]], *, max_tokens: int = 512,
                   temperature: float = 0.0, seed: int | None = 0,
                   json_schema: dict[str, Any] | None = None,
                   template_kwargs: dict[str, Any] | None = None) -> str: ...


class HttpChatClient:
    """`key_option`: the command option that gives this URL's key, named when the key is refused
    (None: only the fallback variables). `origin`: what a clinicloop gateway logs our turns as."""

    def __init__(self, base_url: str, *, api_key: str | None = None,
                 key_option: str | None = None, origin: Origin = "service",
                 model: str | None = None, concurrency: int = 8,
                 timeout_s: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.key_option = key_option
        self._model = model
        self._slots = asyncio.Semaphore(concurrency)
        self._has_key = bool(api_key)
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        if origin == "service":
            headers[ORIGIN_HEADER] = "service"
        self._http = httpx.AsyncClient(headers=headers, timeout=timeout_s)
        #: The endpoint is a clinicloop gateway, which logs every turn in its own store (known
        #: after `connect`, from its /v1/models cards).
        self.logs_traffic = False

    @property
    def model(self) -> str:
        return self._model or ""

    async def connect(self) -> None:
        """Check the key on /v1/models, learn whether the endpoint logs its traffic, and resolve
        the model: as configured, else the endpoint's first /v1/models entry."""
        try:
            r = await self._http.get(self.base_url + "/models")
        except httpx.HTTPError as exc:
            raise UserError(f"cannot reach {self.base_url} ({type(exc).__name__}): is the server "
                            "running, and does the URL end in /v1?") from None
        self._check_key(r)
        cards = r.json().get("data", []) if r.status_code == 200 else []
        self.logs_traffic = any(c.get("owned_by") == "clinicloop" for c in cards)
        if self._model is None:
            if not cards:
                raise UserError(f"{self.base_url}/models answered {r.status_code} with no model: "
                                "name the model with the command's model option")
            self._model = cards[0]["id"]

    def _check_key(self, r: httpx.Response) -> None:
        if r.status_code not in (401, 403):
            return
        where = " or ".join(
            ([self.key_option, key_env(self.key_option)] if self.key_option else [])
            + list(FALLBACK_KEY_ENV))
        told = "refused the key" if self._has_key else "wants an API key"
        raise KeyRefused(f"{self.base_url} {told} ({r.status_code}: {_server_message(r)}); "
                         f"give its key with {where}")

    async def chat(self, messages: list[dict[str, Any]], *, max_tokens: int = 512,
                   temperature: float = 0.0, seed: int | None = 0,
                   json_schema: dict[str, Any] | None = None,
                   template_kwargs: dict[str, Any] | None = None) -> str:
        body: dict[str, Any] = {"model": self.model, "messages": messages,
                                "max_tokens": max_tokens, "temperature": temperature}
        if seed is not None:
            body["seed"] = seed
        if json_schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "response", "schema": json_schema, "strict": True}}
        if template_kwargs:
            body["chat_template_kwargs"] = template_kwargs
        async with self._slots:
            try:
                r = await self._http.post(self.base_url + "/chat/completions", json=body)
            except httpx.HTTPError as exc:
                raise ChatError(f"{type(exc).__name__}: {exc}") from exc
        self._check_key(r)
        if r.status_code != 200:
            raise ChatError(_server_message(r), r.status_code)
        return r.json()["choices"][0]["message"]["content"] or ""

    async def aclose(self) -> None:
        await self._http.aclose()


class EngineChatClient:
    """Our engine, in-process. The engine must be started by the caller."""

    def __init__(self, engine: Engine, *, concurrency: int | None = None) -> None:
        self.engine = engine
        self._slots = asyncio.Semaphore(concurrency or engine.max_concurrency)

    @property
    def model(self) -> str:
        return self.engine.model_name

    async def chat(self, messages: list[dict[str, Any]], *, max_tokens: int = 512,
                   temperature: float = 0.0, seed: int | None = 0,
                   json_schema: dict[str, Any] | None = None,
                   template_kwargs: dict[str, Any] | None = None) -> str:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed,
                                json_schema=json_schema)
        parts: list[str] = []
        async with self._slots:
            try:
                async for event in self.engine.chat(messages, params, template_kwargs or {}):
                    if isinstance(event, Delta):
                        parts.append(event.content)
            except EngineError as exc:  # what the gateway would answer with exc.status
                raise ChatError(str(exc), exc.status) from exc
            except Exception as exc:
                raise ChatError(f"{type(exc).__name__}: {exc}") from exc
        return "".join(parts)

    async def aclose(self) -> None:
        return None


@asynccontextmanager
async def open_client(url: str | None = None, *, api_key: str | None = None,
                      key_option: str | None = None, origin: Origin = "service",
                      model: str | None = None, gguf: Path | None = None,
                      lora: Path | None = None, models_dir: Path = DEFAULT_MODELS_DIR,
                      n_ctx: int = 4096, concurrency: int = 8) -> AsyncIterator[ChatClient]:
    """A client for an OpenAI-compatible base URL, else for `gguf` run in-process (the tiny
    model when None); closed on exit. An HTTP client's key is `api_key` or the environment's
    (`resolve_key`, `key_option` naming the command's option), checked on open, when its model
    is resolved too, so `.model` names it from the first use (verdict cache keys and stored rows
    depend on it). `lora`: a llama.cpp LoRA adapter GGUF applied on top of `gguf`."""
    if url:
        client = HttpChatClient(url, api_key=resolve_key(api_key, key_option),
                                key_option=key_option, origin=origin, model=model,
                                concurrency=concurrency)
        try:
            await client.connect()
            yield client
        finally:
            await client.aclose()
        return
    from clinicloop.backends.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(EngineSettings(model_path=gguf, lora_path=lora, n_ctx=n_ctx),
                            models_dir)
    await engine.start()
    try:
        yield EngineChatClient(engine)
    finally:
        await engine.close()
