"""Byte-level BPE tokenizer for the tiny model, trained on the shipped corpus.

The pre-tokenizer is Qwen2's split regex followed by a regex-free ByteLevel step, which is exactly
what llama.cpp runs for a GGUF whose ``tokenizer.ggml.pre`` is ``qwen2``; that is what makes the
Hugging Face and llama.cpp tokenizations of the same text identical. No normalizer, because
llama.cpp applies none.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jinja2 import Template
from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from clinicloop.model.corpus import Dialogue, Message

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

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
# Tool tags are plain added tokens too, as in Qwen2.5: vLLM's hermes tool parser refuses a
# vocabulary without <tool_call>/</tool_call>, and single tokens make the format easy to learn.
TOOL_TOKENS: tuple[str, ...] = (
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"
)
ADDED_TOKENS: tuple[str, ...] = THINK_TOKENS + TOOL_TOKENS

_TAGS = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS + ADDED_TOKENS))

# Qwen2's tokenizer.json split pattern (llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def load_chat_template() -> str:
    return CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")


def training_texts(rows: Iterable[Dialogue]) -> list[str]:
    """The strings BPE merges are learned from: every turn, the reasoning and the role headers
    (and for rows that offer tools, the tool list, calls and results).

    The newlines mirror the assistant target, so that "\n\n" (the empty think block, the gap
    before the answer) is one token: otherwise an empty think block starts with the same token as
    a reasoning one and the model cannot tell 'on' from a skipped thought.
    """
    texts: list[str] = []
    for row in rows:
        if "tools" in row:
            # The tool list, calls and results as the template writes them, cut at the tags.
            rendered = render_chat(row["messages"], add_generation_prompt=False,
                                   tools=row["tools"])
            texts.extend(part for part in _TAGS.split(rendered) if part)
        else:
            texts.extend(f"{m['role']}\n{m['content']}" for m in row["messages"])
        texts.append(f"\n{row['reasoning']}\n")
        texts.append(f"\n\n{row['messages'][-1]['content']}")
    return texts


def tool_argument_words(rows: Iterable[Dialogue]) -> tuple[str, ...]:
    """Every string argument value of the corpus's tool calls (medicines, specialties, days).

    They become whole added tokens, matched wherever they occur, so "warfarin" is one and the same
    token in the question and in the call's JSON (where BPE would split it differently after a
    quote): the tiny model then fills an argument by copying one token from the question.
    """
    words = {
        value
        for row in rows for message in row["messages"] for call in message.get("tool_calls", [])
        for value in call["function"]["arguments"].values() if isinstance(value, str)
    }
    return tuple(sorted(words))


def _bare_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, words: Iterable[str] = ()
                    ) -> PreTrainedTokenizerFast:
    """Train the BPE; ``vocab_size`` counts every token, the added think and tool tags and
    ``words`` (plain added tokens, see `tool_argument_words`) included.

    The result can be smaller than ``vocab_size`` when the corpus runs out of pairs to merge;
    the model pads its embedding instead.
    """
    added = ADDED_TOKENS + tuple(words)
    tok = _bare_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(added),
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    # Here, not at the top: importing transformers' tokenizer class loads torch, which a server
    # that only renders chat templates has no use for.
    from transformers import PreTrainedTokenizerFast

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


def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
           separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' `tojson` filter: plain `json.dumps`, where Jinja's built-in one HTML-escapes
    ``<>&'`` and so would render tools differently from vLLM's `apply_chat_template`."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise TemplateError(message)


def template_environment() -> ImmutableSandboxedEnvironment:
    """A Jinja environment that renders chat templates as transformers' `apply_chat_template`
    does (block trimming, loop controls, its `tojson`, `raise_exception`, `strftime_now`)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@functools.lru_cache(maxsize=4)
def _compiled(template: str) -> Template:
    # Compiling dominates rendering; the training set renders thousands of prompts.
    return template_environment().from_string(template)


def render_chat(
    messages: list[dict[str, Any]] | list[Message],
    add_generation_prompt: bool = True,
    thinking_mode: str = "off",
    template: str | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """Render ``messages`` (and ``tools``, OpenAI shape) with the chat template, as the server
    does."""
    return _compiled(template or load_chat_template()).render(
        messages=messages, add_generation_prompt=add_generation_prompt,
        thinking_mode=thinking_mode, tools=tools,
    )
