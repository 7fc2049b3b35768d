"""The byte-level BPE: lossless, single-token specials, and the same tokens as llama.cpp."""

from __future__ import annotations

import pytest
from llama_cpp import Llama
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from clinicloop.model.corpus import load_corpus
from clinicloop.model.tiny import TinyModel
from clinicloop.model.tokenizer import (
    ADDED_TOKENS,
    IM_END,
    SPECIAL_TOKENS,
    render_chat,
    tool_argument_words,
    train_tokenizer,
    training_texts,
)

ODD_TEXTS = [
    "Hello   world!\n\n\t 123456 don't I'LL we'Re",
    "  leading spaces and trailing  ",
    "accents: naïve café, 日本語, emoji 🎉",
    "<think>\n\n</think>\n\nnot special: <|im_start> <think",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    rows = load_corpus()
    return train_tokenizer(training_texts(rows), 1024, tool_argument_words(rows))


def _sample_texts() -> list[str]:
    rows = load_corpus()[::5]
    texts = [render_chat(r["messages"], add_generation_prompt=False, tools=r.get("tools"))
             for r in rows]
    texts += [
        render_chat(r["messages"][:-1], thinking_mode="on", tools=r.get("tools"))
        + f"{r['reasoning']}\n</think>\n\n"
        + r["messages"][-1]["content"] + IM_END
        for r in rows
    ]
    return texts + ODD_TEXTS


def test_vocab_and_special_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    assert len(tokenizer) <= 1024
    assert tokenizer.eos_token == IM_END
    assert tokenizer.pad_token == "<|endoftext|>"
    for token in SPECIAL_TOKENS + ADDED_TOKENS:
        assert len(tokenizer(token)["input_ids"]) == 1, token
    # vLLM's hermes parser looks the tool tags up in the vocabulary; they decode as text.
    assert {"<tool_call>", "</tool_call>"} <= set(tokenizer.get_vocab())
    ids = tokenizer("<tool_call>\n{}\n</tool_call>")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<tool_call>\n{}\n</tool_call>"
    # A call's argument is the very token the question used, so the model can copy it.
    question = tokenizer.tokenize("Can I take warfarin with aspirin on Monday?")
    call = tokenizer.tokenize('{"drug_a": "warfarin", "drug_b": "aspirin", "day": "Monday"}')
    assert {"warfarin", "aspirin", "Monday"} <= set(question) & set(call)
    # An empty think block and a reasoning one must differ from the first token after <think>.
    assert tokenizer.tokenize("<think>\n\n</think>\n\n")[1] == "ĊĊ"


def test_full_vocabulary_without_extra_words() -> None:
    assert len(train_tokenizer(training_texts(load_corpus()), 1024)) == 1024


@pytest.mark.parametrize("text", _sample_texts()[::10] + ODD_TEXTS)
def test_round_trip(tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_training_is_deterministic() -> None:
    texts = training_texts(load_corpus())
    first = train_tokenizer(texts, 1024).backend_tokenizer.to_str()
    assert train_tokenizer(texts, 1024).backend_tokenizer.to_str() == first


def test_saved_tokenizer_loads_with_template(tiny_model: TinyModel) -> None:
    loaded = AutoTokenizer.from_pretrained(tiny_model.hf_dir)
    assert loaded.eos_token == IM_END
    assert loaded.chat_template and "thinking_mode" in loaded.chat_template


def test_llama_cpp_tokenizes_identically(tiny_model: TinyModel) -> None:
    hf = AutoTokenizer.from_pretrained(tiny_model.hf_dir)
    vocab = Llama(model_path=str(tiny_model.gguf_f16), vocab_only=True, verbose=False)
    for text in _sample_texts():
        expected = hf(text)["input_ids"]
        assert vocab.tokenize(text.encode(), add_bos=False, special=True) == expected, text
        assert vocab.detokenize(expected, special=True).decode() == text
