"""Render a model's Jinja chat template (from GGUF metadata or a tokenizer config), as HF does.

The environment is the training renderer's (`clinicloop.model.tokenizer.template_environment`), so
the server, training and transformers' `apply_chat_template` (vLLM) produce the same bytes. Extra
`chat_template_kwargs` (e.g. `thinking_mode`) are passed straight to the template.
"""

from __future__ import annotations

from typing import Any

from clinicloop.model.tokenizer import template_environment


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        self._template = template_environment().from_string(source)
        self._tokens = {"bos_token": bos_token, "eos_token": eos_token}

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, **kwargs: Any) -> str:
        """The prompt text for `messages` (and `tools`, OpenAI shape, listed for the model),
        ending with the assistant generation prompt unless `add_generation_prompt` is false."""
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
            **self._tokens, **kwargs
        )
