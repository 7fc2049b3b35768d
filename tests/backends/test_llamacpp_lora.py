"""Versions that differ by a LoRA share one loaded base on the in-process engine: an adapter
engine started on another engine's base applies its adapter at runtime to a context of its own
(the greedy output and logprobs of llama.cpp's own `Llama(model, lora_path=...)`), adds far less
than a base to the process memory, and closing engines frees the weights only with the last one.

The test adapter (conftest's `bench_lora`: random B, std 0.05) shifts every logprob but seldom
the greedy choice, so "the adapter is applied" is asserted on logprobs, not on the text."""

from __future__ import annotations

import asyncio
from pathlib import Path

import llama_cpp
import pytest

from clinicloop.backends.base import Delta, EngineUnavailable, SamplingParams
from clinicloop.backends.llamacpp import LlamaCppEngine
from clinicloop.config import EngineSettings

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, top_logprobs=0)
MESSAGES = [{"role": "user", "content": "I have had a sore throat and a fever since yesterday."}]
#: A small KV cache, so that what an adapter engine adds is dominated by what is shared or not.
Completion = tuple[str, list[float]]
SMALL = {"n_ctx": 256, "n_parallel": 2, "prefix_cache_slots": 0, "n_batch": 64}


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


async def complete(engine: LlamaCppEngine, prompt: str) -> tuple[str, list[float]]:
    """The greedy completion and the logprob of each of its tokens."""
    deltas = [event async for event in engine.complete(prompt, GREEDY)
              if isinstance(event, Delta)]
    return ("".join(d.content for d in deltas),
            [lp.logprob for d in deltas for lp in d.logprobs])


def test_an_adapter_engine_on_a_shared_base_serves_the_adapted_model(bench, bench_lora, tmp_path):
    settings = EngineSettings(model_path=bench.gguf_q8_0, **SMALL)

    async def main() -> tuple[str, Completion, Completion, Completion]:
        first = LlamaCppEngine(settings, tmp_path)
        await first.start()
        base = first.base
        assert base is not None and base.refs == 1
        prompt = base.template.render(MESSAGES)
        adapted = LlamaCppEngine(settings.model_copy(update={"lora_path": bench_lora.gguf}),
                                 tmp_path, base=base)
        await adapted.start()
        assert adapted.base is base and base.refs == 2
        assert adapted.model_version.startswith(f"{base.version}+adapter@")
        plain, lora = await asyncio.gather(complete(first, prompt), complete(adapted, prompt))
        await first.close()  # the adapter engine still holds the weights
        assert base.refs == 1 and first.base is None
        after = await complete(adapted, prompt)
        await adapted.close()
        assert base.refs == 0
        with pytest.raises(EngineUnavailable):
            base.share()
        return prompt, plain, lora, after

    prompt, plain, lora, after = asyncio.run(main())
    old_way = llama_cpp.Llama(model_path=str(bench.gguf_q8_0), lora_path=str(bench_lora.gguf),
                              n_ctx=256, n_threads=1, logits_all=True,
                              verbose=False)
    try:
        choice = old_way.create_completion(prompt, max_tokens=GREEDY.max_tokens,
                                           temperature=0.0, logprobs=0)["choices"][0]
    finally:
        old_way.close()
    assert lora[0] == choice["text"] == after[0]
    assert lora[1] == pytest.approx(choice["logprobs"]["token_logprobs"], abs=1e-3)
    assert lora[1] == pytest.approx(after[1], abs=1e-4)  # the first engine's close left it whole
    # The adapter is applied: its tokens' probabilities are not the base's.
    assert max(abs(a - b) for a, b in zip(lora[1], plain[1], strict=False)) > 0.05


def test_two_adapter_versions_on_one_base_add_less_than_a_base(bench, bench_lora, tmp_path):
    """Each adapter engine adds its adapter (0.6 MB), a 1 MiB KV cache, compute buffers and a
    thread (about 5.7 MB measured); a second copy of the weights would add the base file (the f16
    one here, 28 MB) at least."""
    settings = EngineSettings(model_path=bench.gguf_f16, **SMALL)
    adapter = settings.model_copy(update={"lora_path": bench_lora.gguf})

    async def main() -> tuple[int, int]:
        first = LlamaCppEngine(settings, tmp_path)
        await first.start()
        prompt = first.base.template.render(MESSAGES)
        await complete(first, prompt)  # every weight page touched
        before = rss()
        engines = [LlamaCppEngine(adapter, tmp_path, base=first.base) for _ in range(2)]
        for engine in engines:
            await engine.start()
            await complete(engine, prompt)
        added = rss() - before
        assert all(engine.base is first.base for engine in engines)
        for engine in [*engines, first]:
            await engine.close()
        return added, Path(bench.gguf_f16).stat().st_size

    added, base_size = asyncio.run(main())
    assert added < base_size, (added, base_size)
