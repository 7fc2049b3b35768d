"""Build the tiny Qwen2 chat model offline: tokenizer, CPU training, HF directory and GGUF files.

The model exists so that everything else (serving, verifier, RL, quantization) has a real model to
run without a hub download: it learns the ChatML answer format and the thinking switch of the
shipped corpus, not medicine. A build is cached under ``out_root/<name>-<hash12>/``, keyed by
everything that decides its bytes, and only appears there once complete.
"""

from __future__ import annotations

import hashlib
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

from clinicloop.model.corpus import CORPUS_PATH, Dialogue, Message, load_corpus
from clinicloop.model.gguf_export import quantize_gguf, write_gguf_f16
from clinicloop.model.tokenizer import (
    IM_END,
    IM_START,
    THINK_CLOSE,
    THINK_OPEN,
    load_chat_template,
    render_chat,
    save_tokenizer,
    tool_argument_words,
    train_tokenizer,
    training_texts,
)

# Bump when a change to this package changes what a build produces.
CODE_VERSION = "2"
IGNORE = -100


@dataclass(frozen=True)
class SizeConfig:
    name: str
    # The tokenizer's target size; the embedding has at least this many rows (rounded up to
    # vocab_multiple) even when a small corpus leaves the BPE short of it.
    vocab_size: int
    vocab_multiple: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_positions: int
    steps: int  # the step count, not wall time, ends training so a seed fixes the weights
    batch_size: int
    # Most padded tokens in one batch: a batch of long tool dialogues holds fewer examples, so a
    # step costs about the same whatever the lengths.
    batch_tokens: int
    lr: float
    warmup_steps: int
    # Fixed, since the thread count can change float reductions. The tiny model trains on one
    # thread: its matrices are too small to gain from two, and on a busy machine two threads
    # spin-wait for each other and run several times slower.
    threads: int


SIZES: dict[str, SizeConfig] = {
    # 2200 steps: copying a call's arguments from the question appears only after about 2000
    # (at 1500 every call named the same drug); the answer format is learned far sooner.
    "tiny": SizeConfig(
        name="clinicloop-tiny", vocab_size=1024, vocab_multiple=64, hidden_size=64,
        intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2, max_positions=4096,
        steps=2200, batch_size=16, batch_tokens=2048, lr=5e-3, warmup_steps=30, threads=1,
    ),
    # Every matrix width is a multiple of 256 so llama.cpp's K-quants apply to all of them. Four
    # layers, not eight: on two cores only a model this size sees the corpus about 1.5 times in
    # three minutes, which it needs to learn the answer format.
    "bench": SizeConfig(
        name="clinicloop-tiny-bench", vocab_size=4096, vocab_multiple=256, hidden_size=512,
        intermediate_size=1536, num_layers=4, num_heads=8, num_kv_heads=2, max_positions=4096,
        steps=300, batch_size=8, batch_tokens=1280, lr=2e-3, warmup_steps=10, threads=2,
    ),
    # A draft model for `bench` (speculative decoding): the tokenizer depends only on the corpus
    # and the vocabulary size, so the same size gives the identical vocabulary.
    "bench-draft": SizeConfig(
        name="clinicloop-tiny-bench-draft", vocab_size=4096, vocab_multiple=256, hidden_size=128,
        intermediate_size=512, num_layers=2, num_heads=2, num_kv_heads=1, max_positions=4096,
        steps=600, batch_size=16, batch_tokens=2048, lr=3e-3, warmup_steps=20, threads=1,
    ),
}


@dataclass(frozen=True)
class TinyModel:
    root: Path
    hf_dir: Path
    gguf_f16: Path
    gguf_q8_0: Path
    name: str


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]


def build_hash(size: SizeConfig, seed: int) -> str:
    """Hash of every input that decides a build's bytes; names its cache directory."""
    h = hashlib.sha256()
    for part in (
        CORPUS_PATH.read_bytes(),
        json.dumps(asdict(size), sort_keys=True).encode(),
        str(seed).encode(),
        CODE_VERSION.encode(),
        load_chat_template().encode(),
    ):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


def _call_text(history: list[Message], message: Message, tools: list[dict[str, Any]] | None
               ) -> str:
    """An assistant turn with tool calls as the model writes it: the chat template's rendering
    of that turn, so the calls are in exactly the format the template shows for past turns."""
    before = render_chat(history, add_generation_prompt=False, tools=tools)
    after = render_chat([*history, message], add_generation_prompt=False, tools=tools)
    return after[len(before):].removeprefix(f"{IM_START}assistant\n").removesuffix(f"{IM_END}\n")


def training_targets(row: Dialogue, index: int) -> list[tuple[str, str]]:
    """(prompt, target) pairs for one dialogue: its last assistant turn in every thinking mode,
    and each earlier turn that calls a tool in modes 'off' and 'auto'.

    In 'auto' mode the model writes the think block itself; half the rows teach it to reason and
    half to close the block at once, so both are in its repertoire. A tool call is taught without
    reasoning (in 'auto' the block closes at once), so a call is never inside the think block;
    'on' mode with tools is trained on the answer after the tool result only.
    """
    messages, tools = row["messages"], row.get("tools")
    pairs: list[tuple[str, str]] = []
    for j, message in enumerate(messages):
        if message["role"] != "assistant" or (j < len(messages) - 1
                                               and not message.get("tool_calls")):
            continue
        history = messages[:j]

        def prompt(mode: str, history: list[Message] = history) -> str:
            return render_chat(history, thinking_mode=mode, tools=tools)

        if message.get("tool_calls"):
            call = _call_text(history, message, tools) + IM_END
            pairs += [(prompt("off"), call),
                      (prompt("auto"), f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n{call}")]
            continue
        answer = message["content"] + IM_END
        # The 'on' prompt already ends with "<think>\n", so its target starts at the reasoning.
        reasoning = f"{row['reasoning']}\n{THINK_CLOSE}\n\n"
        auto = (f"{THINK_OPEN}\n{reasoning}" if index % 2 == 0
                else f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n")
        pairs += [(prompt("on"), reasoning + answer), (prompt("off"), answer),
                  (prompt("auto"), auto + answer)]
    return pairs


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


def _tiny_model(root: Path, manifest: dict[str, Any]) -> TinyModel:
    files = manifest["files"]
    return TinyModel(
        root=root,
        hf_dir=root / files["hf_dir"],
        gguf_f16=root / files["gguf_f16"],
        gguf_q8_0=root / files["gguf_q8_0"],
        name=manifest["name"],
    )


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
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    config = SIZES[size]
    digest = build_hash(config, seed)
    out_root = Path(out_root)
    root = out_root / f"{config.name}-{digest[:12]}"
    manifest_path = root / "build.json"
    if manifest_path.is_file():
        return _tiny_model(root, json.loads(manifest_path.read_text(encoding="utf-8")))

    out_root.mkdir(parents=True, exist_ok=True)
    work = out_root / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        _build_into(work, config, seed, digest, progress)
        try:
            # Atomic: a reader sees either no directory or a complete build.
            os.rename(work, root)
        except OSError:
            if not manifest_path.is_file():
                raise
            # Another process finished the same build first; its result is identical.
    finally:
        shutil.rmtree(work, ignore_errors=True)

    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if progress:
        print(_summary(root, manifest))
    return _tiny_model(root, manifest)


def _summary(root: Path, manifest: dict[str, Any]) -> str:
    loss = manifest["train"]["loss"]
    rate = manifest["format_rate"]
    return (
        f"{manifest['name']}: {manifest['params']:,} params, "
        f"{manifest['train']['steps']} steps, loss {loss['first']:.2f} -> {loss['final']:.2f}, "
        f"in-format answers off={rate['off']:.0%} on={rate['on']:.0%}, "
        f"built in {manifest['wall_s']['total']:.0f}s -> {root}"
    )

