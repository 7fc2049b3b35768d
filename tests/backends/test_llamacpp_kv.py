"""KV-cache types on the in-process engine: a q8_0 cache serves (on the bench model, greedy output
as with f16), takes the memory llama.cpp reports and `kv_cache_bytes` predicts (34/64 of f16), and
a combination llama.cpp cannot run is refused with the setting named."""

from __future__ import annotations

import asyncio
import ctypes
import re

import llama_cpp
import llama_cpp._logger
import pytest

from clinicloop.backends.base import Delta, SamplingParams
from clinicloop.backends.llamacpp import LlamaCppEngine
from clinicloop.config import EngineSettings
from clinicloop.model.corpus import load_corpus

GREEDY = SamplingParams(max_tokens=32, temperature=0.0)
KV_LINE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB")


def serve(model_path, tmp_path, **settings) -> tuple[list[str], int, float]:
    """Greedy replies to ten corpus questions, `kv_cache_bytes`, and the KV size in MiB that
    llama.cpp logs when it creates the context."""
    logged: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, _: object) -> None:
        logged.append(text.decode("utf-8", "replace"))

    questions = [[m for m in d["messages"] if m["role"] == "user"][:1]
                 for d in load_corpus()[:60:6]]

    async def main() -> tuple[list[str], int]:
        engine = LlamaCppEngine(EngineSettings(model_path=model_path, n_parallel=4,
                                               prefix_cache_slots=0, **settings), tmp_path)
        llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
        try:
            await engine.start()
        finally:
            llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))
        try:
            replies = []
            for messages in questions:
                replies.append("".join([e.content async for e in engine.chat(messages, GREEDY, {})
                                        if isinstance(e, Delta)]))
            return replies, engine.kv_cache_bytes()
        finally:
            await engine.close()

    replies, predicted = asyncio.run(main())
    sizes = [float(m.group(1)) for line in logged if (m := KV_LINE.search(line))]
    # The first is `Llama`'s own 64-token context; the engine decodes on the one it opens after.
    assert len(sizes) == 2, logged
    return replies, predicted, sizes[1]


def test_a_q8_0_cache_serves_in_about_half_the_memory(bench, tmp_path):
    f16, f16_bytes, f16_mib = serve(bench.gguf_q8_0, tmp_path, flash_attn=True)
    q8, q8_bytes, q8_mib = serve(bench.gguf_q8_0, tmp_path, flash_attn=True, cache_type_k="q8_0",
                                 cache_type_v="q8_0")
    assert f16_bytes == pytest.approx(f16_mib * 2**20, abs=0.01 * 2**20)
    assert q8_bytes == pytest.approx(q8_mib * 2**20, abs=0.01 * 2**20)
    assert q8_bytes * 64 == f16_bytes * 34  # 34 bytes per 32 values instead of 2 per value
    # 8 bits and a scale per 32 values move the logits by less than the gap between the two best
    # tokens almost everywhere: measured, 9 of the 10 replies are the same 32 tokens and the
    # tenth parts after 47 characters. A broken cache (wrong type, garbage) parts at once.
    assert all(q8)
    assert sum(a == b for a, b in zip(q8, f16, strict=True)) >= 8
    assert all(a[:16] == b[:16] for a, b in zip(q8, f16, strict=True))


def test_a_quantized_v_cache_without_flash_attention_is_refused_before_loading(bench, tmp_path):
    engine = LlamaCppEngine(EngineSettings(model_path=bench.gguf_q8_0, cache_type_v="q8_0"),
                            tmp_path)
    with pytest.raises(ValueError, match=r"cache_type_v=q8_0 needs engine\.flash_attn=true"):
        asyncio.run(engine.start())
    assert engine.base is None


def test_a_cache_type_the_model_cannot_hold_names_the_setting(tiny_model, tmp_path):
    """The tiny model's head dim is 16; llama.cpp's flash attention needs a q8_0 cache's head dim
    to be a multiple of its 32-value block."""
    engine = LlamaCppEngine(EngineSettings(model_path=tiny_model.gguf_q8_0, cache_type_k="q8_0",
                                           flash_attn=True), tmp_path)

    async def main() -> None:
        try:
            await engine.start()
        finally:
            await engine.close()

    with pytest.raises(ValueError, match=r"cache_type_k=q8_0.*this model's: 16\)"):
        asyncio.run(main())
    assert engine.base is None  # the model it loaded was freed
