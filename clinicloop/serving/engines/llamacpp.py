"""In-process llama.cpp engine (llama-cpp-python) over one GGUF file: the embedded default.

One `Llama` context, driven from a single worker thread; requests run one at a time
(`max_concurrency = 1`) and the gateway queues the rest. Consecutive requests that share a prompt
prefix (the turns of one conversation) reuse its KV cache through `Llama.generate`'s prefix match.
Logprobs come from the last logits row, so no `logits_all` buffer of n_ctx × n_vocab is needed.
"""

from __future__ import annotations

import asyncio
import codecs
import hashlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from clinicloop.config import EngineSettings
from clinicloop.serving.chat_template import ChatTemplate
from clinicloop.serving.engines.base import (
    Delta,
    Engine,
    EngineError,
    EngineUnavailable,
    Event,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from clinicloop.serving.textstream import THINK_OPEN, ReasoningSplitter, StopMatcher

log = logging.getLogger(__name__)

_DONE = object()
_LAX_CHAR_RULE = r'char ::= [^"\\]'
_STRICT_CHAR_RULE = r'char ::= [^"\\\x7F\x00-\x1F]'


def file_version(path: Path) -> str:
    """A short content fingerprint that is cheap even for a 20 GB file."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return f"{path.stem}@{h.hexdigest()[:12]}"


class LlamaCppEngine(Engine):
    max_concurrency = 1

    def __init__(self, settings: EngineSettings, models_dir: Path) -> None:
        self.settings = settings
        self.models_dir = models_dir
        self.model_name = settings.served_model_name or "loading"
        self.model_version = "loading"
        #: The GGUF file served, once loaded (the tiny model's path is known only then).
        self.model_path: Path | None = None
        self.hf_dir: Path | None = settings.hf_dir
        self._llama: Any = None
        self._template: ChatTemplate | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="llamacpp")
        self._dead = False

    def _resolve_model(self) -> Path:
        if self.settings.model_path is not None:
            return self.settings.model_path
        from clinicloop.model.tiny import build_tiny

        tiny = build_tiny(self.settings.tiny_size, out_root=self.models_dir)
        self.model_name = self.settings.served_model_name or tiny.name
        self.hf_dir = tiny.hf_dir
        return tiny.gguf_q8_0 if self.settings.tiny_quant == "q8_0" else tiny.gguf_f16

    def _load(self) -> None:
        import llama_cpp

        path = self._resolve_model()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF model not found: {path}")
        lora = self.settings.lora_path
        if lora is not None and not lora.is_file():
            raise FileNotFoundError(f"LoRA adapter GGUF not found: {lora}")
        llama = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=self.settings.n_ctx,
            n_threads=self.settings.n_threads,
            n_threads_batch=self.settings.n_threads,
            n_batch=self.settings.n_batch,
            n_gpu_layers=self.settings.n_gpu_layers,
            lora_path=None if lora is None else str(lora),
            verbose=False,
        )
        source = llama.metadata.get("tokenizer.chat_template")
        if not source:
            raise ValueError(f"{path} has no tokenizer.chat_template in its GGUF metadata")

        def token_text(token_id: int) -> str:
            return llama.detokenize([token_id], special=True).decode("utf-8", "replace")

        self._template = ChatTemplate(
            source, bos_token=token_text(llama.token_bos()), eos_token=token_text(llama.token_eos())
        )
        self._llama = llama
        if self.settings.served_model_name is None and self.settings.model_path is not None:
            self.model_name = path.stem
        self.model_version = file_version(path)
        self.model_path = path

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._load)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._unload)
        self._executor.shutdown(wait=True)

    def _unload(self) -> None:
        if self._llama is not None:
            self._llama.close()
            self._llama = None

    def healthy(self) -> bool:
        return self._llama is not None and not self._dead

    @property
    def n_ctx(self) -> int:
        return self.settings.n_ctx

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams,
             template_kwargs: dict[str, Any]) -> AsyncIterator[Event]:
        self._require_loaded()
        assert self._template is not None
        try:
            prompt = self._template.render(messages, **template_kwargs)
        except Exception as exc:  # a template's raise_exception, or bad kwargs
            raise EngineError(f"chat template failed: {exc}", param="messages") from exc
        thinking = self.settings.reasoning_parser == "think"
        opened = thinking and prompt.rstrip().endswith(THINK_OPEN)
        return self._generate(
            prompt, params, lambda: ReasoningSplitter(opened) if thinking else None
        )

    def complete(self, prompt: str, params: SamplingParams) -> AsyncIterator[Event]:
        self._require_loaded()
        return self._generate(prompt, params, lambda: None)

    def _require_loaded(self) -> None:
        if not self.healthy():
            raise EngineUnavailable("the model is not loaded")

    def _prepare(self, prompt: str, params: SamplingParams) -> tuple[list[int], int]:
        tokens = self._llama.tokenize(prompt.encode(), add_bos=True, special=True)
        room = self.n_ctx - len(tokens)
        if room < 1 or (params.max_tokens is not None and params.max_tokens > room):
            asked = params.max_tokens or 0
            raise EngineError(
                f"This model's maximum context length is {self.n_ctx} tokens. However, you "
                f"requested {len(tokens) + asked} tokens ({len(tokens)} in the messages, {asked} "
                "in the completion). Please reduce the length of the messages or completion.",
                code="context_length_exceeded",
                param="messages",
            )
        return tokens, params.max_tokens or room

    def _grammar(self, params: SamplingParams) -> Any:
        import json

        from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar, json_schema_to_gbnf

        try:
            if params.json_schema is not None:
                gbnf = json_schema_to_gbnf(json.dumps(params.json_schema))
                # The binding's string rule lets raw control characters into JSON strings, which
                # strict parsers reject; llama.cpp's own converter excludes them, as we do here.
                gbnf = gbnf.replace(_LAX_CHAR_RULE, _STRICT_CHAR_RULE)
                return LlamaGrammar.from_string(gbnf, verbose=False)
        except Exception as exc:
            raise EngineError(f"unsupported JSON schema: {exc}", param="response_format") from exc
        if params.json_object:
            return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        return None

    async def _generate(
        self, prompt: str, params: SamplingParams, splitter: Callable[[], ReasoningSplitter | None]
    ) -> AsyncIterator[Event]:
        # Validate before the first event so a bad request is a clean 400, not a broken stream.
        tokens, max_tokens = await asyncio.get_running_loop().run_in_executor(
            self._executor, self._prepare, prompt, params
        )
        grammar = self._grammar(params)
        completion_tokens = 0
        for index in range(params.n):
            seed = None if params.seed is None else params.seed + index
            async for event in self._sequence(index, tokens, max_tokens, seed, params, grammar,
                                              splitter()):
                if isinstance(event, int):
                    completion_tokens += event
                else:
                    yield event
        yield Usage(prompt_tokens=len(tokens), completion_tokens=completion_tokens)

    async def _sequence(
        self, index: int, tokens: list[int], max_tokens: int, seed: int | None,
        params: SamplingParams, grammar: Any, splitter: ReasoningSplitter | None,
    ) -> AsyncIterator[Delta | int]:
        """One choice: decode in the worker thread, post-process text here. Yields Deltas, then
        the number of tokens generated."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        job = loop.run_in_executor(
            self._executor, self._decode, tokens, max_tokens, seed, params, grammar, cancel, emit
        )
        stops = StopMatcher(params.stop)
        pending_logprobs: list[TokenLogprob] = []
        pending_tokens = 0
        finish_reason = "stop"
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                kind, payload, logprob = item
                if kind == "finish":
                    finish_reason = payload
                    continue
                pending_tokens += 1
                if logprob is not None:
                    pending_logprobs.append(logprob)
                text, stopped = stops.push(payload)
                if stopped:
                    cancel.set()
                    finish_reason = "stop"
                delta = _split(index, text, splitter, pending_logprobs)
                if delta is not None:
                    delta.tokens, pending_tokens, pending_logprobs = pending_tokens, 0, []
                    yield delta
                if stopped:
                    break
            tail = "" if cancel.is_set() else stops.flush()
            last = _split(index, tail, splitter, pending_logprobs, final=True) or Delta(index)
            last.finish_reason = finish_reason
            last.tokens = pending_tokens
            yield last
        finally:
            cancel.set()
            generated = await job
        yield generated

    def _decode(self, tokens: list[int], max_tokens: int, seed: int | None,
                params: SamplingParams, grammar: Any, cancel: threading.Event,
                emit: Callable[[Any], None]) -> int:
        """Worker thread: sample tokens and emit ("token", text, logprob) items."""
        import llama_cpp

        llama = self._llama
        llama.set_seed(llama_cpp.LLAMA_DEFAULT_SEED if seed is None else seed)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        vocab = llama_cpp.llama_model_get_vocab(llama.model)
        generated = 0
        finish = "length"
        try:
            for token in llama.generate(
                tokens, top_k=0, top_p=params.top_p, min_p=0.0, temp=params.temperature,
                repeat_penalty=1.0, grammar=grammar,
            ):
                if cancel.is_set():
                    finish = "stop"
                    break
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    finish = "stop"
                    break
                generated += 1
                logprob = None
                if params.top_logprobs is not None:
                    logprob = self._logprob(token, params.top_logprobs)
                emit(("token", decoder.decode(llama.detokenize([token], special=True)), logprob))
                if generated >= max_tokens:
                    break
        except Exception:
            log.exception("llama.cpp decode failed")
            self._dead = True
            finish = "error"
        emit(("finish", finish, None))
        emit(_DONE)
        return generated

    def _logprob(self, token: int, top: int) -> TokenLogprob:
        llama = self._llama
        logits = np.ctypeslib.as_array(llama._ctx.get_logits_ith(-1), shape=(llama.n_vocab(),))
        logprobs = logits - np.logaddexp.reduce(logits.astype(np.float64))

        def entry(tid: int) -> TopLogprob:
            raw = llama.detokenize([int(tid)], special=True)
            return TopLogprob(raw.decode("utf-8", "replace"), float(logprobs[tid]), list(raw))

        best = np.argsort(-logprobs)[:top] if top else []
        chosen = entry(token)
        return TokenLogprob(chosen.token, chosen.logprob, chosen.bytes,
                            top=[entry(int(t)) for t in best])


def _split(index: int, text: str, splitter: ReasoningSplitter | None,
           logprobs: list[TokenLogprob], final: bool = False) -> Delta | None:
    """A Delta for `text`, or None when nothing is releasable yet."""
    if splitter is None:
        reasoning, content = "", text
    else:
        reasoning, content = splitter.push(text)
        if final:
            r, c = splitter.flush()
            reasoning, content = reasoning + r, content + c
    if not (reasoning or content or (final and logprobs)):
        return None
    return Delta(index, content=content, reasoning=reasoning, logprobs=list(logprobs))
