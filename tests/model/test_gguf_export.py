"""A peft LoRA adapter written as a llama.cpp LoRA GGUF: llama.cpp applies it on its base as peft's
merge does (plain and rsLoRA scaling), refuses it on another base, and options llama.cpp cannot
express are refused when writing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from llama_cpp import Llama
from peft import PeftModel
from transformers import AutoModelForCausalLM

from clinicloop.model.checkpoint import save_checkpoint
from clinicloop.model.gguf_export import write_gguf_f16, write_lora_gguf

PROMPT = b"<|im_start|>user\nI have had a cough and a fever for two days.<|im_end|>\n"


def _logits(gguf: Path, lora: Path | None = None) -> np.ndarray:
    llama = Llama(model_path=str(gguf), lora_path=lora and str(lora), n_ctx=128, n_threads=1,
                  logits_all=True, verbose=False)
    tokens = llama.tokenize(PROMPT, add_bos=False, special=True)
    llama.eval(tokens)
    out = np.array(llama.scores[: len(tokens)])
    llama.close()
    return out


def _adapter_copy(adapter_dir: Path, out: Path, **config: object) -> Path:
    shutil.copytree(adapter_dir, out)
    path = out / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return out


@pytest.mark.parametrize("rslora", [False, True])
def test_llama_cpp_applies_the_adapter_as_peft_merges_it(bench, bench_lora, tmp_path, rslora):
    adapter = _adapter_copy(bench_lora.adapter_dir, tmp_path / "adapter", use_rslora=rslora)
    gguf = write_lora_gguf(adapter, bench.hf_dir, tmp_path / "adapter.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "adapter.gguf"]
    base = AutoModelForCausalLM.from_pretrained(bench.hf_dir)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    save_checkpoint(merged, bench.hf_dir, tmp_path / "merged")
    merged_gguf = write_gguf_f16(tmp_path / "merged", tmp_path / "merged.gguf")

    with_adapter, expected = _logits(bench.gguf_f16, gguf), _logits(merged_gguf)
    # f16 rounding of W, A and B apart vs of W + scale * B @ A: measured 0.003 and 0.004.
    assert np.abs(with_adapter - expected).max() < 0.02
    # ... while the adapter moves them by far more (measured 0.9 and 2.5).
    assert np.abs(_logits(bench.gguf_f16) - expected).max() > 0.3


def test_llama_cpp_refuses_the_adapter_on_another_base(bench, bench_lora, tiny_model):
    def init(base: Path) -> bool:
        model = llama_cpp.llama_model_load_from_file(str(base).encode(),
                                                     llama_cpp.llama_model_default_params())
        try:
            # NULL when refused. (llama-cpp-python's `Llama(lora_path=...)` compares the NULL
            # pointer with None and goes on as if loaded, so ask llama.cpp directly.)
            adapter = llama_cpp.llama_adapter_lora_init(model, str(bench_lora.gguf).encode())
            if adapter:
                llama_cpp.llama_adapter_lora_free(adapter)
            return bool(adapter)
        finally:
            llama_cpp.llama_model_free(model)

    assert init(bench.gguf_f16)
    assert not init(tiny_model.gguf_f16)


@pytest.mark.parametrize(("option", "message"), [
    ({"use_dora": True}, "use_dora"), ({"alpha_pattern": {"q_proj": 32}}, "alpha_pattern"),
    ({"peft_type": "IA3"}, "not LoRA")])
def test_options_llama_cpp_cannot_express_are_refused(bench, bench_lora, tmp_path, option,
                                                      message):
    adapter = _adapter_copy(bench_lora.adapter_dir, tmp_path / "adapter", **option)
    with pytest.raises(ValueError, match=message):
        write_lora_gguf(adapter, bench.hf_dir, tmp_path / "adapter.gguf")
    assert list(tmp_path.iterdir()) == [adapter]
