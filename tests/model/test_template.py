"""The ChatML chat template with the thinking switch and Hermes tool calls, rendered by plain
jinja2, by the server's renderer and by transformers alike."""

from __future__ import annotations

import json

import jinja2
import pytest

from clinicloop.backends.chat_template import ChatTemplate
from clinicloop.model.corpus import TOOLS
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


TOOL_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Can I take warfarin with aspirin & book a <GP>?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {
            "name": "check_drug_interaction",
            "arguments": {"drug_a": "warfarin", "drug_b": "aspirin"}}},
        {"id": "call_2", "type": "function", "function": {
            "name": "book_appointment", "arguments": '{"specialty": "general practice"}'}},
    ]},
    {"role": "tool", "content": '{"severity": "major"}', "tool_call_id": "call_1"},
    {"role": "tool", "content": '{"status": "booked"}', "tool_call_id": "call_2"},
    {"role": "assistant", "content": "Checking the day.", "tool_calls": [
        {"id": "call_3", "type": "function", "function": {
            "name": "book_appointment", "arguments": {"day": "Monday"}}}]},
    {"role": "tool", "content": "{}", "tool_call_id": "call_3"},
]
TOOL_HISTORY = (
    "<|im_start|>user\nCan I take warfarin with aspirin & book a <GP>?<|im_end|>\n"
    "<|im_start|>assistant\n<tool_call>\n"
    '{"name": "check_drug_interaction", "arguments": {"drug_a": "warfarin", "drug_b": "aspirin"}}'
    "\n</tool_call>\n<tool_call>\n"
    '{"name": "book_appointment", "arguments": {"specialty": "general practice"}}'
    "\n</tool_call><|im_end|>\n"
    '<|im_start|>user\n<tool_response>\n{"severity": "major"}\n</tool_response>\n'
    '<tool_response>\n{"status": "booked"}\n</tool_response><|im_end|>\n'
    "<|im_start|>assistant\nChecking the day.\n<tool_call>\n"
    '{"name": "book_appointment", "arguments": {"day": "Monday"}}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\n<tool_response>\n{}\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n"
)


def test_tools_calls_and_results_render_in_hermes_format() -> None:
    rendered = render_chat(TOOL_MESSAGES, tools=TOOLS)
    system, _, rest = rendered.partition("<|im_end|>\n")
    assert rest == TOOL_HISTORY
    tool_lines = [json.dumps(tool, ensure_ascii=False) for tool in TOOLS]
    assert system == (
        "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist"
        " with the user query.\n\nYou are provided with function signatures within <tools></tools>"
        " XML tags:\n<tools>\n" + "\n".join(tool_lines) + "\n</tools>\n\nFor each function call,"
        " return a json object with function name and arguments within <tool_call></tool_call>"
        ' XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
        "</tool_call>"
    )


def test_tools_without_a_system_prompt_get_a_default_one() -> None:
    rendered = render_chat(MESSAGES[1:2], tools=TOOLS)
    default = "<|im_start|>system\nYou are a careful medical assistant.\n\n# Tools"
    assert rendered.startswith(default)
    # No tools (absent, None or empty): exactly the plain rendering.
    assert render_chat(MESSAGES, tools=[]) == render_chat(MESSAGES) == HISTORY + (
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_tojson_does_not_html_escape() -> None:
    tools = [{"type": "function", "function": {
        "name": "f", "description": "Dose <5 mg & don't mix — ok", "parameters": {}}}]
    rendered = render_chat(MESSAGES[1:2], tools=tools)
    assert 'Dose <5 mg & don\'t mix — ok' in rendered


def test_server_training_and_transformers_render_the_same_bytes() -> None:
    # vLLM renders with transformers' apply_chat_template, llama.cpp serving with ChatTemplate,
    # training with render_chat: a model trained on one must be prompted identically by all.
    tokenizer = train_tokenizer(["hello world"], 300)
    tools = [*TOOLS, {"type": "function", "function": {
        "name": "note", "description": "Save <b>'notes'</b> & more: naïve", "parameters": {}}}]
    server = ChatTemplate(load_chat_template())
    for messages in (TOOL_MESSAGES, MESSAGES):
        for mode in ("on", "off", "auto"):
            expected = tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=True,
                thinking_mode=mode)
            assert render_chat(messages, thinking_mode=mode, tools=tools) == expected
            assert server.render(messages, tools=tools, thinking_mode=mode) == expected
