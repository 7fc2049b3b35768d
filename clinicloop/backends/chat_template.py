"""Render a model's Jinja chat template (from GGUF metadata or a tokenizer config), as HF does.

Extra `chat_template_kwargs` (e.g. `thinking_mode`) are passed straight to the template.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _raise(message: str) -> None:
    raise TemplateError(message)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template = env.from_string(source)
        self._tokens = {"bos_token": bos_token, "eos_token": eos_token}

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               **kwargs: Any) -> str:
        """The prompt text for `messages`, ending with the assistant generation prompt unless
        `add_generation_prompt` is false."""
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self._tokens,
            **kwargs
        )
