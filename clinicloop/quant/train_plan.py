"""Training memory planner: whether one QLoRA GRPO step (TRL's `GRPOTrainer`, rollouts from the
training model) fits one GPU, part by part, and the largest settings that do.

A refresh alternates two phases that never overlap in time, so the peak is

    peak   = static + max(rollout, training)
    static = base_4bit + base_16bit_parts + lora + optimizer + cuda_context + engine
    rollout  = rollout_kv + rollout_activations + rollout_logits
    training = gradients + activations + logits
    fits   = peak <= gpu_bytes * (1 - reserve_fraction),  headroom = that limit - peak

Base, as bitsandbytes + transformers + peft load it (`BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bfloat16)`,
then `peft.prepare_model_for_kbit_training`):
- base_4bit: every decoder linear weight (q, k, v, o, gate, up, down; n weights each) as
  `bnb.nn.Params4bit`: n / 2 bytes packed NF4, plus its quantisation constants: one absmax per
  block of 64 weights (`blocksize` 64), fp32 without double quantisation (4 bytes / 64 = 0.5 bit
  a weight); with it (`compress_statistics`, bitsandbytes `functional.quantize_4bit`) the absmax
  are themselves quantised to 8 bits in blocks of 256, each block with an fp32 absmax, plus one
  fp32 offset per tensor: ceil(n/64) + 4 * ceil(n/64/256) + 4 bytes (0.127 bit a weight, the
  QLoRA paper's figure). `quantized=False`: 0, the linears are counted in 16 bits below.
- base_16bit_parts: what is not a `Linear` in the decoder stays unquantised: the input embedding
  (`nn.Embedding`), `lm_head` (transformers' `get_keys_to_not_convert` skips the output embedding),
  the RMSNorm weights and the q/k/v biases. They load in bf16, and `prepare_model_for_kbit_training`
  casts every bf16/fp16 parameter that is not a `Params4bit` to fp32 (`kbit_upcast`): 4 bytes each.
  For Qwen2.5-32B that is 2 x 152064 x 5120 x 4 = 5.80 GiB of embeddings (2.90 GiB in bf16).
LoRA (rank r on q, k, v, o, gate, up, down of every layer; an A and a B matrix, r * (in + out)
parameters each):
- lora: the adapter in its training dtype. QLoRA: bf16; peft makes it fp32, then TRL 1.16's
  `GRPOTrainer` casts the trainable parameters of a 4-bit model to bf16 (grpo_trainer.py: "When
  using QLoRA, the PEFT adapter weights are converted to bf16"). 16-bit base: fp32 (peft's
  `autocast_adapter_dtype`). gradients: one per parameter, same dtype. optimizer: TRL's default
  `adamw_torch` keeps exp_avg and exp_avg_sq like the parameter: 2 per parameter, same dtype.
Training phase, micro_batch sequences of seq_len tokens (T = micro_batch * seq_len), gradient
checkpointing on:
- activations = layers * T * hidden * hs  (each layer's saved input; hs = 4 with `kbit_upcast`:
  the fp32 embedding makes the residual stream fp32, norms being fp32 too; else 2)
  + 3 * layer_activation_bytes(T)  (one layer recomputed: its forward peak as the serving plan
  counts it, and a backward of about twice that)
  + dequant  (bitsandbytes dequantises one 4-bit weight to bf16 for each matmul, forward and
  backward: the largest decoder linear, in_features * out_features * 2 bytes; 0 unquantised).
- logits: TRL 1.16 never holds (T, vocab) logits: `add_fused_lm_head` makes the forward return
  per-token log-probs through `ChunkedLogProbFunction` (trl/kernels/chunked_logprob.py), which
  projects tiles of min(T, 4096) tokens x 32768 vocabulary columns into one reused bf16 buffer,
  recomputes them in backward and accumulates grad_hidden in fp32. Counted: the tile
  (min(T, 4096) * 32768 * 2), the head chunk cast to bf16 when lm_head is fp32 (32768 * hidden * 2),
  the final hidden states (T * hidden * hs), their bf16 copy (T * hidden * 2) and grad_hidden
  (T * hidden * 4). Every token is counted as scored (TRL scores the completion only).
  The naive `log_softmax` over full logits would instead take T * vocab * (2 + 4): 0.87 GiB at
  T = 1024 for Qwen2.5's vocabulary.
Rollout phase: TRL generates (HF `generate`, no grad, gradient checkpointing off, bf16 KV cache)
one generation batch of G = lcm(micro_batch, num_generations) sequences (generation_batch_size is
per_device_train_batch_size * steps_per_generation and a multiple of num_generations):
- rollout_kv = kv_bytes_per_token("bf16") * seq_len * G
- rollout_activations: the prefill of G prompts, bounded by seq_len tokens each: one layer's
  forward peak over G * seq_len tokens (layer_activation_bytes), the hidden state (G * seq_len *
  hidden * hs) and the dequantised weight; `generate` keeps only the last position's logits.
- rollout_logits: the sampler's fp32 logits and probabilities, G * vocab * 4 * 2 per step.
Always resident:
- cuda_context: the training process's CUDA context and cuBLAS workspaces (the serving plan's
  512 MiB, `Assumptions().cuda_context_bytes`); torch.cuda.max_memory_allocated does not see it,
  so `allocated_peak_bytes` (peak - cuda_context - engine) is what to compare a run against.
- engine: what the serving vLLM keeps on the card during the refresh: `none` (stopped) 0;
  `asleep` (level-1 sleep offloads the weights to CPU and discards the KV cache, the process and
  its CUDA context stay) cuda_context_bytes; `serving` gpu_memory_utilization (0.90) of the card,
  which vLLM claims at start whatever it holds.
- reserve_fraction 5 %: the caching allocator's fragmentation between the two phases and anything
  else on the card (a desktop session); outside the peak, like the serving plan's reserve.

`best_fit` searches seq_len in 512..8192 (capped by the model's positions), num_generations in
2..16 and LoRA rank 8..32 at micro_batch 1 and keeps the fitting plan with the longest sequence,
then the largest group, then the highest rank.

Checked against published figures (not yet against a measured step: benchmarks/qlora_step.py):
the same Qwen2.5-32B step with a bf16 base peaks at 64.8 GiB here, the issue's "about 64 GB"; a
LLaMA-65B shape (r = 64, one sequence, the training phase only) needs 45.0 GB at 512 tokens and
46.7 GB at 1024 here, against the QLoRA paper's "finetune a 65B parameter model on a single 48GB
GPU"; Unsloth's table gives 26 GB as the minimum for a 32B QLoRA, above a 24 GB card.
"""

from __future__ import annotations

import math

from pydantic import BaseModel

from clinicloop.backends.plan import (
    Assumptions,
    GiB,
    ModelShape,
    layer_activation_bytes,
    sampler_bytes,
)

ENGINE_RESIDENT: tuple[str, ...] = ("none", "asleep", "serving")

NF4_BLOCK = 64  # bitsandbytes Params4bit blocksize
NESTED_BLOCK = 256  # double quantisation: absmax quantised in blocks of 256
TRL_TOKEN_TILE = 4096  # trl/kernels/chunked_logprob.py TOKEN_CHUNK_SIZE
TRL_VOCAB_TILE = 32768  # trl/trainer/utils.py _CHUNKED_LOGPROB_CHUNK_SIZE
RESERVE_FRACTION = 0.05

SEQ_LENS = (512, 1024, 2048, 4096, 8192)
GROUPS = (2, 4, 8, 16)
RANKS = (8, 16, 32)

STATIC = ("base_4bit", "base_16bit_parts", "lora", "optimizer", "cuda_context", "engine")
ROLLOUT = ("rollout_kv", "rollout_activations", "rollout_logits")
TRAINING = ("gradients", "activations", "logits")


class TrainSettings(BaseModel):
    """The knobs best_fit turns."""

    seq_len: int
    num_generations: int
    lora_rank: int
    micro_batch: int


class TrainingPlan(BaseModel):
    model: str
    gpu_bytes: int
    quantized: bool
    double_quant: bool
    kbit_upcast: bool
    engine_resident: str
    lora_rank: int
    seq_len: int
    num_generations: int
    micro_batch: int
    generation_batch: int  # sequences generated at once
    lora_params: int
    lora_dtype: str
    hidden_dtype: str  # of the residual stream that gradient checkpointing saves
    parts: dict[str, int]  # bytes; STATIC, ROLLOUT and TRAINING name them
    static_bytes: int
    rollout_bytes: int
    training_bytes: int
    peak_phase: str  # "rollout" or "training"
    peak_bytes: int
    allocated_peak_bytes: int  # what torch.cuda.max_memory_allocated should show
    reserve_bytes: int
    usable_bytes: int
    headroom_bytes: int  # negative: that much short
    fits: bool
    best_fit: TrainSettings | None = None  # None: nothing in the search fits
    # With kbit_upcast and nothing fitting: the best fit with embeddings and norms kept bf16.
    best_fit_without_upcast: TrainSettings | None = None


def lora_params(shape: ModelShape, rank: int) -> int:
    """Parameters of a rank-`rank` LoRA on every decoder linear layer."""
    return shape.num_layers * sum(rank * (n_in + n_out) for _, n_in, n_out in shape.linears())


def nf4_bytes(n: int, double_quant: bool = True) -> int:
    """One weight tensor of n elements as bitsandbytes stores it in NF4 (see the docstring)."""
    blocks = math.ceil(n / NF4_BLOCK)
    constants = blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 if double_quant else 4 * blocks
    return math.ceil(n / 2) + constants


def _unquantized_params(shape: ModelShape) -> int:
    """Embeddings, lm_head (if untied), final norm and every layer's norms and biases."""
    embeddings = shape.vocab_size * shape.hidden_size * (1 if shape.tie_word_embeddings else 2)
    return embeddings + shape.hidden_size + shape.num_layers * shape.layer_vectors()


def _plan(shape: ModelShape, gpu_bytes: int, lora_rank: int, seq_len: int, num_generations: int,
          micro_batch: int, double_quant: bool, quantized: bool, kbit_upcast: bool,
          engine_resident: str) -> TrainingPlan:
    if min(lora_rank, seq_len, num_generations, micro_batch) <= 0:
        raise ValueError("lora_rank, seq_len, num_generations and micro_batch must be positive")
    if engine_resident not in ENGINE_RESIDENT:
        raise ValueError(f"unknown engine_resident {engine_resident!r}; choose from "
                         f"{', '.join(ENGINE_RESIDENT)}")
    upcast = quantized and kbit_upcast  # k-bit preparation only runs on a k-bit model
    serving = Assumptions()
    h = shape.hidden_size
    linears = [n_in * n_out for _, n_in, n_out in shape.linears()]
    if quantized:
        base_4bit = shape.num_layers * sum(nf4_bytes(n, double_quant) for n in linears)
        base_16 = _unquantized_params(shape) * (4 if upcast else 2)
        dequant = max(linears) * 2
    else:
        base_4bit, dequant = 0, 0
        base_16 = (_unquantized_params(shape) + shape.num_layers * sum(linears)) * 2
    n_lora = lora_params(shape, lora_rank)
    lora_bytes = 2 if quantized else 4
    hs = 4 if upcast else 2
    tokens = micro_batch * seq_len
    group = math.lcm(micro_batch, num_generations)
    engine = {"none": 0, "asleep": serving.cuda_context_bytes,
              "serving": int(gpu_bytes * serving.gpu_memory_utilization)}[engine_resident]
    parts = {
        "base_4bit": base_4bit,
        "base_16bit_parts": base_16,
        "lora": n_lora * lora_bytes,
        "optimizer": 2 * n_lora * lora_bytes,
        "cuda_context": serving.cuda_context_bytes,
        "engine": engine,
        "rollout_kv": shape.kv_bytes_per_token("bf16") * seq_len * group,
        "rollout_activations": (layer_activation_bytes(shape, group * seq_len)
                                + group * seq_len * h * hs + dequant),
        "rollout_logits": sampler_bytes(shape, group),
        "gradients": n_lora * lora_bytes,
        "activations": (shape.num_layers * tokens * h * hs
                        + 3 * layer_activation_bytes(shape, tokens) + dequant),
        "logits": (min(tokens, TRL_TOKEN_TILE) * TRL_VOCAB_TILE * 2
                   + (TRL_VOCAB_TILE * h * 2 if upcast else 0) + tokens * h * (hs + 2 + 4)),
    }
    static = sum(parts[k] for k in STATIC)
    rollout = sum(parts[k] for k in ROLLOUT)
    training = sum(parts[k] for k in TRAINING)
    peak = static + max(rollout, training)
    reserve = math.ceil(gpu_bytes * RESERVE_FRACTION)
    usable = gpu_bytes - reserve
    fits = peak <= usable and (shape.max_position_embeddings is None
                               or seq_len <= shape.max_position_embeddings)
    return TrainingPlan(
        model=shape.name, gpu_bytes=gpu_bytes, quantized=quantized,
        double_quant=quantized and double_quant, kbit_upcast=upcast,
        engine_resident=engine_resident, lora_rank=lora_rank, seq_len=seq_len,
        num_generations=num_generations, micro_batch=micro_batch, generation_batch=group,
        lora_params=n_lora, lora_dtype="bf16" if lora_bytes == 2 else "fp32",
        hidden_dtype="fp32" if hs == 4 else "bf16", parts=parts, static_bytes=static,
        rollout_bytes=rollout, training_bytes=training,
        peak_phase="rollout" if rollout > training else "training", peak_bytes=peak,
        allocated_peak_bytes=peak - parts["cuda_context"] - engine, reserve_bytes=reserve,
        usable_bytes=usable, headroom_bytes=usable - peak, fits=fits)


def best_fit(shape: ModelShape, gpu_bytes: int, *, double_quant: bool = True,
             quantized: bool = True, kbit_upcast: bool = True,
             engine_resident: str = "none") -> TrainSettings | None:
    """The largest searched settings that fit (longest sequence, then largest group, then
    highest rank; micro_batch 1), or None."""
    seq_lens = [s for s in SEQ_LENS
                if shape.max_position_embeddings is None or s <= shape.max_position_embeddings]
    for seq_len in reversed(seq_lens):
        for group in reversed(GROUPS):
            for rank in reversed(RANKS):
                plan = _plan(shape, gpu_bytes, rank, seq_len, group, 1, double_quant, quantized,
                             kbit_upcast, engine_resident)
                if plan.fits:
                    return TrainSettings(seq_len=seq_len, num_generations=group, lora_rank=rank,
                                    micro_batch=1)
    return None


def fit_table(shape: ModelShape, gpu_bytes: int, *, lora_rank: int = 16,
              **options: bool | str) -> dict[int, int]:
    """For each searched seq_len: the largest searched num_generations that fits at
    `lora_rank` and micro_batch 1 (0: none). `options`: double_quant, quantized, kbit_upcast,
    engine_resident, as for `plan_training`."""
    table = {}
    for seq_len in SEQ_LENS:
        fitting = [g for g in GROUPS
                   if plan_training(shape, gpu_bytes, lora_rank=lora_rank, seq_len=seq_len,
                                    num_generations=g, search=False, **options).fits]
        table[seq_len] = max(fitting, default=0)
    return table


def plan_training(shape: ModelShape, gpu_bytes: int, *, lora_rank: int = 16, seq_len: int = 1024,
                  num_generations: int = 4, micro_batch: int = 1, double_quant: bool = True,
                  quantized: bool = True, engine_resident: str = "none",
                  kbit_upcast: bool = True, search: bool = True) -> TrainingPlan:
    """Plan one QLoRA GRPO step on one GPU (the module docstring has every formula).
    `quantized=False`: the same model with a 16-bit base (the CPU path, a bf16 LoRA).
    `kbit_upcast=False`: embeddings, lm_head and norms kept in bf16 rather than cast to fp32 by
    peft's k-bit preparation. `search`: also fill `best_fit`."""
    plan = _plan(shape, gpu_bytes, lora_rank, seq_len, num_generations, micro_batch,
                 double_quant, quantized, kbit_upcast, engine_resident)
    if search:
        plan.best_fit = best_fit(shape, gpu_bytes, double_quant=double_quant,
                                 quantized=quantized, kbit_upcast=kbit_upcast,
                                 engine_resident=engine_resident)
        if plan.best_fit is None and plan.kbit_upcast:
            plan.best_fit_without_upcast = best_fit(
                shape, gpu_bytes, double_quant=double_quant, quantized=quantized,
                kbit_upcast=False, engine_resident=engine_resident)
    return plan


def _flags(s: TrainSettings) -> str:
    return (f"--seq-len {s.seq_len} --num-generations {s.num_generations} "
            f"--lora-rank {s.lora_rank} --micro-batch {s.micro_batch}")


def training_misfit(plan: TrainingPlan) -> str | None:
    """None if the plan fits; else one line: why it does not, and what to change."""
    if plan.fits:
        return None
    where = (f"{plan.model} does not fit {plan.gpu_bytes / GiB:.2f} GiB for training at "
             f"--seq-len {plan.seq_len} --num-generations {plan.num_generations}")
    if plan.best_fit is not None:
        return (f"{where}: the {plan.peak_phase} peak is {plan.peak_bytes / GiB:.2f} GiB of "
                f"{plan.usable_bytes / GiB:.2f} usable; it fits at {_flags(plan.best_fit)}")
    base = plan.parts["base_4bit"] + plan.parts["base_16bit_parts"]
    what = "4-bit base" if plan.quantized else "16-bit base"
    engine = (f", the serving engine keeps {plan.parts['engine'] / GiB:.2f} GiB (stop it or put "
              "it to sleep: --engine-resident none|asleep)" if plan.engine_resident == "serving"
              else "")
    upcast = ""
    if plan.best_fit_without_upcast is not None:
        upcast = ("; with them kept bf16 (--no-kbit-upcast, not peft's k-bit preparation) it fits "
                  f"at {_flags(plan.best_fit_without_upcast)}")
    return (f"{where}, nor at any searched setting (seq_len >= 512, >= 2 generations, rank >= 8): "
            f"the {what} alone is {base / GiB:.2f} GiB of the card's {plan.gpu_bytes / GiB:.2f} "
            f"({plan.parts['base_16bit_parts'] / GiB:.2f} of it embeddings, lm_head and norms in "
            f"{'fp32' if plan.kbit_upcast else '16 bits'}){engine}{upcast}; use a smaller model "
            "or a larger --gpu")


def render_training(plan: TrainingPlan) -> str:
    """The human summary: each part in GiB with its arithmetic, the peak, fits, the best fit."""
    def row(name: str, n: int, why: str) -> str:
        return f"  {name:<20}{n / GiB:6.2f} GiB  {why}"

    p = plan.parts
    base = ("NF4 + double quant" if plan.double_quant else "NF4") if plan.quantized else "bf16"
    emb = "fp32 (peft k-bit upcast)" if plan.kbit_upcast else "bf16"
    lora_bytes = 2 if plan.lora_dtype == "bf16" else 4
    tokens = plan.generation_batch * plan.seq_len
    lines = [
        f"{plan.model} QLoRA GRPO step on {plan.gpu_bytes / GiB:.2f} GiB: base {base}, LoRA rank "
        f"{plan.lora_rank} ({plan.lora_params / 1e6:.1f}M params, {plan.lora_dtype}), "
        f"{plan.num_generations} generations x {plan.seq_len:,} tokens, micro-batch "
        f"{plan.micro_batch}, engine {plan.engine_resident}",
        "resident",
        row("base_4bit", p["base_4bit"], "decoder linears, 4 bits + quantisation constants"),
        row("base_16bit_parts", p["base_16bit_parts"], f"embeddings, lm_head, norms, biases in "
            f"{emb}" + ("" if plan.quantized else " + every linear in bf16")),
        row("lora", p["lora"], f"{plan.lora_params:,} x {lora_bytes} bytes"),
        row("optimizer", p["optimizer"], f"AdamW exp_avg + exp_avg_sq, {plan.lora_dtype}"),
        row("cuda_context", p["cuda_context"], "training process"),
        row("engine", p["engine"], f"serving vLLM: {plan.engine_resident}"),
        f"rollout: {plan.generation_batch} sequences from the training model (HF generate)",
        row("rollout_kv", p["rollout_kv"], f"bf16, {p['rollout_kv'] // tokens // 1024} KiB/token "
            f"x {plan.seq_len:,} x {plan.generation_batch}"),
        row("rollout_activations", p["rollout_activations"],
            f"prefill: one layer over {tokens:,} tokens"),
        row("rollout_logits", p["rollout_logits"], "fp32 logits + probabilities per step"),
        f"training: micro-batch of {plan.micro_batch * plan.seq_len:,} tokens, gradient "
        "checkpointing",
        row("gradients", p["gradients"], f"LoRA, {plan.lora_dtype}"),
        row("activations", p["activations"], f"saved {plan.hidden_dtype} hidden state per layer "
            "+ one layer recomputed (fwd + bwd)"
            + (" + one dequantised weight" if plan.quantized else "")),
        row("logits", p["logits"], "TRL's fused LM head: 4096 x 32768 tiles, no full logits"),
        row("peak", plan.peak_bytes, f"= resident {plan.static_bytes / GiB:.2f} + "
            f"{plan.peak_phase} {max(plan.rollout_bytes, plan.training_bytes) / GiB:.2f} "
            f"(torch.cuda.max_memory_allocated ~ {plan.allocated_peak_bytes / GiB:.2f})"),
        row("usable", plan.usable_bytes, f"= card - {RESERVE_FRACTION:.0%} reserve (allocator "
            "fragmentation)"),
        f"  fits                {'yes' if plan.fits else 'no'}: headroom "
        f"{plan.headroom_bytes / GiB:.2f} GiB",
    ]
    if plan.best_fit is not None:
        lines.append(f"  best fit            {_flags(plan.best_fit)}")
    else:
        lines.append("  best fit            none of the searched settings (seq_len 512-8192, "
                     "2-16 generations, rank 8-32)")
    if plan.best_fit_without_upcast is not None:
        lines.append(f"  embeddings bf16     fits at {_flags(plan.best_fit_without_upcast)} "
                     "(--no-kbit-upcast)")
    return "\n".join(lines)
