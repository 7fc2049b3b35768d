"""In-process llama.cpp engine (llama-cpp-python) over one GGUF file: the embedded default.

`Llama` loads the model and tokenizer; decoding runs on a context of our own with one KV-cache
sequence per slot, driven by `BatchScheduler` (continuous batching, prefix reuse across turns,
speculative decoding by prompt lookup or a draft model with its own context; see `batching.py`,
`drafting.py`). This module turns requests into token sequences
(chat template, context-length check, grammar) and the scheduler's tokens back into events (stop
strings, the reasoning split). Logprobs come from each sequence's own logits row.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from clinicloop.backends.base import (
    Delta,
    Engine,
    EngineError,
    EngineUnavailable,
    Event,
    SamplingParams,
    TokenLogprob,
    Usage,
)
from clinicloop.backends.batching import DONE, BatchScheduler, Request
from clinicloop.backends.chat_template import ChatTemplate
from clinicloop.backends.drafting import Drafter, ModelDrafter, NgramDrafter
from clinicloop.backends.grammar import (
    GrammarError,
    check_grammar,
    json_object_gbnf,
    schema_to_gbnf,
)
from clinicloop.backends.textstream import THINK_OPEN, ReasoningSplitter, StopMatcher
from clinicloop.config import EngineSettings

log = logging.getLogger(__name__)


def file_version(path: Path) -> str:
    """A short content fingerprint that is cheap even for a 20 GB file."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return f"{path.stem}@{h.hexdigest()[:12]}"


def check_same_vocab(target: Any, draft: Any, draft_path: Path) -> None:
    """A draft's tokens are verified by id, so its vocabulary must be the target's."""
    def pieces(llama: Any) -> list[bytes]:
        return [llama.detokenize([i], special=True) for i in range(llama.n_vocab())]

    if target.n_vocab() != draft.n_vocab() or pieces(target) != pieces(draft):
        raise ValueError(f"draft model {draft_path} does not share the served model's vocabulary")


class LlamaCppEngine(Engine):
    def __init__(self, settings: EngineSettings, models_dir: Path) -> None:
        self.settings = settings
        self.models_dir = models_dir
        self.model_name = settings.served_model_name or "loading"
        self.model_version = "loading"
        #: The GGUF file served, once loaded (the tiny model's path is known only then).
        self.model_path: Path | None = None
        self.hf_dir: Path | None = settings.hf_dir
        self._llama: Any = None
        self._context: Any = None
        self._draft: Any = None  # the draft model (`speculative.mode=draft_model`) and its context
        self._draft_context: Any = None
        self._scheduler: BatchScheduler | None = None
        self.max_concurrency = settings.n_parallel
        self._template: ChatTemplate | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="llamacpp")

    def _resolve_model(self) -> Path:
        if self.settings.model_path is not None:
            return self.settings.model_path
        from clinicloop.model.tiny import build_tiny

        tiny = build_tiny(self.settings.tiny_size, out_root=self.models_dir)
        self.model_name = self.settings.served_model_name or tiny.name
        self.hf_dir = tiny.hf_dir
        return tiny.gguf_q8_0 if self.settings.tiny_quant == "q8_0" else tiny.gguf_f16

    def _load(self) -> None:
        spec = self.settings.speculative
        # Refused before minutes of model loading.
        if spec.mode == "eagle3":
            raise ValueError("speculative.mode=eagle3 is for a vLLM upstream; the llamacpp engine "
                             "drafts by prompt lookup (ngram) or with a draft model (draft_model)")
        if spec.mode == "draft_model" and (spec.draft_model is None
                                           or not spec.draft_model.is_file()):
            raise FileNotFoundError(
                f"speculative.draft_model must be a GGUF file for the llamacpp engine, not "
                f"{spec.draft_model}")
        path = self._resolve_model()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF model not found: {path}")
        lora = self.settings.lora_path
        if lora is not None and not lora.is_file():
            raise FileNotFoundError(f"LoRA adapter GGUF not found: {lora}")
        llama = self._open_model(path, lora)
        source = llama.metadata.get("tokenizer.chat_template")
        if not source:
            raise ValueError(f"{path} has no tokenizer.chat_template in its GGUF metadata")

        def token_text(token_id: int) -> str:
            return llama.detokenize([token_id], special=True).decode("utf-8", "replace")

        self._template = ChatTemplate(
            source, bos_token=token_text(llama.token_bos()), eos_token=token_text(llama.token_eos())
        )
        self._llama = llama
        self._context, self._scheduler = self._batching(llama)
        if self.settings.served_model_name is None and self.settings.model_path is not None:
            self.model_name = path.stem
        self.model_version = file_version(path)
        self.model_path = path

    def _open_model(self, path: Path, lora: Path | None = None) -> Any:
        """`Llama` as the model, tokenizer and LoRA adapter; its own context stays minimal."""
        import llama_cpp

        return llama_cpp.Llama(
            model_path=str(path), n_ctx=64, n_batch=64, n_threads=self.settings.n_threads,
            n_gpu_layers=self.settings.n_gpu_layers,
            lora_path=None if lora is None else str(lora), verbose=False,
        )

    def _open_context(self, llama: Any, n_slots: int) -> Any:
        """A context of `llama`'s model with one KV-cache sequence per slot."""
        import llama_cpp
        from llama_cpp import _internals

        s = self.settings
        params = llama_cpp.llama_context_default_params()
        # A KV stream of n_ctx cells per slot: a sequence attends to its own cells only, in
        # position order, so its output does not depend on what else is cached or decoded.
        params.n_ctx = s.n_ctx * n_slots
        params.n_batch = params.n_ubatch = s.n_batch
        params.n_seq_max = n_slots
        params.kv_unified = False
        # Flash attention's f16 accumulation makes a token's logits depend on how its prompt
        # was split into batches; without it, prefix reuse and drafting are exact.
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if s.flash_attn
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        params.n_threads = params.n_threads_batch = s.n_threads
        return _internals.LlamaContext(model=llama._model, params=params, verbose=False)

    def _batching(self, llama: Any) -> tuple[Any, BatchScheduler]:
        import ctypes

        import llama_cpp

        s = self.settings
        n_slots = s.n_parallel + s.prefix_cache_slots
        context = self._open_context(llama, n_slots)
        if llama._lora_adapter is not None:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(llama._lora_adapter)
            scales = (ctypes.c_float * 1)(llama.lora_scale)
            if llama_cpp.llama_set_adapters_lora(context.ctx, adapters, 1, scales):
                raise RuntimeError(f"could not apply the LoRA adapter {s.lora_path}")
        spec = s.speculative
        drafter: Drafter | None = None
        if spec.mode == "ngram":
            drafter = NgramDrafter(spec.ngram)
        elif spec.mode == "draft_model":
            assert spec.draft_model is not None
            self._draft = self._open_model(spec.draft_model)
            check_same_vocab(llama, self._draft, spec.draft_model)
            self._draft_context = self._open_context(self._draft, n_slots)
            drafter = ModelDrafter(self._draft, self._draft_context.ctx, n_slots=n_slots,
                                   n_batch=s.n_batch)
        scheduler = BatchScheduler(
            llama, context.ctx, n_parallel=s.n_parallel, n_slots=n_slots, n_batch=s.n_batch,
            n_ctx_seq=s.n_ctx, drafter=drafter, draft_max=spec.num_draft_tokens)
        return context, scheduler

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._load)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._unload)
        self._executor.shutdown(wait=True)

    def _unload(self) -> None:
        if self._scheduler is not None:
            self._scheduler.close()
            if isinstance(self._scheduler.drafter, ModelDrafter):
                self._scheduler.drafter.close()
            self._scheduler = None
        for name in ("_context", "_draft_context", "_llama", "_draft"):
            if (resource := getattr(self, name)) is not None:
                resource.close()
                setattr(self, name, None)

    def healthy(self) -> bool:
        return self._scheduler is not None and not self._scheduler.dead

    def stats(self) -> dict[str, int]:
        """Cumulative counters of the decode loop (speculative decoding, prefix reuse)."""
        if self._scheduler is None:
            return {}
        spec = self._scheduler.spec
        return {"spec_decode_num_drafts": spec.num_drafts,
                "spec_decode_num_draft_tokens": spec.num_draft_tokens,
                "spec_decode_num_accepted_tokens": spec.num_accepted_tokens,
                "prefix_cache_hit_tokens": self._scheduler.prefix_hits}

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
            prompt, params, lambda: ReasoningSplitter(opened) if thinking else None, "messages"
        )

    def complete(self, prompt: str, params: SamplingParams) -> AsyncIterator[Event]:
        self._require_loaded()
        return self._generate(prompt, params, lambda: None, "prompt")

    def _require_loaded(self) -> None:
        if not self.healthy():
            raise EngineUnavailable("the model is not loaded")

    def _prepare(self, prompt: str, params: SamplingParams,
                 param: str = "messages") -> tuple[list[int], int, str | None]:
        """The prompt's tokens, the completion budget and the grammar: everything a request is
        refused for is found here, before it is admitted."""
        tokens = self._llama.tokenize(prompt.encode(), add_bos=True, special=True)
        if not tokens:  # nothing to decode (a model without BOS): as vLLM words it
            raise EngineError("The decoder prompt cannot be empty", param=param)
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
        return tokens, params.max_tokens or room, self._grammar(params)

    def _grammar(self, params: SamplingParams) -> str | None:
        """The GBNF that constrains the output, compiled by llama.cpp once here (the decode
        thread compiles it again per sequence) so a schema it cannot enforce is a 400."""
        if params.json_schema is None and not params.json_object:
            return None
        assert self._scheduler is not None
        try:
            gbnf = (json_object_gbnf() if params.json_schema is None
                    else schema_to_gbnf(params.json_schema))
            check_grammar(self._scheduler.vocab, gbnf)
        except GrammarError as exc:
            raise EngineError(f"Invalid JSON schema in response_format: {exc}",
                              param="response_format", code="invalid_json_schema") from None
        return gbnf

    async def _generate(
        self, prompt: str, params: SamplingParams,
        splitter: Callable[[], ReasoningSplitter | None], param: str,
    ) -> AsyncIterator[Event]:
        # Validate before the first event so a bad request is a clean 400, not a broken stream.
        tokens, max_tokens, grammar = await asyncio.get_running_loop().run_in_executor(
            self._executor, self._prepare, prompt, params, param
        )
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
        params: SamplingParams, grammar: str | None, splitter: ReasoningSplitter | None,
    ) -> AsyncIterator[Delta | int]:
        """One choice: decoded by the scheduler's thread, post-processed here. Yields Deltas,
        then the number of tokens generated."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def emit(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        scheduler = self._scheduler
        assert scheduler is not None
        request = Request(prompt=tokens, max_tokens=max_tokens, temperature=params.temperature,
                          top_p=params.top_p, seed=seed, grammar=grammar,
                          top_logprobs=params.top_logprobs, ignore_eos=params.ignore_eos,
                          emit=emit)
        cancel = request.cancel
        scheduler.submit(request)
        done = False
        stops = StopMatcher(params.stop)
        pending_logprobs: list[TokenLogprob] = []
        pending_tokens = 0
        finish_reason = "stop"
        try:
            while True:
                item = await queue.get()
                if item is DONE:
                    done = True
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
            scheduler.wake()
            while not done:  # the scheduler ends every request it was given with DONE
                done = await queue.get() is DONE
        yield request.generated


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
