"""Byte-level BPE tokenizer for the tiny model, trained on the shipped corpus.

The pre-tokenizer is Qwen2's split regex followed by a regex-free ByteLevel step, which is exactly
what llama.cpp runs for a GGUF whose ``tokenizer.ggml.pre`` is ``qwen2``; that is what makes the
Hugging Face and llama.cpp tokenizations of the same text identical. No normalizer, because
llama.cpp applies none.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path

from jinja2 import Template
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from clinicloop.model.corpus import Dialogue, Message

CHAT_TEMPLATE_PATH = Path(__file__).parent / "chat_template.jinja"

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# Control tokens: never produced from plain text by llama.cpp unless special parsing is on.
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END)
# Think tags are plain added tokens, as in Qwen3: single tokens that still appear in decoded text,
# so the server can split reasoning at "</think>" from llama.cpp's output.
THINK_TOKENS: tuple[str, ...] = (THINK_OPEN, THINK_CLOSE)

# Qwen2's tokenizer.json split pattern (llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def load_chat_template() -> str:
    return CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")


def training_texts(rows: Iterable[Dialogue]) -> list[str]:
    """The strings BPE merges are learned from: every turn, the reasoning and the role headers.

    The newlines mirror the assistant target, so that "\n\n" (the empty think block, the gap
    before the answer) is one token: otherwise an empty think block starts with the same token as
    a reasoning one and the model cannot tell 'on' from a skipped thought.
    """
    texts: list[str] = []
    for row in rows:
        texts.extend(f"{m['role']}\n{m['content']}" for m in row["messages"])
        texts.append(f"\n{row['reasoning']}\n")
        texts.append(f"\n\n{row['messages'][-1]['content']}")
    return texts


def _bare_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train the BPE; ``vocab_size`` counts every token, the added think tags included.

    The result can be smaller than ``vocab_size`` when the corpus runs out of pairs to merge;
    the model pads its embedding instead.
    """
    tok = _bare_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(THINK_TOKENS),
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        chat_template=load_chat_template(),
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """Save tokenizer.json and a tokenizer_config.json that carries the chat template."""
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # transformers 5 writes its internal backend name; this one also loads in transformers 4.
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["add_bos_token"] = False
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    config_path.write_text(text, encoding="utf-8")


@functools.lru_cache(maxsize=4)
def _compiled(template: str) -> Template:
    # Compiling dominates rendering; the training set renders thousands of prompts.
    return ImmutableSandboxedEnvironment().from_string(template)


def render_chat(
    messages: list[dict[str, str]] | list[Message],
    add_generation_prompt: bool = True,
    thinking_mode: str = "off",
    template: str | None = None,
) -> str:
    """Render ``messages`` with the chat template through plain jinja2, as the server does."""
    return _compiled(template or load_chat_template()).render(
        messages=messages, add_generation_prompt=add_generation_prompt, thinking_mode=thinking_mode
    )
