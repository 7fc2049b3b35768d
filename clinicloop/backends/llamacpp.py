"""In-process llama.cpp engine (llama-cpp-python) over one GGUF file: the embedded default.

`LlamaCppModel` is a loaded GGUF (`Llama`: weights, vocabulary, chat template, metadata), shared
by reference count between the engines of the versions it serves: versions that differ by a LoRA
are one engine each on the same base, each with a context of its own (its KV cache, scheduler and
decode thread) and its adapter applied to that context at runtime, so a canary or a swap adds an
adapter and a KV cache, never a second copy of the weights. Decoding runs on that context with one
KV-cache sequence per slot, driven by `BatchScheduler` (continuous batching, prefix reuse across
turns, speculative decoding by prompt lookup or a draft model with its own context; see
`batching.py`, `drafting.py`). This module turns requests into token sequences (chat template,
context-length check, grammar) and the scheduler's tokens back into events (stop strings, the
reasoning split). Logprobs come from each sequence's own logits row.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import dataclasses
import hashlib
import logging
import math
import threading
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
    Tokens,
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
    tool_call_gbnf,
)
from clinicloop.backends.textstream import THINK_OPEN, ReasoningSplitter, StopMatcher
from clinicloop.backends.toolcalls import TOOL_CALL_OPEN, parse_arguments, with_tool_calls
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


#: Bytes per elements of each KV-cache type (ggml's block sizes: 32 values in 34 / 18 bytes).
_CACHE_BYTES = {"f16": (2, 1), "q8_0": (34, 32), "q4_0": (18, 32)}


def open_llama(path: Path, settings: EngineSettings) -> Any:
    """`Llama` as the model and tokenizer; its own context stays minimal (we decode on ours)."""
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(path), n_ctx=64, n_batch=64, n_threads=settings.n_threads,
        n_gpu_layers=settings.n_gpu_layers, verbose=False,
    )


class LlamaCppModel:
    """A loaded GGUF that engines share: `llama` (weights, vocabulary, metadata), its chat
    template, and the LoRA adapters loaded on it. Reference-counted: whoever holds one calls
    `release` once; the weights are freed at the last release (call it off the event loop)."""

    def __init__(self, llama: Any, path: Path, name: str, hf_dir: Path | None) -> None:
        self.llama = llama
        self.path = path
        #: The served model name and HF weights when the engine's settings give none.
        self.name = name
        self.hf_dir = hf_dir
        self.version = file_version(path)
        #: Measured once at load: the file may be moved or deleted while it serves.
        self.file_bytes = path.stat().st_size
        #: The token that opens a tool call, where the vocabulary has it as one token (Qwen2.5's
        #: and the tiny model's do): banned to honour `tool_choice: none`.
        opener = llama.tokenize(TOOL_CALL_OPEN.encode(), add_bos=False, special=True)
        self.tool_call_token: int | None = opener[0] if len(opener) == 1 else None
        source = llama.metadata.get("tokenizer.chat_template")
        if not source:
            raise ValueError(f"{path} has no tokenizer.chat_template in its GGUF metadata")

        def token_text(token_id: int) -> str:
            return llama.detokenize([token_id], special=True).decode("utf-8", "replace")

        self.template = ChatTemplate(
            source, bos_token=token_text(llama.token_bos()), eos_token=token_text(llama.token_eos())
        )
        self._refs = 1
        # Guards the count and the model's adapter set (engines start and stop on own threads).
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: Path, settings: EngineSettings, name: str,
             hf_dir: Path | None) -> LlamaCppModel:
        llama = open_llama(path, settings)
        try:
            return cls(llama, path, name, hf_dir)
        except BaseException:
            llama.close()
            raise

    @property
    def refs(self) -> int:
        return self._refs

    def share(self) -> LlamaCppModel:
        """This model, with one more reference (the caller releases it)."""
        with self._lock:
            if self._refs == 0:
                raise EngineUnavailable(f"the base model {self.path} was already freed")
            self._refs += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            if self._refs == 0:
                self.llama.close()

    def load_adapter(self, path: Path) -> Any:
        """A LoRA adapter GGUF loaded on these weights (`llama_adapter_lora_init`); the caller
        frees it with `free_adapter` once no context uses it, before its last `release`."""
        import llama_cpp

        with self._lock:
            adapter = llama_cpp.llama_adapter_lora_init(self.llama.model, str(path).encode())
        if not adapter:
            raise ValueError(f"llama.cpp could not load the LoRA adapter {path} on {self.path}")
        return adapter

    def free_adapter(self, adapter: Any) -> None:
        import llama_cpp

        with self._lock:
            llama_cpp.llama_adapter_lora_free(adapter)


class LlamaCppEngine(Engine):
    """One model version: a context (KV cache for `n_parallel` sequences and the idle slots) with
    its scheduler and decode thread, on a base model it loads or, given `base`, shares, with
    `settings.lora_path` applied to its context as a runtime adapter."""

    def __init__(self, settings: EngineSettings, models_dir: Path, *,
                 base: LlamaCppModel | None = None) -> None:
        self.settings = settings
        self.models_dir = models_dir
        self.model_name = settings.served_model_name or "loading"
        self.model_version = "loading"
        #: The GGUF file served, once loaded (the tiny model's path is known only then).
        self.model_path: Path | None = None
        self.hf_dir: Path | None = settings.hf_dir
        #: The loaded base, once started: further versions start on it (`base=engine.base`).
        self.base: LlamaCppModel | None = None
        self._given_base = base
        self._adapter: Any = None
        self._adapter_bytes = 0
        self._context: Any = None
        self._draft: Any = None  # the draft model (`speculative.mode=draft_model`) and its context
        self._draft_context: Any = None
        self._scheduler: BatchScheduler | None = None
        self.max_concurrency = settings.n_parallel
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="llamacpp")

    def _load_base(self) -> LlamaCppModel:
        if self._given_base is not None:
            return self._given_base.share()
        s = self.settings
        if s.model_path is not None:
            path, name, hf_dir = s.model_path, s.model_path.stem, s.hf_dir
        else:
            from clinicloop.model.tiny import find_tiny

            tiny = find_tiny(s.tiny_size, out_root=self.models_dir)
            if tiny is None:  # the first run builds it: torch, minutes
                from clinicloop.model.tiny_train import build_tiny

                tiny = build_tiny(s.tiny_size, out_root=self.models_dir)
            path = tiny.gguf_q8_0 if s.tiny_quant == "q8_0" else tiny.gguf_f16
            name, hf_dir = tiny.name, tiny.hf_dir
        if not path.is_file():
            raise FileNotFoundError(f"GGUF model not found: {path}")
        return LlamaCppModel.load(path, s, name, hf_dir)

    def _load(self) -> None:
        s = self.settings
        spec = s.speculative
        # Refused before minutes of model loading.
        if spec.mode == "eagle3":
            raise ValueError("speculative.mode=eagle3 is for a vLLM upstream; the llamacpp engine "
                             "drafts by prompt lookup (ngram) or with a draft model (draft_model)")
        if spec.mode == "draft_model" and (spec.draft_model is None
                                           or not spec.draft_model.is_file()):
            raise FileNotFoundError(
                f"speculative.draft_model must be a GGUF file for the llamacpp engine, not "
                f"{spec.draft_model}")
        if s.cache_type_v != "f16" and not s.flash_attn:
            raise ValueError(f"engine.cache_type_v={s.cache_type_v} needs engine.flash_attn=true: "
                             "llama.cpp attends over a quantized V cache only with flash attention")
        lora = s.lora_path
        if lora is not None and not lora.is_file():
            raise FileNotFoundError(f"LoRA adapter GGUF not found: {lora}")
        base = self.base = self._load_base()
        try:
            if lora is not None:
                self._adapter = base.load_adapter(lora)
                self._adapter_bytes = lora.stat().st_size
            self._scheduler = self._batching(base.llama)
        except BaseException:
            self._unload()
            raise
        self.model_name = s.served_model_name or base.name
        self.hf_dir = s.hf_dir or base.hf_dir
        self.model_version = (base.version if lora is None
                              else f"{base.version}+{file_version(lora)}")
        self.model_path = base.path

    def _open_context(self, llama: Any, n_slots: int, cache_k: str = "f16",
                      cache_v: str = "f16") -> Any:
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
        ggml_types = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0,
                      "q4_0": llama_cpp.GGML_TYPE_Q4_0}
        params.type_k, params.type_v = ggml_types[cache_k], ggml_types[cache_v]
        # Flash attention's f16 accumulation makes a token's logits depend on how its prompt
        # was split into batches; without it, prefix reuse and drafting are exact.
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if s.flash_attn
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        params.n_threads = params.n_threads_batch = s.n_threads
        try:
            return _internals.LlamaContext(model=llama._model, params=params, verbose=False)
        except ValueError:
            if (cache_k, cache_v) == ("f16", "f16"):
                raise
            model = llama.model
            head_dim = llama_cpp.llama_model_n_embd(model) // llama_cpp.llama_model_n_head(model)
            raise ValueError(
                f"llama.cpp could not create a context with engine.cache_type_k={cache_k}, "
                f"engine.cache_type_v={cache_v}, engine.flash_attn={s.flash_attn}: with flash "
                f"attention a quantized cache type needs the head dimension to be a multiple of "
                f"its block of 32 (this model's: {head_dim})") from None

    def _batching(self, llama: Any) -> BatchScheduler:
        """Open this engine's context (kept as `_context` at once, so a failure after it
        closes it) with the adapter applied, the drafter, and the scheduler over them."""
        import llama_cpp

        s = self.settings
        n_slots = s.n_parallel + s.prefix_cache_slots
        context = self._context = self._open_context(llama, n_slots, s.cache_type_k,
                                                     s.cache_type_v)
        if self._adapter is not None:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._adapter)
            scales = (ctypes.c_float * 1)(1.0)
            if llama_cpp.llama_set_adapters_lora(context.ctx, adapters, 1, scales):
                raise RuntimeError(f"could not apply the LoRA adapter {s.lora_path}")
        spec = s.speculative
        drafter: Drafter | None = None
        if spec.mode == "ngram":
            drafter = NgramDrafter(spec.ngram)
        elif spec.mode == "draft_model":
            assert spec.draft_model is not None
            self._draft = open_llama(spec.draft_model, s)
            check_same_vocab(llama, self._draft, spec.draft_model)
            # The draft's own cache stays f16: it is small, and its head dim may not suit q8_0.
            self._draft_context = self._open_context(self._draft, n_slots)
            drafter = ModelDrafter(self._draft, self._draft_context.ctx, n_slots=n_slots,
                                   n_batch=s.n_batch)
        return BatchScheduler(
            llama, context.ctx, n_parallel=s.n_parallel, n_slots=n_slots, n_batch=s.n_batch,
            n_ctx_seq=s.n_ctx, drafter=drafter, draft_max=spec.num_draft_tokens,
            prefix_caching=s.enable_prefix_caching,
            min_batched=s.min_batched_seqs or (5 if s.n_gpu_layers == 0 else 1))

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
        for name in ("_context", "_draft_context", "_draft"):
            if (resource := getattr(self, name)) is not None:
                resource.close()
                setattr(self, name, None)
        # The adapter outlives the context that used it; the weights outlive their adapters.
        if self.base is not None:
            if self._adapter is not None:
                self.base.free_adapter(self._adapter)
                self._adapter = None
            self.base.release()
            self.base = None

    def memory(self) -> dict[str, int]:
        return {"kv_cache_bytes": self.kv_cache_bytes() if self.base is not None else 0,
                "adapter_bytes": self._adapter_bytes}

    def kv_cache_bytes(self) -> int:
        """The KV cache of this engine's context as llama.cpp allocates it: a stream of n_ctx
        cells (padded to 256) per slot, K and V of every layer in their cache types."""
        import llama_cpp

        assert self.base is not None
        s, model = self.settings, self.base.llama.model
        cells = -(-s.n_ctx // 256) * 256 * (s.n_parallel + s.prefix_cache_slots)
        head_dim = llama_cpp.llama_model_n_embd(model) // llama_cpp.llama_model_n_head(model)
        per_cell = (llama_cpp.llama_model_n_layer(model) * llama_cpp.llama_model_n_head_kv(model)
                    * head_dim)
        return sum(cells * per_cell * num // per
                   for num, per in (_CACHE_BYTES[s.cache_type_k], _CACHE_BYTES[s.cache_type_v]))

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
                "prefix_cache_queries": self._scheduler.prefix_queries,
                "prefix_cache_hits": self._scheduler.prefix_hits}

    def kv_cells(self) -> tuple[int, int]:
        scheduler = self._scheduler
        return (0, 0) if scheduler is None else scheduler.kv_cells()

    @property
    def n_ctx(self) -> int:
        return self.settings.n_ctx

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams,
             template_kwargs: dict[str, Any]) -> AsyncIterator[Event]:
        """With `tool_choice` none the template is not shown the tools (as vLLM's
        `--exclude-tools-when-tool-choice-none`) and the output is text; otherwise calls are
        parsed out of it, and `required` or a named function constrains it to calls."""
        self._require_loaded()
        tools = params.tools if params.tool_choice != "none" else None
        if tools is not None and self.settings.tool_call_parser == "none":
            raise EngineError("tools are not enabled on this server (engine.tool_call_parser "
                              "is none)", param="tools", code="unsupported_parameter")
        prompt = self._render(messages, True, template_kwargs, tools)
        assert self.base is not None
        if params.tools and tools is None and self.base.tool_call_token is not None:
            # `none` promises text: the model may still start a call it learned to make.
            params = dataclasses.replace(params, logit_bias={
                **params.logit_bias, self.base.tool_call_token: -math.inf})
        thinking = self.settings.reasoning_parser == "think"
        opened = thinking and prompt.rstrip().endswith(THINK_OPEN)
        events = self._generate(
            prompt, params, lambda: ReasoningSplitter(opened) if thinking else None, "messages",
            opened,
        )
        if tools is None:
            return events
        return with_tool_calls(events, params.n, params.parallel_tool_calls)

    def complete(self, prompt: str, params: SamplingParams) -> AsyncIterator[Event]:
        self._require_loaded()
        return self._generate(prompt, params, lambda: None, "prompt")

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                template_kwargs: dict[str, Any],
                tools: list[dict[str, Any]] | None = None) -> str:
        assert self.base is not None
        if tools is not None:
            template_kwargs = {**template_kwargs, "tools": tools}
        try:
            return self.base.template.render(
                [_for_template(m) for m in messages],
                add_generation_prompt=add_generation_prompt, **template_kwargs)
        except Exception as exc:  # a template's raise_exception, or bad kwargs
            raise EngineError(f"chat template failed: {exc}", param="messages") from exc

    async def tokenize(self, prompt: str | list[dict[str, Any]], *, add_special_tokens: bool,
                       add_generation_prompt: bool = True,
                       template_kwargs: dict[str, Any] | None = None,
                       token_strs: bool = False) -> Tokens:
        self._require_loaded()
        text = prompt if isinstance(prompt, str) else self._render(
            prompt, add_generation_prompt, template_kwargs or {})

        def run() -> Tokens:
            assert self.base is not None
            llama = self.base.llama
            ids = llama.tokenize(text.encode(), add_bos=add_special_tokens, special=True)
            strs = [llama._model.token_get_text(i) for i in ids] if token_strs else None
            return Tokens(ids, self.n_ctx, strs)

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    async def detokenize(self, tokens: list[int]) -> str:
        self._require_loaded()
        assert self.base is not None
        n_vocab = self.base.llama.n_vocab()
        bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise EngineError(f"token id {bad} is outside the vocabulary (ids 0 to "
                              f"{n_vocab - 1})", param="tokens", code="invalid_value")
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, _detokenize, self.base.llama, tokens)

    def _require_loaded(self) -> None:
        if not self.healthy():
            raise EngineUnavailable("the model is not loaded")

    def _prepare(self, prompt: str, params: SamplingParams, param: str = "messages",
                 opened: bool = False) -> tuple[list[int], int, str | None]:
        """The prompt's tokens, the completion budget and the grammar: everything a request is
        refused for is found here, before it is admitted."""
        assert self.base is not None
        tokens = self.base.llama.tokenize(prompt.encode(), add_bos=True, special=True)
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
        self._check_sampling(params)
        return tokens, params.max_tokens or room, self._grammar(params, opened)

    def _check_sampling(self, params: SamplingParams) -> None:
        """Token ids a request names must be in the vocabulary (as vLLM checks them); and
        `min_tokens` cannot hold back the end of a structured output, whose grammar leaves
        nothing but the end once the value is complete."""
        assert self.base is not None
        n_vocab = self.base.llama.n_vocab()
        for name, ids in (("logit_bias", params.logit_bias), ("stop_token_ids",
                                                              params.stop_token_ids)):
            bad = sorted(t for t in ids if not 0 <= t < n_vocab)
            if bad:
                raise EngineError(f"{name}: token ids {bad[:8]} are outside the vocabulary (ids 0 "
                                  f"to {n_vocab - 1})", param=name, code="invalid_value")
        formatted = params.json_schema is not None or params.json_object
        if formatted and params.tools and params.tool_choice != "none":
            # One grammar per sequence: a reply format would forbid the calls.
            raise EngineError("response_format cannot be combined with tools on this engine "
                              "unless tool_choice is 'none'", param="response_format",
                              code="invalid_value")
        if params.min_tokens and (formatted or _forces_calls(params)):
            raise EngineError("min_tokens cannot be combined with response_format or a forced "
                              "tool_choice on this engine", param="min_tokens",
                              code="invalid_value")

    def _grammar(self, params: SamplingParams, opened: bool) -> str | None:
        """The GBNF that constrains the output, compiled by llama.cpp once here (the decode
        thread compiles it again per sequence) so a schema it cannot enforce is a 400: a reply
        format, or the calls that `tool_choice` `required` or a named function forces (after
        the reasoning when the prompt opened a think block)."""
        forced = _forces_calls(params)
        if params.json_schema is None and not params.json_object and not forced:
            return None
        assert self._scheduler is not None
        try:
            if forced:
                assert params.tools is not None
                gbnf = tool_call_gbnf(params.tools, params.forced_tool(),
                                      params.parallel_tool_calls, opened)
            elif params.json_schema is None:
                gbnf = json_object_gbnf()
            else:
                gbnf = schema_to_gbnf(params.json_schema)
            check_grammar(self._scheduler.vocab, gbnf)
        except GrammarError as exc:
            where = "tools" if forced else "response_format"
            raise EngineError(f"Invalid JSON schema in {where}: {exc}", param=where,
                              code="invalid_json_schema") from None
        return gbnf

    async def _generate(
        self, prompt: str, params: SamplingParams,
        splitter: Callable[[], ReasoningSplitter | None], param: str, opened: bool = False,
    ) -> AsyncIterator[Event]:
        # Validate before the first event so a bad request is a clean 400, not a broken stream.
        tokens, max_tokens, grammar = await asyncio.get_running_loop().run_in_executor(
            self._executor, self._prepare, prompt, params, param, opened
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
        then the number of tokens generated. The tokens that arrived while the loop was busy
        go out as one Delta (the text is the same; there are fewer chunks to frame and send), so
        the work here grows with the loop's wake-ups, not with the tokens decoded."""
        inbox = _Inbox(asyncio.get_running_loop())
        scheduler = self._scheduler
        assert scheduler is not None
        request = Request(prompt=tokens, max_tokens=max_tokens, temperature=params.temperature,
                          top_p=params.top_p, seed=seed, grammar=grammar,
                          top_logprobs=params.top_logprobs, ignore_eos=params.ignore_eos,
                          emit=inbox.put, presence_penalty=params.presence_penalty,
                          frequency_penalty=params.frequency_penalty,
                          repetition_penalty=params.repetition_penalty,
                          logit_bias=params.logit_bias, top_k=params.top_k, min_p=params.min_p,
                          min_tokens=params.min_tokens,
                          stop_token_ids=frozenset(params.stop_token_ids))
        cancel = request.cancel
        scheduler.submit(request)
        done = stopped = False
        stops = StopMatcher(params.stop)
        pending_logprobs: list[TokenLogprob] = []
        pending_tokens = received = 0
        finish_reason = "stop"
        try:
            while not (done or stopped):
                pieces: list[str] = []
                for item in await inbox.take():
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
                    received += 1
                    # As vLLM does, stop strings count only once `min_tokens` are out.
                    text, stopped = (stops.push(payload) if received > params.min_tokens
                                     else (payload, False))
                    pieces.append(text)
                    if stopped:
                        cancel.set()
                        finish_reason = "stop"
                        break
                delta = _split(index, "".join(pieces), splitter, pending_logprobs)
                if delta is not None:
                    delta.tokens, pending_tokens, pending_logprobs = pending_tokens, 0, []
                    yield delta
            tail = "" if cancel.is_set() else stops.flush()
            last = _split(index, tail, splitter, pending_logprobs, final=True) or Delta(index)
            last.finish_reason = finish_reason
            last.tokens = pending_tokens
            yield last
        finally:
            cancel.set()
            scheduler.wake()
            # The scheduler ends every request it was given with DONE; the inbox saw it go by
            # even when the loop above left a batch before reaching it.
            while not inbox.ended:
                await inbox.take()
        yield request.generated


class _Inbox:
    """What the decode thread emits for one sequence, handed to the event loop in batches: `put`
    (on the decode thread) appends and wakes the loop once until `take` (on the loop) has taken
    everything there is, so a step's tokens cost one wake-up, and tokens that arrive while the
    loop is busy are taken together."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: collections.deque[Any] = collections.deque()
        self._ready = asyncio.Event()
        self._woken = False
        self.ended = False  # DONE has been put: the scheduler is finished with the request

    def put(self, item: Any) -> None:
        self._items.append(item)
        self.ended = self.ended or item is DONE
        if not self._woken:
            self._woken = True
            self._loop.call_soon_threadsafe(self._ready.set)

    async def take(self) -> list[Any]:
        while True:
            self._woken = False  # set before taking: a later put wakes us again
            items = []
            while self._items:
                items.append(self._items.popleft())
            if items:
                return items
            await self._ready.wait()
            self._ready.clear()


def _forces_calls(params: SamplingParams) -> bool:
    return bool(params.tools) and (params.tool_choice == "required"
                                   or params.forced_tool() is not None)


def _for_template(message: dict[str, Any]) -> dict[str, Any]:
    """A message as chat templates take it: tool calls' arguments as JSON objects rather than
    OpenAI's JSON text (templates write them with `tojson`), as vLLM and transformers pass them."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    return {**message, "tool_calls": [
        {**call, "function": {**call["function"],
                              "arguments": parse_arguments(call["function"]["arguments"])}}
        for call in calls]}


def _detokenize(llama: Any, tokens: list[int]) -> str:
    """llama.cpp's own inverse of tokenizing (`llama_detokenize`), special tokens written out
    as text, as Hugging Face's `decode` does; bytes that are not UTF-8 (a token cut inside a
    character) are replaced."""
    import llama_cpp

    ids = (llama_cpp.llama_token * len(tokens))(*tokens)
    size = max(64, 8 * len(tokens))
    while True:
        buffer = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_detokenize(llama._model.vocab, ids, len(tokens), buffer, size,
                                       False, True)
        if n >= 0:
            return buffer.raw[:n].decode("utf-8", "replace")
        size = -n  # the length it needs


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
