"""Build the tiny Qwen2 chat model offline: tokenizer, CPU training, HF directory and GGUF files,
cached where `tiny.build_root` says (`tiny.py` holds the sizes and looks builds up without torch).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from clinicloop.model.corpus import Dialogue, load_corpus
from clinicloop.model.gguf_export import quantize_gguf, write_gguf_f16
from clinicloop.model.tiny import (
    CODE_VERSION,
    SIZES,
    SizeConfig,
    TinyModel,
    build_hash,
    build_root,
    read_build,
    training_targets,
)
from clinicloop.model.tokenizer import (
    IM_END,
    render_chat,
    save_tokenizer,
    tool_argument_words,
    train_tokenizer,
    training_texts,
)

IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]


def build_examples(rows: list[Dialogue], tokenizer: PreTrainedTokenizerFast) -> list[Example]:
    """Tokenized training sequences whose labels cover only the assistant's target tokens."""
    examples: list[Example] = []
    for index, row in enumerate(rows):
        for prompt, target in training_targets(row, index):
            enc = tokenizer(prompt + target, return_offsets_mapping=True)
            cut = len(prompt)
            labels: list[int] = []
            for token, (start, end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
                if start < cut < end:
                    raise ValueError(f"a token straddles the prompt/answer boundary in {row['id']}")
                labels.append(token if start >= cut else IGNORE)
            examples.append(Example(list(enc["input_ids"]), labels))
    return examples


def padded_vocab(tokenizer_size: int, multiple: int) -> int:
    return math.ceil(tokenizer_size / multiple) * multiple


def model_config(size: SizeConfig, tokenizer: PreTrainedTokenizerFast) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=padded_vocab(max(len(tokenizer), size.vocab_size), size.vocab_multiple),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_kv_heads,
        max_position_embeddings=size.max_positions,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.pad_token_id,
    )


def _collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _epoch_batches(examples: list[Example], size: SizeConfig, order: torch.Generator
                   ) -> list[list[int]]:
    """One pass over ``examples`` as batches of indices, in a random order.

    Examples are sorted by length within groups of eight batches' worth, so a batch pads little,
    and a batch is cut at ``batch_size`` examples or ``batch_tokens`` padded tokens.
    """
    shuffled = torch.randperm(len(examples), generator=order).tolist()
    group = 8 * size.batch_size
    batches: list[list[int]] = []
    for start in range(0, len(shuffled), group):
        batch: list[int] = []
        for i in sorted(shuffled[start:start + group], key=lambda i: len(examples[i].input_ids)):
            width = len(examples[i].input_ids)  # ascending, so the widest of the batch so far
            if batch and (len(batch) == size.batch_size
                          or (len(batch) + 1) * width > size.batch_tokens):
                batches.append(batch)
                batch = []
            batch.append(i)
        batches.append(batch)
    return [batches[k] for k in torch.randperm(len(batches), generator=order).tolist()]


def train_model(
    size: SizeConfig,
    tokenizer: PreTrainedTokenizerFast,
    examples: list[Example],
    seed: int,
    steps: int | None = None,
    progress: bool = True,
) -> tuple[Qwen2ForCausalLM, list[float]]:
    """Train a fresh model for ``steps`` (default ``size.steps``); returns it and per-step losses.

    Deterministic for a seed: weights, batch order and thread count are all fixed.
    """
    steps = size.steps if steps is None else steps
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(size.threads)
    try:
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(model_config(size, tokenizer))
        model.train()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=size.lr, betas=(0.9, 0.95), weight_decay=0.01
        )

        def schedule(step: int) -> float:
            # Linear warmup, then cosine decay to a tenth of the peak rate.
            if step < size.warmup_steps:
                return (step + 1) / size.warmup_steps
            done = (step - size.warmup_steps) / max(1, steps - size.warmup_steps)
            return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, done)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        order = torch.Generator().manual_seed(seed)
        queue: list[list[int]] = []
        losses: list[float] = []
        bar = tqdm(range(steps), desc=f"train {size.name}", unit="step", disable=not progress)
        for _ in bar:
            if not queue:
                queue = _epoch_batches(examples, size, order)
            batch = [examples[i] for i in queue.pop()]
            loss = model(**_collate(batch, tokenizer.pad_token_id)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        model.eval()
        return model, losses
    finally:
        torch.set_num_threads(previous_threads)


def format_check(
    model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, rows: list[Dialogue], n: int = 8
) -> dict[str, float]:
    """Share of greedy answers that end with <|im_end|>, per thinking mode, on ``n`` prompts."""
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    picked = rows[:: max(1, len(rows) // n)][:n]
    rates: dict[str, float] = {}
    with torch.no_grad():
        for mode, budget in (("off", 64), ("on", 128)):
            ok = 0
            for row in picked:
                prompt = render_chat(row["messages"][:-1], thinking_mode=mode)
                ids = torch.tensor([tokenizer(prompt)["input_ids"]])
                out = model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget,
                    do_sample=False, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                )
                ok += int(out[0, -1].item() == eos)
            rates[mode] = ok / len(picked)
    return rates


def _loss_summary(losses: list[float]) -> dict[str, Any]:
    tenth = max(1, len(losses) // 10)
    curve = [
        round(sum(losses[i : i + tenth]) / len(losses[i : i + tenth]), 4)
        for i in range(0, len(losses), tenth)
    ]
    return {
        "first": round(losses[0], 4),
        "final": round(sum(losses[-tenth:]) / len(losses[-tenth:]), 4),
        "curve_per_tenth": curve,
    }


def _build_into(work: Path, size: SizeConfig, seed: int, digest: str, progress: bool) -> None:
    started = time.perf_counter()
    rows = load_corpus()
    tokenizer = train_tokenizer(training_texts(rows), size.vocab_size, tool_argument_words(rows))
    examples = build_examples(rows, tokenizer)
    prepared = time.perf_counter()

    model, losses = train_model(size, tokenizer, examples, seed, progress=progress)
    trained = time.perf_counter()
    rates = format_check(model, tokenizer, rows)

    hf_dir = work / "hf"
    model.generation_config = GenerationConfig(
        eos_token_id=model.config.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(hf_dir)
    save_tokenizer(tokenizer, hf_dir)
    f16 = write_gguf_f16(hf_dir, work / f"{size.name}-f16.gguf", name=size.name)
    q8 = quantize_gguf(f16, work / f"{size.name}-q8_0.gguf", "q8_0")
    finished = time.perf_counter()

    manifest = {
        "name": size.name,
        "hash": digest,
        "seed": seed,
        "code_version": CODE_VERSION,
        "size": asdict(size),
        "params": sum(p.numel() for p in model.parameters()),
        "vocab": {"tokenizer": len(tokenizer), "model": model.config.vocab_size},
        "train": {"examples": len(examples), "steps": len(losses), "loss": _loss_summary(losses)},
        "format_rate": rates,
        "wall_s": {
            "prepare": round(prepared - started, 2),
            "train": round(trained - prepared, 2),
            "export": round(finished - trained, 2),
            "total": round(finished - started, 2),
        },
        "files": {"hf_dir": "hf", "gguf_f16": f16.name, "gguf_q8_0": q8.name},
    }
    # build.json is the completeness marker, so it is the last file written.
    (work / "build.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def build_tiny(
    size: str = "tiny", seed: int = 0, *, out_root: Path, progress: bool = True
) -> TinyModel:
    """Build (or return the cached) tiny model of ``size`` (a key of `SIZES`) under ``out_root``
    (the settings' `models_dir`)."""
    root = build_root(size, seed, out_root)
    cached = read_build(root)
    if cached is not None:
        return cached
    config = SIZES[size]
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    work = out_root / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        _build_into(work, config, seed, build_hash(config, seed), progress)
        try:
            # Atomic: a reader sees either no directory or a complete build.
            os.rename(work, root)
        except OSError:
            if read_build(root) is None:
                raise
            # Another process finished the same build first; its result is identical.
    finally:
        shutil.rmtree(work, ignore_errors=True)

    built = read_build(root)
    assert built is not None  # build.json is the last file written, and the rename is done
    if progress:
        print(_summary(root, json.loads((root / "build.json").read_text(encoding="utf-8"))))
    return built


def _summary(root: Path, manifest: dict[str, Any]) -> str:
    loss = manifest["train"]["loss"]
    rate = manifest["format_rate"]
    return (
        f"{manifest['name']}: {manifest['params']:,} params, "
        f"{manifest['train']['steps']} steps, loss {loss['first']:.2f} -> {loss['final']:.2f}, "
        f"in-format answers off={rate['off']:.0%} on={rate['on']:.0%}, "
        f"built in {manifest['wall_s']['total']:.0f}s -> {root}"
    )
