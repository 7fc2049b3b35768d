"""The ChatML chat template with the thinking switch, rendered by plain jinja2 like the server."""

from __future__ import annotations

import jinja2
import pytest

from clinicloop.model.tokenizer import load_chat_template, render_chat, train_tokenizer

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "I have a cough."},
    {"role": "assistant", "content": "<think>\nViral.\n</think>\n\nRest and drink fluids."},
    {"role": "user", "content": "How long will it last?"},
]
HISTORY = (
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\nI have a cough.<|im_end|>\n"
    "<|im_start|>assistant\nRest and drink fluids.<|im_end|>\n"
    "<|im_start|>user\nHow long will it last?<|im_end|>\n"
)


def _render(**kwargs: object) -> str:
    env = jinja2.Environment()
    return env.from_string(load_chat_template()).render(messages=MESSAGES, **kwargs)


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [
        ("on", "<|im_start|>assistant\n<think>\n"),
        ("off", "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
        ("auto", "<|im_start|>assistant\n"),
    ],
)
def test_generation_prompt_per_thinking_mode(mode: str, suffix: str) -> None:
    assert _render(add_generation_prompt=True, thinking_mode=mode) == HISTORY + suffix
    assert render_chat(MESSAGES, thinking_mode=mode) == HISTORY + suffix


def test_thinking_defaults_to_off() -> None:
    assert _render(add_generation_prompt=True) == (
        HISTORY + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_without_generation_prompt_only_the_history() -> None:
    assert _render() == HISTORY
    assert _render(add_generation_prompt=False, thinking_mode="on") == HISTORY


def test_null_content_renders_empty() -> None:
    out = jinja2.Environment().from_string(load_chat_template()).render(
        messages=[{"role": "assistant", "content": None}]
    )
    assert out == "<|im_start|>assistant\n<|im_end|>\n"


def test_hf_apply_chat_template_matches() -> None:
    tokenizer = train_tokenizer(["hello world"], 300)
    for mode in ("on", "off", "auto"):
        rendered = tokenizer.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=True, thinking_mode=mode
        )
        assert rendered == render_chat(MESSAGES, thinking_mode=mode)


def test_same_output_with_block_trimming() -> None:
    # llama-cpp-python and transformers render chat templates with trim/lstrip_blocks on.
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    for mode in ("on", "off", "auto"):
        rendered = env.from_string(load_chat_template()).render(
            messages=MESSAGES, add_generation_prompt=True, thinking_mode=mode
        )
        assert rendered == render_chat(MESSAGES, thinking_mode=mode)
