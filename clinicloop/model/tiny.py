"""The tiny Qwen2 chat models: their sizes, the inputs that decide a build, where a build is cached,
and the training targets the corpus gives. Building one (tokenizer, CPU training, HF directory
and GGUF files) is `tiny_train.py`; this module loads no torch, so a server that only looks up a
cached build stays light.

The model exists so that everything else (serving, verifier, RL, quantization) has a real model to
run without a hub download: it learns the ChatML answer format and the thinking switch of the
shipped corpus, not medicine. A build is cached under ``out_root/<name>-<hash12>/``, keyed by
everything that decides its bytes, and only appears there once complete.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from clinicloop.model.corpus import CORPUS_PATH, Dialogue, Message
from clinicloop.model.tokenizer import (
    IM_END,
    IM_START,
    THINK_CLOSE,
    THINK_OPEN,
    load_chat_template,
    render_chat,
)

# Bump when a change to this package changes what a build produces.
CODE_VERSION = "2"


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


def build_root(size: str, seed: int, out_root: Path) -> Path:
    """Where the build of ``size`` (a key of `SIZES`) with ``seed`` is cached under ``out_root``
    (the settings' `models_dir`)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    config = SIZES[size]
    return Path(out_root) / f"{config.name}-{build_hash(config, seed)[:12]}"


def read_build(root: Path) -> TinyModel | None:
    """The complete build at ``root``, or None when there is none (its `build.json`, written
    last, is the completeness marker)."""
    manifest_path = root / "build.json"
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    files = manifest["files"]
    return TinyModel(
        root=root,
        hf_dir=root / files["hf_dir"],
        gguf_f16=root / files["gguf_f16"],
        gguf_q8_0=root / files["gguf_q8_0"],
        name=manifest["name"],
    )


def find_tiny(size: str = "tiny", seed: int = 0, *, out_root: Path) -> TinyModel | None:
    """The cached build of ``size``, or None when there is none (`tiny_train.build_tiny` makes
    one)."""
    return read_build(build_root(size, seed, out_root))
