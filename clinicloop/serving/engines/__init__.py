"""Engines: one async interface (`base.Engine`), one module per kind."""

from __future__ import annotations

from clinicloop.config import Settings
from clinicloop.serving.engines.base import Engine


def make_engine(settings: Settings) -> Engine:
    """The engine that `settings.engine.kind` names; it is not started yet."""
    if settings.engine.kind == "openai":
        from clinicloop.serving.engines.openai_upstream import OpenAIUpstreamEngine

        return OpenAIUpstreamEngine(settings.engine)
    from clinicloop.serving.engines.llamacpp import LlamaCppEngine

    return LlamaCppEngine(settings.engine, models_dir=settings.models_dir)
