"""`clinicloop quant awq` / `quant gptq`: W4A16 checkpoints for vLLM, made with llm-compressor.

Both algorithms write the compressed-tensors "pack-quantized" format (int4 weights in int32 words,
a scale per group, zero points when asymmetric, `quantization_config` in config.json) that vLLM
serves with its Marlin kernels without a `--quantization` flag. AWQ (llm-compressor's
`AWQModifier`) rescales channels by their activations before round-to-nearest; GPTQ
(`GPTQModifier`) corrects each column's rounding error with the layer's Hessian.

Calibration data: corpus dialogues rendered with the model's chat template, plus the model's own
greedy answers to other corpus prompts (thinking 'off' and 'on' in turn), which the Baichuan-M2
paper found makes the quantized model closer to the original on its own output distribution.

Running on CPU: in llm-compressor 0.14, `AWQModifier._apply_smoothing`
(`llmcompressor/modifiers/transform/awq/base.py`, line 507) pins every cached batch with
`IntermediatesCache.pin_memory` (`llmcompressor/pipelines/cache.py`, which calls
`Tensor.pin_memory()` at line 155) so that later host-to-GPU copies can be asynchronous. Without an
accelerator torch raises "Cannot access accelerator device when none is available", and no
llm-compressor option skips the call (`offload_device` only decides where the cache lives). Pinned
memory matters only for host-to-device copies, of which a CPU run has none, so `cpu_pinning_shim`
makes that one method a no-op while `oneshot` runs, and only when torch sees no accelerator; the
installed files are not touched and the method is restored afterwards.

The result is loaded back with transformers (compressed-tensors decompresses it) and compared with
the source model on held-out consultations: cosine similarity of the logits, top-1 agreement, KL
divergence and perplexity over the answer tokens, and greedy answers.
"""

from __future__ import annotations

import importlib.metadata
import json
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from pydantic import BaseModel, Field
from tqdm import tqdm

from clinicloop.model.checkpoint import safetensors_bytes, save_checkpoint
from clinicloop.quant.gguf import machine

Algorithm = Literal["awq", "gptq"]
Scheme = Literal["W4A16", "W4A16_ASYM"]
# AWQ's zero points are part of the method (llm-compressor's AWQ examples use W4A16_ASYM); GPTQ is
# usually symmetric. vLLM's Marlin kernel serves both.
DEFAULT_SCHEME: dict[str, Scheme] = {"awq": "W4A16_ASYM", "gptq": "W4A16"}
# Group sizes vLLM's Marlin kernel has, largest (fewest scales) first; -1 is one scale per row.
MARLIN_GROUP_SIZES = (128, 64, 32)
MARLIN_MIN_IN, MARLIN_MIN_OUT = 128, 64  # vLLM's GPTQ_MARLIN_MIN_THREAD_K / _N
# vLLM runs these projections as one fused matrix, so Marlin sees their summed output width.
FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
         "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
IGNORE = ["lm_head"]  # the output head stays in the source dtype, as vLLM expects


class W4A16Options(BaseModel):
    scheme: Scheme | None = None  # None: DEFAULT_SCHEME of the algorithm
    group_size: int | None = None  # None: the largest Marlin group size every layer allows
    dtype: Literal["bfloat16", "float16"] = "bfloat16"  # Marlin runs 16-bit activations only
    corpus_samples: int = Field(128, ge=0)  # corpus dialogues, as written
    self_samples: int = Field(64, ge=0)  # the model's own answers to other corpus prompts
    max_new_tokens: int = Field(128, ge=1)  # per own answer
    max_seq_len: int = Field(512, ge=16)  # calibration sequences are cut here
    check_prompts: int = Field(8, ge=0)  # held-out consultations compared; 0 skips the check
    seed: int = 0


class Linear(BaseModel):
    name: str
    in_features: int
    out_features: int


class Calibration(BaseModel):
    corpus_samples: int
    self_samples: int
    tokens: int
    max_seq_len: int
    max_new_tokens: int
    wall_s: float  # rendering and generating the own answers


class Similarity(BaseModel):
    """A model (`compared`) against the source, on the answer tokens of held-out consultations."""

    compared: str  # "quantized", or "<dtype> cast": the source only cast to the checkpoint's dtype
    prompts: int
    tokens: int
    cosine_mean: float  # of the full logit vectors at each token
    cosine_min: float
    top1_agreement: float
    kl_mean: float  # KL(source || quantized), nats per token
    ppl_source: float
    ppl: float
    same_greedy_answers: float  # share of greedy answers identical to the source's
    sample_prompt: str
    sample_source: str
    sample: str


class W4A16Result(BaseModel):
    algorithm: Algorithm
    scheme: Scheme
    group_size: int
    group_size_reason: str
    dtype: str
    name: str
    source: Path
    checkpoint: Path
    machine: str
    versions: dict[str, str]
    cpu_pinning_shim: bool  # whether `cpu_pinning_shim` was in force (no accelerator)
    linear_layers: int
    marlin_problems: list[str]  # why vLLM's Marlin kernel would refuse a layer (TP=1); [] = none
    quantization_config: dict[str, Any]  # as written to the checkpoint's config.json
    source_bytes: int
    checkpoint_bytes: int
    calibration: Calibration
    # None when the check was skipped (check_prompts=0: it holds the source and the decompressed
    # checkpoint in memory at once, twice the 16-bit model).
    similarity: Similarity | None
    # The rounding to the 16-bit dtype alone, when the source is stored wider (the tiny models are
    # float32): the part of `similarity`'s gap that is not quantization.
    cast_baseline: Similarity | None
    wall_s: dict[str, float]


def linear_layers(hf_dir: Path) -> list[Linear]:
    """Every quantized linear layer's shape, from the model built on the meta device (no
    weights are read, so a group size is checked before anything slow runs)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf_dir))
    return [Linear(name=n, in_features=m.in_features, out_features=m.out_features)
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.split(".")[-1] not in IGNORE]


def choose_group_size(layers: list[Linear], requested: int | None) -> tuple[int, str]:
    """The group size and why: `requested` if every input width is a multiple of it, else the
    largest Marlin group size that divides them all, else -1 (one scale per output row)."""
    widths = sorted({layer.in_features for layer in layers})
    fits = [g for g in MARLIN_GROUP_SIZES if all(w % g == 0 for w in widths)]
    if requested is None:
        if fits:
            return fits[0], (f"largest of {'/'.join(map(str, MARLIN_GROUP_SIZES))} dividing every "
                             f"input width ({', '.join(map(str, widths))})")
        return -1, f"no Marlin group size divides the input widths {widths}: one scale per row"
    if requested == -1:
        return -1, "requested: one scale per output row"
    if requested <= 0:
        raise ValueError(f"group size must be positive or -1 (per row), not {requested}")
    bad = [layer for layer in layers if layer.in_features % requested]
    if bad:
        shown = ", ".join(f"{layer.name} ({layer.in_features})" for layer in bad[:4])
        more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
        hint = (f"the largest that fits is {fits[0]}" if fits
                else "none of 128/64/32 fits; use -1 (per row)")
        raise ValueError(f"group size {requested} does not divide the input width of "
                         f"{len(bad)} layer(s): {shown}{more}; {hint}")
    return requested, "requested"


def marlin_problems(layers: list[Linear], group_size: int) -> list[str]:
    """Why vLLM's Marlin kernel (one GPU, no tensor parallelism) would refuse these layers:
    input width a multiple of 128, fused output width of 64, group size one it has. vLLM then
    picks a slower W4A16 kernel or fails."""
    problems = []
    if group_size != -1 and group_size not in MARLIN_GROUP_SIZES:
        problems.append(f"group size {group_size} is not one of Marlin's {MARLIN_GROUP_SIZES}")
    narrow = sorted({layer.in_features for layer in layers if layer.in_features % MARLIN_MIN_IN})
    if narrow:
        problems.append(f"input widths {narrow} are not multiples of {MARLIN_MIN_IN}")
    fused: dict[str, int] = {}
    for layer in layers:
        parent, leaf = layer.name.rsplit(".", 1)
        key = f"{parent}.{FUSED.get(leaf, leaf)}"
        fused[key] = fused.get(key, 0) + layer.out_features
    thin = sorted({width for width in fused.values() if width % MARLIN_MIN_OUT})
    if thin:
        problems.append(f"fused output widths {thin} are not multiples of {MARLIN_MIN_OUT}")
    return problems


def _skip_pinning(self: Any, batch_index: int, input_names: list[str] | None = None) -> None:
    """`IntermediatesCache.pin_memory` without an accelerator: nothing will be copied to a device,
    so there is nothing to pin for."""


@contextmanager
def cpu_pinning_shim() -> Iterator[bool]:
    """While in force, llm-compressor's AWQ cache skips pinning memory when torch sees no
    accelerator (see the module docstring); yields whether it patched anything."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield False
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = _skip_pinning  # type: ignore[method-assign]
    try:
        yield True
    finally:
        IntermediatesCache.pin_memory = original  # type: ignore[method-assign]


def _own_answers(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                 progress: bool) -> list[str]:
    """Greedy completions of `prompts`, each up to and including its end-of-turn token."""
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    tokenizer.padding_side = "left"
    answers: list[str] = []
    batch = 8
    for start in tqdm(range(0, len(prompts), batch), desc="own answers", unit="batch",
                      leave=False, disable=not progress):
        enc = tokenizer(prompts[start:start + batch], return_tensors="pt", padding=True,
                        add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
            answers.append(tokenizer.decode(row[:cut], skip_special_tokens=False))
    return answers


def calibration_texts(model: Any, tokenizer: Any, options: W4A16Options,
                      progress: bool = True) -> list[str]:
    """Corpus dialogues as written, then the model's own answers to other corpus prompts, all
    rendered with the tokenizer's chat template."""
    from clinicloop.model.corpus import load_corpus

    corpus = load_corpus()
    wanted = options.corpus_samples + options.self_samples
    if not 0 < wanted <= len(corpus):
        raise ValueError(f"{wanted} calibration samples asked for; the corpus has {len(corpus)}")
    rows = random.Random(options.seed).sample(corpus, wanted)
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False)
             for r in rows[:options.corpus_samples]]
    prompts = [tokenizer.apply_chat_template(r["messages"][:-1], tokenize=False,
                                             add_generation_prompt=True,
                                             thinking_mode=("off", "on")[i % 2])
               for i, r in enumerate(rows[options.corpus_samples:])]
    answers = _own_answers(model, tokenizer, prompts, options.max_new_tokens, progress)
    return texts + [p + a for p, a in zip(prompts, answers, strict=True)]


def recipe(algorithm: Algorithm, scheme: Scheme, group_size: int) -> list[Any]:
    """llm-compressor modifiers: `scheme` with `group_size` on every Linear but the head, by
    GPTQ, or by round-to-nearest after AWQ's activation-aware rescaling."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationStrategy,
        preset_name_to_scheme,
    )
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    quant = preset_name_to_scheme(scheme, ["Linear"])
    weights = quant.weights.model_dump() if quant.weights is not None else {}
    if group_size == -1:
        weights.update(strategy=QuantizationStrategy.CHANNEL, group_size=None)
    else:
        weights.update(strategy=QuantizationStrategy.GROUP, group_size=group_size)
    quant.weights = QuantizationArgs(**weights)
    groups = {"group_0": quant}
    if algorithm == "gptq":
        return [GPTQModifier(ignore=IGNORE, config_groups=groups)]
    return [AWQModifier(), QuantizationModifier(ignore=IGNORE, config_groups=groups)]


def _answer_logits(model: Any, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Float32 logits predicting tokens `start`.. of `ids`."""
    with torch.no_grad():
        return model(ids).logits[0, start - 1:-1].float()


class HeldOutCase(NamedTuple):
    prompt: str
    prompt_ids: list[int]
    ids: torch.Tensor  # prompt and answer
    source_answer: str  # the source model's greedy answer


def _greedy(model: Any, tokenizer: Any, prompt_ids: list[int]) -> str:
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True)


def held_out_cases(source: Any, tokenizer: Any, prompts: int) -> list[HeldOutCase]:
    """`prompts` held-out consultations, tokenized, with the source's greedy answers: computed
    once for every model compared with the source."""
    from clinicloop.quant.quality import held_out_pairs

    cases = []
    for prompt, answer in held_out_pairs()[:prompts]:
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + tokenizer(answer, add_special_tokens=False)["input_ids"]])
        cases.append(HeldOutCase(prompt, p_ids, ids, _greedy(source, tokenizer, p_ids)))
    return cases


def similarity(source: Any, quantized: Any, tokenizer: Any, cases: list[HeldOutCase],
               compared: str = "quantized") -> Similarity:
    """Compare `quantized` with `source` on held-out consultations (answer tokens)."""
    cos, top1, kl, nll_s, nll_q = [], [], [], [], []
    same, samples = 0, []
    for prompt, p_ids, ids, source_answer in cases:
        targets = ids[0, len(p_ids):]
        ls, lq = _answer_logits(source, ids, len(p_ids)), _answer_logits(quantized, ids, len(p_ids))
        cos.append(torch.nn.functional.cosine_similarity(ls, lq, dim=-1))
        top1.append((ls.argmax(-1) == lq.argmax(-1)).float())
        lps, lpq = ls.log_softmax(-1), lq.log_softmax(-1)
        kl.append((lps.exp() * (lps - lpq)).sum(-1))
        nll_s.append(-lps.gather(1, targets[:, None])[:, 0])
        nll_q.append(-lpq.gather(1, targets[:, None])[:, 0])
        answer = _greedy(quantized, tokenizer, p_ids)
        same += source_answer == answer
        samples.append((prompt, source_answer, answer))
    c = torch.cat(cos)
    return Similarity(
        compared=compared, prompts=len(cases), tokens=len(c), cosine_mean=round(c.mean().item(), 5),
        cosine_min=round(c.min().item(), 5),
        top1_agreement=round(torch.cat(top1).mean().item(), 4),
        kl_mean=round(torch.cat(kl).mean().item(), 5),
        ppl_source=round(torch.cat(nll_s).mean().exp().item(), 3),
        ppl=round(torch.cat(nll_q).mean().exp().item(), 3),
        same_greedy_answers=round(same / len(cases), 4),
        sample_prompt=samples[0][0], sample_source=samples[0][1], sample=samples[0][2])


def _versions() -> dict[str, str]:
    names = ("llmcompressor", "compressed-tensors", "transformers", "torch")
    return {n: importlib.metadata.version(n) for n in names}


def _quiet_llmcompressor() -> None:
    """Only llm-compressor's errors on the console (LLM_COMPRESSOR_LOG_LEVEL still overrides):
    our progress bar shows the steps, and `oneshot(log_dir=...)` keeps its full log."""
    from llmcompressor import LoggerConfig, configure_logger

    configure_logger(LoggerConfig(console_log_level="ERROR"))


def run(hf_dir: Path, out_dir: Path, algorithm: Algorithm, options: W4A16Options | None = None,
        *, name: str | None = None, progress: bool = True) -> W4A16Result:
    """Quantize `hf_dir` to W4A16 with `algorithm` into `out_dir/<name>-<algorithm>-w4a16`, then
    load it back with transformers and compare it with the source."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options = options or W4A16Options()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    name = name or hf_dir.name
    scheme = options.scheme or DEFAULT_SCHEME[algorithm]
    layers = linear_layers(hf_dir)
    group_size, reason = choose_group_size(layers, options.group_size)
    checkpoint = out_dir / f"{name}-{algorithm}-w4a16"
    out_dir.mkdir(parents=True, exist_ok=True)
    _quiet_llmcompressor()
    wall: dict[str, float] = {}
    started = time.perf_counter()
    bar = tqdm(total=4, desc=f"quant {algorithm}", unit="step", disable=not progress)

    bar.set_postfix_str("calibration data")
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    dtype = getattr(torch, options.dtype)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype)
    model.eval()
    texts = calibration_texts(model, tokenizer, options, progress)
    enc = tokenizer(texts, truncation=True, max_length=options.max_seq_len,
                    add_special_tokens=False)
    dataset = Dataset.from_dict({"input_ids": enc["input_ids"],
                                 "attention_mask": enc["attention_mask"]})
    calibration = Calibration(
        corpus_samples=options.corpus_samples, self_samples=options.self_samples,
        tokens=sum(map(len, enc["input_ids"])), max_seq_len=options.max_seq_len,
        max_new_tokens=options.max_new_tokens, wall_s=round(time.perf_counter() - started, 2))
    wall["calibration_data"] = calibration.wall_s
    bar.update()

    bar.set_postfix_str(f"{algorithm} one-shot")
    mark = time.perf_counter()
    with cpu_pinning_shim() as shimmed:
        oneshot(model=model, tokenizer=tokenizer, dataset=dataset,
                recipe=recipe(algorithm, scheme, group_size),
                num_calibration_samples=len(dataset), max_seq_length=options.max_seq_len,
                shuffle_calibration_samples=False, log_dir=str(out_dir / "logs"))
    wall["oneshot"] = round(time.perf_counter() - mark, 2)
    bar.update()

    bar.set_postfix_str("save")
    mark = time.perf_counter()
    save_checkpoint(model, hf_dir, checkpoint, save_compressed=True)
    del model
    wall["save"] = round(time.perf_counter() - mark, 2)
    bar.update()

    bar.set_postfix_str("load back and compare")
    mark = time.perf_counter()
    sim = baseline = None
    if options.check_prompts:
        quantized = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
        source = AutoModelForCausalLM.from_pretrained(hf_dir, dtype="auto").eval()
        cases = held_out_cases(source, tokenizer, options.check_prompts)
        sim = similarity(source, quantized, tokenizer, cases)
        del quantized
        if source.dtype != dtype:
            cast = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()
            baseline = similarity(source, cast, tokenizer, cases, f"{options.dtype} cast")
    wall["check"] = round(time.perf_counter() - mark, 2)
    wall["total"] = round(time.perf_counter() - started, 2)
    bar.update()
    bar.close()
    return W4A16Result(
        algorithm=algorithm, scheme=scheme, group_size=group_size, group_size_reason=reason,
        dtype=options.dtype, name=name, source=hf_dir, checkpoint=checkpoint, machine=machine(),
        versions=_versions(), cpu_pinning_shim=shimmed, linear_layers=len(layers),
        marlin_problems=marlin_problems(layers, group_size),
        quantization_config=json.loads(
            (checkpoint / "config.json").read_text(encoding="utf-8"))["quantization_config"],
        source_bytes=safetensors_bytes(hf_dir), checkpoint_bytes=safetensors_bytes(checkpoint),
        calibration=calibration, similarity=sim, cast_baseline=baseline, wall_s=wall)


def _similarity_lines(rows: list[Similarity]) -> list[str]:
    first = rows[0]
    return [
        f"## Against the source, on {first.prompts} held-out consultations ({first.tokens} answer "
        "tokens)", "",
        "| model | logit cosine mean | min | top-1 agreement | KL nats/token | ppl (source "
        f"{first.ppl_source:.2f}) | same greedy answers |", "|---|---|---|---|---|---|---|",
        *(f"| {s.compared} | {s.cosine_mean:.4f} | {s.cosine_min:.4f} | {s.top1_agreement:.3f} "
          f"| {s.kl_mean:.4f} | {s.ppl:.2f} | {s.same_greedy_answers:.2f} |" for s in rows),
        "", f"Greedy answer, source: {first.sample_source!r}", "",
        f"Greedy answer, quantized: {first.sample!r}"]


def summary(result: W4A16Result) -> str:
    """The human summary written beside the JSON."""
    c = result.calibration
    versions = ", ".join(f"{k} {v}" for k, v in result.versions.items())
    shim = "applied (no accelerator)" if result.cpu_pinning_shim else "not needed"
    marlin = ("every layer fits vLLM's Marlin kernel" if not result.marlin_problems
              else "vLLM's Marlin kernel would refuse it: " + "; ".join(result.marlin_problems))
    lines = [
        f"# {result.algorithm.upper()} {result.scheme} of {result.name}", "",
        f"- checkpoint: `{result.checkpoint}` (compressed-tensors, "
        f"{result.quantization_config.get('format')}), {result.linear_layers} linear layers",
        f"- group size {result.group_size} ({result.group_size_reason}); {marlin}",
        f"- size: {result.source_bytes / 2**20:.2f} MiB -> {result.checkpoint_bytes / 2**20:.2f} "
        f"MiB ({result.source_bytes / max(1, result.checkpoint_bytes):.2f}x smaller), "
        f"activations {result.dtype}",
        f"- calibration: {c.corpus_samples} corpus dialogues + {c.self_samples} own answers, "
        f"{c.tokens} tokens (max {c.max_seq_len} per sample)",
        f"- machine: {result.machine}; {versions}",
        f"- CPU pinning shim: {shim}",
        "", "| step | s |", "|---|---|",
        *(f"| {k} | {v:.1f} |" for k, v in result.wall_s.items()), "",
    ]
    rows = [s for s in (result.similarity, result.cast_baseline) if s is not None]
    lines += _similarity_lines(rows) if rows else ["Not compared with the source (--check 0)."]
    return "\n".join(lines) + "\n"


def write(result: W4A16Result, out_dir: Path) -> tuple[Path, Path]:
    json_path = out_dir / f"{result.algorithm}.json"
    md_path = out_dir / f"{result.algorithm}.md"
    json_path.write_text(result.model_dump_json(indent=2) + "\n", encoding="utf-8")
    md_path.write_text(summary(result), encoding="utf-8")
    return json_path, md_path
