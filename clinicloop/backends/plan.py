"""GPU memory planner: for a model shape, a weight scheme, a KV-cache dtype and the model
versions served as LoRA adapters on it, how long one sequence can be and how many run at once on
one GPU, and the vLLM / llama.cpp limits that follow.

GPU memory = weights + adapters + KV cache + overhead; the KV cache gets what is left:

    budget          = gpu_bytes * gpu_memory_utilization
    kv_pool         = budget - weights - adapters - cuda_context - activations
    overhead        = cuda_context + activations + reserve,  reserve = gpu_bytes - budget
    max_seq_len     = min(kv_pool // kv_bytes_per_token, max_position_embeddings)
    concurrent_seqs = kv_pool // (kv_bytes_per_token * seq_len)      (seq_len: default max_seq_len)
    typical_seqs    = kv_pool // (kv_bytes_per_token * typical_len)  (typical_len: default 2048)

That is vLLM's own accounting ("total_gpu_memory x gpu_memory_utilization"; weights, non-torch
memory and the profiled activation peak come out of it, the KV cache gets the rest, CUDA graphs are
captured afterwards outside the budget), so the limits printed here are ones vLLM accepts.

Concurrency, per engine. vLLM pages the KV cache in blocks of 16 tokens and preempts (and later
resumes) a sequence when the pool runs out, so it keeps `--max-model-len` at seq_len and runs
`--max-num-seqs` = typical_seqs sequences: as many typical conversations as the pool holds
(`engine.vllm_typical_len`, 2048 tokens: a multi-turn consultation and its reply; one longer
conversation simply takes the room of several): Qwen2.5-32B W4A16 with an FP8 cache on a 4090
has a pool of 20,009 tokens, one sequence of 20,000 or nine chats of 2,048. llama.cpp does not
page: `-c n_ctx -np N` gives each slot n_ctx / N cells, so its slots are of seq_len and a slot
never holds a longer sequence.

Versions as LoRA adapters on one base (`versions`, `lora_rank`): each adapter is rank r on every
decoder linear layer (q, k, v, o, gate, up, down) of every layer, an A and a B matrix in 16 bits,
r * (in + out) * 2 bytes per matrix. vLLM preallocates `--max-loras` such slots of
`--max-lora-rank` at start, whatever the adapters loaded; llama.cpp loads each adapter next to the
weights of the one model (convert with `convert_lora_to_gguf.py --outtype f16`: its default f32
doubles them). vLLM's versions share its one paged pool; in clinicloop's llama.cpp engine each
version has a context of its own, so the pool is split: each version gets n_parallel slots of
seq_len tokens.

Assumptions, one set for every GPU, model and scheme (each can be overridden by keyword):
- gpu_memory_utilization 0.90, vLLM's default. The 10 % outside the budget is the reserve for CUDA
  graphs, allocator fragmentation and anything else on the GPU (a desktop session, a monitor).
- cuda_context_bytes 512 MiB: CUDA context, cuBLAS / attention workspaces and loaded kernel images
  (what vLLM logs as non-torch memory; 0.3-0.6 GiB on one GPU without NCCL).
- activations: the peak of one forward pass over prefill_tokens = 2048 tokens (vLLM's default
  max_num_batched_tokens on GPUs under 70 GiB; SGLang's chunked prefill on a 24 GB card) in 16 bits,
  the larger of the MLP phase T * (2 * hidden + 3 * intermediate) (residual, normed input, gate|up
  output, activated product) and the attention phase T * (2 * hidden + 2 * (heads + kv_heads) *
  head_dim); plus the sampler's fp32 logits and probabilities for sampler_seqs = 256 sequences
  (vLLM's default max_num_seqs): 256 * vocab * 4 * 2 bytes.

KV cache per token: 2 (K and V) * layers * kv_heads * head_dim * bytes per element: 2 for fp16 /
bf16, 1 for fp8 (vLLM's `--kv-cache-dtype fp8`), 34/32 for q8_0 and 18/32 for q4_0 (llama.cpp's
`-ctk/-ctv`, blocks of 32 values with one f16 scale; a quantized V cache needs flash attention).

Weights, as bytes resident on the GPU:
- bf16 / fp16: every tensor in 16 bits; the input embedding and an untied lm_head both count.
- w8a16, w4a16 (AWQ, GPTQ, compressed-tensors; vLLM's Marlin kernels): only the decoder's linear
  layers (q, k, v, o, gate, up, down) are quantized; embeddings, lm_head, norms, biases stay 16-bit.
  Per group of group_size input weights (default 128) and output channel: a 16-bit scale, plus a
  4-bit zero point for asymmetric AWQ (`w4a16`, `w4a16-awq`); GPTQ (`w4a16-gptq`, `w8a16`) is
  symmetric. group_size -1 means one group per output channel.
- w4a8 (QServe's QoQ, SGLang's `qoq`): 4-bit weights, per group an int8 scale and an int8 zero, per
  output channel a 16-bit scale; activations become int8 at run time, which costs no memory.
- GGUF ftypes (f16, q8_0, q6_k, q5_k_m, q5_k_s, q4_k_m, q4_0): each tensor's type by llama.cpp's
  rules (llama-quant.cpp: output in Q6_K; attn_v and ffn_down in Q6_K on `use_more_bits` layers for
  the _M mixes; a fallback type where a row is not a multiple of the block), sizes per ggml block;
  1-D tensors stay F32. llama.cpp keeps the input embedding in host memory, so it is not counted;
  the output matrix is (with tied embeddings, a copy of the embedding in the output type).

Checked against the paper (Baichuan-M2 section 5: Qwen2.5-32B shape, SGLang, one RTX 4090, longest
sequence): W4A16 9,982 tokens -> 10,004 here; + FP8 KV 19,965 -> 20,009; W4A8 10,566 -> 10,434;
+ FP8 KV 21,133 -> 20,868 (all within 1.3 %). The pool is a small difference of large numbers: one
point of gpu_memory_utilization on a 4090 is 246 MiB, about 980 16-bit tokens of this model.
SGLang sizes the pool its own way (free memory at start * mem_fraction_static 0.88 - weights;
activations and graphs outside the fraction); with the same 512 MiB context that gives 10,930
tokens for W4A16 (+9.5 %).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from clinicloop.config import EngineSettings
from clinicloop.errors import UserError

MiB = 1 << 20
GiB = 1 << 30
VLLM_BLOCK_TOKENS = 16  # vLLM's default KV block size: the cache holds whole blocks
PARTIAL_OFFLOAD_CTX = 4096  # llama.cpp context when the whole model does not fit and none was asked
TYPICAL_LEN: int = EngineSettings.model_fields["vllm_typical_len"].default
LORA_RANK: int = EngineSettings.model_fields["vllm_max_lora_rank"].default


class ModelShape(BaseModel):
    """A dense decoder-only transformer: GQA attention and a gated MLP (Llama, Qwen2, Mistral)."""

    model_config = ConfigDict(frozen=True)

    name: str
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q, k, v (Qwen2 has them)
    max_position_embeddings: int | None = None

    @classmethod
    def from_hf_config(cls, path: str | Path) -> ModelShape:
        """Read a Hugging Face `config.json` (or the directory holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"no model config at {path}: give a Hugging Face config.json or the "
                            "directory holding it") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not JSON ({exc.msg}, line {exc.lineno}): give a Hugging "
                            "Face config.json") from None
        return cls.from_config(cfg, str(path))

    @classmethod
    def from_config(cls, cfg: dict[str, Any], name: str) -> ModelShape:
        """A HF `config.json`'s contents, already parsed; `name` says where they came from."""
        experts = max(cfg.get(k) or 0 for k in ("num_experts", "num_local_experts",
                                                  "n_routed_experts"))
        if experts > 1:
            raise UserError(f"{name}: mixture-of-experts models are not planned here")
        required = ("num_hidden_layers", "hidden_size", "intermediate_size",
                    "num_attention_heads", "vocab_size")
        if missing := [k for k in required if not cfg.get(k)]:
            raise UserError(f"{name} has no {', '.join(missing)}: give the config.json of a "
                            "dense decoder-only transformer (Llama, Qwen2, Mistral)")
        heads = cfg["num_attention_heads"]
        return cls(
            name=name, num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"], num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab_size=cfg["vocab_size"],
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", cfg.get("model_type") == "qwen2"),
            max_position_embeddings=cfg.get("max_position_embeddings"))

    def linears(self) -> list[tuple[str, int, int]]:
        """One layer's weight matrices as (GGUF name, in_features, out_features)."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return [("attn_q", h, q), ("attn_k", h, kv), ("attn_v", h, kv), ("attn_output", q, h),
                ("ffn_gate", h, i), ("ffn_up", h, i), ("ffn_down", i, h)]

    def layer_vectors(self) -> int:
        """One layer's 1-D parameters: two RMSNorm weights and the q, k, v biases if any."""
        bias = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        return 2 * self.hidden_size + (bias if self.attention_bias else 0)

    def param_count(self) -> int:
        per_layer = sum(n_in * n_out for _, n_in, n_out in self.linears()) + self.layer_vectors()
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + self.hidden_size

    def kv_bytes_per_token(self, kv: str) -> int:
        num, per = KV_DTYPES[kv]
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * num // per


PRESETS: dict[str, ModelShape] = {
    # Baichuan-M2-32B's base. 32768 is the native context (YaRN extends it to 131072).
    "qwen2.5-32b": ModelShape(
        name="qwen2.5-32b", num_layers=64, hidden_size=5120, intermediate_size=27648,
        num_heads=40, num_kv_heads=8, head_dim=128, vocab_size=152064, tie_word_embeddings=False,
        attention_bias=True, max_position_embeddings=32768),
    # Smaller Qwen2.5 sizes (their config.json), for what else fits a card (training plan).
    "qwen2.5-14b": ModelShape(
        name="qwen2.5-14b", num_layers=48, hidden_size=5120, intermediate_size=13824,
        num_heads=40, num_kv_heads=8, head_dim=128, vocab_size=152064, tie_word_embeddings=False,
        attention_bias=True, max_position_embeddings=32768),
    "qwen2.5-7b": ModelShape(
        name="qwen2.5-7b", num_layers=28, hidden_size=3584, intermediate_size=18944,
        num_heads=28, num_kv_heads=4, head_dim=128, vocab_size=152064, tie_word_embeddings=False,
        attention_bias=True, max_position_embeddings=32768),
    "qwen2.5-3b": ModelShape(
        name="qwen2.5-3b", num_layers=36, hidden_size=2048, intermediate_size=11008,
        num_heads=16, num_kv_heads=2, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
        attention_bias=True, max_position_embeddings=32768),
}

# Total memory as the driver reports it (nvidia-smi's MiB), which is what the engines divide.
GPUS: dict[str, int] = {
    "rtx4090": 24564 * MiB,
    "l40s": 46068 * MiB,
    "a100-80": 81920 * MiB,
    "h100-80": 81559 * MiB,
}

# KV-cache element -> (bytes, per elements); q8_0 and q4_0 are llama.cpp's block types (32
# values and an f16 scale: 34 and 18 bytes).
KV_DTYPES: dict[str, tuple[int, int]] = {"fp16": (2, 1), "bf16": (2, 1), "fp8": (1, 1),
                                         "q8_0": (34, 32), "q4_0": (18, 32)}
LLAMACPP_ONLY_KV = ("q8_0", "q4_0")


class _Linear(NamedTuple):
    bits: int
    group_bytes: float  # per group of group_size input weights, per output channel
    channel_bytes: float  # per output channel


LINEAR_SCHEMES: dict[str, _Linear] = {
    "bf16": _Linear(16, 0, 0),
    "fp16": _Linear(16, 0, 0),
    "w8a16": _Linear(8, 2, 0),
    "w4a16": _Linear(4, 2.5, 0),
    "w4a16-awq": _Linear(4, 2.5, 0),
    "w4a16-gptq": _Linear(4, 2, 0),
    "w4a8": _Linear(4, 2, 2),
}


class _Mix(NamedTuple):
    base: str
    output: str
    more_bits: str | None = None  # attn_v and ffn_down on use_more_bits layers


GGUF_TYPES: dict[str, _Mix] = {
    "f16": _Mix("F16", "F16"),
    "q8_0": _Mix("Q8_0", "Q8_0"),
    "q6_k": _Mix("Q6_K", "Q6_K"),
    "q5_k_m": _Mix("Q5_K", "Q6_K", "Q6_K"),
    "q5_k_s": _Mix("Q5_K", "Q6_K"),
    "q4_k_m": _Mix("Q4_K", "Q6_K", "Q6_K"),
    "q4_0": _Mix("Q4_0", "Q6_K"),
}

# ggml type -> (weights per block, bytes per block)
GGML_BLOCKS: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "Q8_0": (32, 34), "Q6_K": (256, 210), "Q5_K": (256, 176),
    "Q4_K": (256, 144), "Q5_1": (32, 24), "Q5_0": (32, 22), "Q4_0": (32, 18),
}
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

SCHEMES = [*LINEAR_SCHEMES, *GGUF_TYPES]


class Assumptions(BaseModel):
    """The overheads the plan subtracts; the module docstring says where each number comes from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpu_memory_utilization: float = Field(0.90, gt=0, le=1)
    cuda_context_bytes: int = Field(512 * MiB, ge=0)
    prefill_tokens: int = Field(2048, gt=0)
    sampler_seqs: int = Field(256, gt=0)


class Plan(BaseModel):
    model: str
    gpu_bytes: int
    weights: str
    group_size: int
    kv_cache_dtype: str
    num_layers: int
    max_position_embeddings: int | None
    weight_bytes: int
    versions: int  # model versions served as LoRA adapters on the one base
    lora_rank: int
    adapter_bytes: int
    layer_weight_bytes: int  # the largest decoder layer: what partial offload moves per layer
    kv_bytes_per_token: int
    cuda_context_bytes: int
    activation_bytes: int
    reserve_bytes: int
    overhead_bytes: int
    kv_pool_bytes: int  # negative: the model is that much short of fitting
    kv_pool_tokens: int
    max_seq_len: int
    seq_len: int
    concurrent_seqs: int  # sequences of seq_len at once
    typical_len: int
    typical_seqs: int  # sequences of typical_len at once: what a paged cache runs
    fits: bool
    gpu_memory_utilization: float
    prefill_tokens: int
    sampler_seqs: int


def _use_more_bits(layer: int, n_layers: int) -> bool:
    return (layer < n_layers // 8 or layer >= 7 * n_layers // 8
            or (layer - n_layers // 8) % 3 == 2)


def _ggml_fit(kind: str, n_in: int) -> str:
    """llama.cpp's fallback for rows that are not a whole number of blocks."""
    if n_in % GGML_BLOCKS[kind][0]:
        kind = _FALLBACK.get(kind, "F16")
        if n_in % GGML_BLOCKS[kind][0]:
            kind = "F16"
    return kind


def _ggml_bytes(kind: str, n_in: int, n_out: int) -> int:
    per_block, block_bytes = GGML_BLOCKS[kind]
    return n_in * n_out // per_block * block_bytes


def _gguf_weights(shape: ModelShape, mix: _Mix) -> tuple[list[int], int]:
    layers = []
    for layer in range(shape.num_layers):
        total = 4 * shape.layer_vectors()
        for name, n_in, n_out in shape.linears():
            kind = mix.base
            if (mix.more_bits and name in ("attn_v", "ffn_down")
                    and _use_more_bits(layer, shape.num_layers)):
                kind = mix.more_bits
            total += _ggml_bytes(_ggml_fit(kind, n_in), n_in, n_out)
        layers.append(total)
    h = shape.hidden_size
    output = mix.output if h % GGML_BLOCKS[mix.base][0] == 0 else "Q8_0"
    return layers, _ggml_bytes(_ggml_fit(output, h), h, shape.vocab_size) + 4 * h


def _linear_weights(shape: ModelShape, scheme: _Linear, group_size: int) -> tuple[list[int], int]:
    per_layer = 2 * shape.layer_vectors()
    for _, n_in, n_out in shape.linears():
        groups = math.ceil(n_in / group_size) if group_size > 0 else 1
        per_layer += math.ceil(n_in * n_out * scheme.bits / 8
                               + n_out * (groups * scheme.group_bytes + scheme.channel_bytes))
    embeddings = shape.vocab_size * shape.hidden_size * (1 if shape.tie_word_embeddings else 2)
    return [per_layer] * shape.num_layers, 2 * (embeddings + shape.hidden_size)


def layer_activation_bytes(shape: ModelShape, tokens: int) -> int:
    """The peak of one decoder layer's forward over `tokens` tokens in 16 bits: the larger of
    the MLP phase and the attention phase (the module docstring has both)."""
    h = shape.hidden_size
    mlp = tokens * (2 * h + 3 * shape.intermediate_size)
    attention = tokens * (2 * h + 2 * (shape.num_heads + shape.num_kv_heads) * shape.head_dim)
    return 2 * max(mlp, attention)


def sampler_bytes(shape: ModelShape, seqs: int) -> int:
    """A sampling step's fp32 logits and probabilities for `seqs` sequences."""
    return seqs * shape.vocab_size * 4 * 2


def _activation_bytes(shape: ModelShape, a: Assumptions) -> int:
    return layer_activation_bytes(shape, a.prefill_tokens) + sampler_bytes(shape, a.sampler_seqs)


def lora_slot_bytes(shape: ModelShape, rank: int, slots: int) -> int:
    """Memory of `slots` LoRA adapters of `rank` on every decoder linear layer (an A and a B
    matrix each, in 16 bits): what vLLM preallocates for `--max-loras slots --max-lora-rank
    rank`, and what llama.cpp loads beside the model for that many f16 adapters."""
    per_layer = sum(rank * (n_in + n_out) for _, n_in, n_out in shape.linears())
    return slots * shape.num_layers * per_layer * 2


def plan_memory(shape: ModelShape, gpu_bytes: int, weights: str, kv: str,
                seq_len: int | None = None, *, group_size: int = 128,
                typical_len: int = TYPICAL_LEN, versions: int = 0, lora_rank: int = LORA_RANK,
                **overrides: Any) -> Plan:
    """Plan one GPU; `overrides` replace fields of `Assumptions` (e.g. gpu_memory_utilization).
    `versions` LoRA adapters of `lora_rank` share the base (0: the base model alone)."""
    a = Assumptions(**overrides)
    weights, kv = weights.lower(), kv.lower()
    if kv not in KV_DTYPES:
        raise ValueError(f"unknown KV-cache dtype {kv!r}; choose from {', '.join(KV_DTYPES)}")
    if weights in LINEAR_SCHEMES:
        layers, rest = _linear_weights(shape, LINEAR_SCHEMES[weights], group_size)
    elif weights in GGUF_TYPES:
        layers, rest = _gguf_weights(shape, GGUF_TYPES[weights])
    else:
        raise ValueError(f"unknown weight scheme {weights!r}; choose from {', '.join(SCHEMES)}")
    if seq_len is not None and seq_len <= 0:
        raise ValueError("seq_len must be positive")
    if typical_len <= 0 or versions < 0 or lora_rank <= 0:
        raise ValueError("typical_len and lora_rank must be positive, versions not negative")
    weight_bytes = sum(layers) + rest
    adapter_bytes = lora_slot_bytes(shape, lora_rank, versions)
    budget = int(gpu_bytes * a.gpu_memory_utilization)
    activations = _activation_bytes(shape, a)
    kv_pool = budget - weight_bytes - adapter_bytes - a.cuda_context_bytes - activations
    per_token = shape.kv_bytes_per_token(kv)
    pool_tokens = max(kv_pool, 0) // per_token
    max_seq_len = min(pool_tokens, shape.max_position_embeddings or pool_tokens)
    seq = max_seq_len if seq_len is None else seq_len
    concurrent = pool_tokens // seq if seq else 0
    if shape.max_position_embeddings and seq > shape.max_position_embeddings:
        concurrent = 0
    typical = min(typical_len, seq) or typical_len
    return Plan(
        model=shape.name, gpu_bytes=gpu_bytes, weights=weights, group_size=group_size,
        kv_cache_dtype=kv, num_layers=shape.num_layers,
        max_position_embeddings=shape.max_position_embeddings, weight_bytes=weight_bytes,
        versions=versions, lora_rank=lora_rank, adapter_bytes=adapter_bytes,
        layer_weight_bytes=max(layers), kv_bytes_per_token=per_token,
        cuda_context_bytes=a.cuda_context_bytes, activation_bytes=activations,
        reserve_bytes=gpu_bytes - budget,
        overhead_bytes=a.cuda_context_bytes + activations + gpu_bytes - budget,
        kv_pool_bytes=kv_pool, kv_pool_tokens=pool_tokens, max_seq_len=max_seq_len, seq_len=seq,
        concurrent_seqs=concurrent, typical_len=typical,
        typical_seqs=pool_tokens // typical if concurrent else 0, fits=concurrent >= 1,
        gpu_memory_utilization=a.gpu_memory_utilization, prefill_tokens=a.prefill_tokens,
        sampler_seqs=a.sampler_seqs)


def vllm_limits(plan: Plan) -> dict[str, Any]:
    """`vllm serve` limits: sequences up to max_model_len, as many at once as the paged KV pool
    holds at the typical length (capped by the sampler's sequences the activations assume)."""
    if not plan.fits:
        raise ValueError(f"{plan.model} with {plan.weights} weights does not fit "
                         f"{plan.gpu_bytes / GiB:.1f} GiB at {plan.seq_len} tokens")
    if plan.kv_cache_dtype in LLAMACPP_ONLY_KV:
        raise ValueError(f"vLLM has no {plan.kv_cache_dtype} KV cache; plan with fp8")
    whole_blocks = plan.kv_pool_tokens // VLLM_BLOCK_TOKENS * VLLM_BLOCK_TOKENS
    limits = {"max_model_len": min(plan.seq_len, whole_blocks),
              "max_num_seqs": min(plan.typical_seqs, plan.sampler_seqs),
              "gpu_memory_utilization": plan.gpu_memory_utilization,
              "kv_cache_dtype": "fp8" if plan.kv_cache_dtype == "fp8" else "auto"}
    if plan.versions:
        limits |= {"max_loras": plan.versions, "max_lora_rank": plan.lora_rank}
    return limits


def llamacpp_limits(plan: Plan) -> dict[str, int]:
    """llama.cpp limits, per version: slots of seq_len tokens in the version's share of the
    pool (no paging); a model that does not fit gets as many layers on the GPU as do."""
    per_version = plan.kv_pool_tokens // max(plan.versions, 1)
    if plan.fits and per_version:
        # n_layers + 1 also offloads the output layer; n_ctx is shared by the parallel slots.
        slot = min(plan.seq_len, per_version)
        slots = min(per_version // slot, plan.sampler_seqs)
        return {"n_ctx": slots * slot, "n_gpu_layers": plan.num_layers + 1, "n_parallel": slots}
    n_ctx = plan.seq_len or min(PARTIAL_OFFLOAD_CTX,
                                plan.max_position_embeddings or PARTIAL_OFFLOAD_CTX)
    budget = plan.kv_pool_bytes + plan.weight_bytes  # what the weights and KV cache may take
    per_layer = plan.layer_weight_bytes + plan.kv_bytes_per_token // plan.num_layers * n_ctx
    layers = min(max(budget, 0) // per_layer, plan.num_layers)
    return {"n_ctx": n_ctx, "n_gpu_layers": layers, "n_parallel": 1}


def llamacpp_serving(plan: Plan) -> tuple[list[str], dict[str, str]]:
    """The llama.cpp limits as `llama-server` flags and as the clinicloop engine settings that
    serve them (`CLINICLOOP_ENGINE__*`): n_ctx is per sequence there, and no extra slots are kept
    for idle conversations (each slot's own cache serves its conversation's next turn)."""
    if plan.kv_cache_dtype == "fp8":
        raise ValueError("llama.cpp has no fp8 KV cache; plan with q8_0 or q4_0")
    c = llamacpp_limits(plan)
    flags = ["-c", str(c["n_ctx"]), "-ngl", str(c["n_gpu_layers"]), "-np", str(c["n_parallel"])]
    env = {"N_CTX": c["n_ctx"] // c["n_parallel"], "N_PARALLEL": c["n_parallel"],
           "PREFIX_CACHE_SLOTS": 0, "N_GPU_LAYERS": c["n_gpu_layers"]}
    if plan.kv_cache_dtype in LLAMACPP_ONLY_KV:
        # llama.cpp refuses a quantized V cache without flash attention.
        flags += ["-fa", "on", "-ctk", plan.kv_cache_dtype, "-ctv", plan.kv_cache_dtype]
        env |= {"FLASH_ATTN": "true", "CACHE_TYPE_K": plan.kv_cache_dtype,
                "CACHE_TYPE_V": plan.kv_cache_dtype}
    return flags, {f"CLINICLOOP_ENGINE__{k}": str(v) for k, v in env.items()}


def misfit(plan: Plan) -> str | None:
    """None if the plan fits; else one line: why it does not, and what to change."""
    if plan.fits:
        return None
    adapters = (f" and {_count(plan.versions, f'rank-{plan.lora_rank} adapter')}"
                if plan.versions else "")
    where = (f"{plan.model} with {plan.weights} weights{adapters} does not fit "
             f"{plan.gpu_bytes / GiB:.2f} GiB")
    fewer = ", fewer --versions or a lower --lora-rank" if plan.versions else ""
    if plan.kv_pool_tokens == 0:
        partial = llamacpp_limits(plan)["n_gpu_layers"]
        return (f"{where}: weights and overhead exceed the budget by "
                f"{max(-plan.kv_pool_bytes, 0) / GiB:.2f} GiB, leaving no KV cache; use fewer "
                f"bits (--weights w4a16, or q4_k_m for llama.cpp){fewer}, a larger --gpu, or "
                f"offload {partial} of {plan.num_layers} layers with llama.cpp")
    if plan.max_position_embeddings and plan.seq_len > plan.max_position_embeddings:
        return (f"{where} at --seq-len {plan.seq_len:,}: the model has "
                f"{plan.max_position_embeddings:,} positions; lower --seq-len")
    return (f"{where} at --seq-len {plan.seq_len:,}: the KV cache holds "
            f"{plan.kv_pool_tokens:,} tokens; lower --seq-len to at most {plan.max_seq_len:,}, "
            f"or use --kv fp8 (vLLM) / q8_0 or q4_0 (llama.cpp){fewer}")


def parse_gpu(text: str) -> int:
    """A GPU preset name, or its memory: bytes, or a number with GiB / GB / MiB / MB."""
    key = text.strip().lower()
    if key in GPUS:
        return GPUS[key]
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(gib|gb|mib|mb)?", key)
    if not match:
        raise ValueError(f"unknown GPU {text!r}; choose from {', '.join(GPUS)} or give its memory")
    unit = {None: 1, "gib": GiB, "gb": 10**9, "mib": MiB, "mb": 10**6}[match.group(2)]
    return int(float(match.group(1)) * unit)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def _seqs(n: int, tokens: int, noun: str = "sequence") -> str:
    return f"{_count(n, noun)} of {tokens:,} tokens"


def render(plan: Plan) -> str:
    """The human summary: the byte budget, what fits, the launch flags and the assumptions."""
    def gib(n: int) -> str:
        return f"{n / GiB:6.2f} GiB"

    quantized = plan.weights in LINEAR_SCHEMES and LINEAR_SCHEMES[plan.weights].bits < 16
    group = f", group {plan.group_size}" if quantized else ""
    host = ("  (llama.cpp keeps the input embedding in host memory)"
            if plan.weights in GGUF_TYPES else "")
    capped = (plan.max_position_embeddings is not None
              and plan.max_seq_len == plan.max_position_embeddings < plan.kv_pool_tokens)
    versions = (f", {_count(plan.versions, 'version')} as rank-{plan.lora_rank} LoRA adapters "
                "on one base" if plan.versions else "")
    lines = [
        f"{plan.model} on {plan.gpu_bytes / GiB:.2f} GiB: weights {plan.weights}{group}, "
        f"KV cache {plan.kv_cache_dtype}{versions}",
        f"  weights            {gib(plan.weight_bytes)}{host}",
    ]
    if plan.versions:
        lines.append(f"  adapters           {gib(plan.adapter_bytes)}  = {plan.versions} x rank "
                     f"{plan.lora_rank} on every linear layer, 16-bit "
                     f"({plan.adapter_bytes // plan.versions / MiB:.0f} MiB each)")
    lines += [
        f"  KV per token       {plan.kv_bytes_per_token / 1024:6.1f} KiB",
        f"  overhead           {gib(plan.overhead_bytes)}  = CUDA context "
        f"{plan.cuda_context_bytes / GiB:.2f} + activations {plan.activation_bytes / GiB:.2f}"
        f" + reserve {plan.reserve_bytes / GiB:.2f} (CUDA graphs, allocator)",
        f"  KV pool            {gib(plan.kv_pool_bytes)}  = {plan.kv_pool_tokens:,} tokens"
        if plan.kv_pool_bytes >= 0 else
        f"  KV pool            none: weights and overhead are {-plan.kv_pool_bytes / GiB:.2f} "
        "GiB over the budget",
        f"  max_seq_len        {plan.max_seq_len:,} tokens (one request"
        + (", capped by the model's positions)" if capped else ")"),
        f"  concurrent         {_seqs(plan.typical_seqs, plan.typical_len)}"
        + (f" (typical), {_seqs(plan.concurrent_seqs, plan.seq_len)} (longest)"
           if plan.seq_len > plan.typical_len else ""),
    ]
    if plan.versions:
        lines.append(f"  fits               {'yes' if plan.fits else 'no'}: base + "
                     f"{_count(plan.versions, 'adapter')} + KV cache")
    if plan.fits and plan.kv_cache_dtype not in LLAMACPP_ONLY_KV:
        v = vllm_limits(plan)
        lora = (f" --enable-lora --max-loras {v['max_loras']} --max-lora-rank "
                f"{v['max_lora_rank']}" if plan.versions else "")
        lines += [f"vLLM:      --max-model-len {v['max_model_len']} --max-num-seqs "
                  f"{v['max_num_seqs']} --gpu-memory-utilization {v['gpu_memory_utilization']} "
                  f"--kv-cache-dtype {v['kv_cache_dtype']}{lora}",
                  f"           {_seqs(v['max_num_seqs'], plan.typical_len)} at once in one "
                  "paged pool; longer ones take the room of several, and vLLM preempts and "
                  "resumes when it runs out"]
    elif plan.fits:
        lines.append(f"vLLM:      no {plan.kv_cache_dtype} KV cache; plan with --kv fp8")
    else:
        lines.append("vLLM:      does not fit; lower --seq-len, or use a smaller scheme or GPU")
    c = llamacpp_limits(plan)
    slots = _seqs(c["n_parallel"], c["n_ctx"] // c["n_parallel"], "slot")
    if plan.kv_cache_dtype == "fp8":
        lines.append(f"llama.cpp: -c {c['n_ctx']} -ngl {c['n_gpu_layers']} -np "
                     f"{c['n_parallel']}  (llama.cpp has no fp8 KV cache: plan with --kv q8_0 "
                     "or q4_0)")
    else:
        flags, env = llamacpp_serving(plan)
        note = slots + (" per version, each version its own KV cache" if plan.versions else "")
        note += ": llama.cpp does not page, a slot holds n_ctx/np tokens"
        typical_slots = min(plan.kv_pool_tokens // max(plan.versions, 1) // plan.typical_len,
                            plan.sampler_seqs)
        if typical_slots > c["n_parallel"]:
            note += f"; --seq-len {plan.typical_len} gives {typical_slots} slots"
        lines += [f"llama.cpp: {' '.join(flags)}  ({note})",
                  f"           clinicloop: {' '.join(f'{k}={v}' for k, v in env.items())}"]
    lines.append(
        f"assumptions: gpu_memory_utilization {plan.gpu_memory_utilization} (the rest is the "
        f"reserve), CUDA context {plan.cuda_context_bytes / MiB:.0f} MiB, activations of a "
        f"{plan.prefill_tokens}-token prefill in 16 bits plus fp32 logits for "
        f"{plan.sampler_seqs} sequences")
    return "\n".join(lines)
