"""Turn a trained LoRA adapter into something the llama.cpp engine serves: merge it into the base
HF model (peft), write the merged model as GGUF f16 and quantize it (q8_0 by default).

Merging, rather than shipping a llama.cpp LoRA adapter, keeps serving a plain GGUF: one file per
version, the same load path as the base, and no adapter arithmetic on the hot path. A vLLM
upstream instead loads the adapter directory itself at runtime (`/v1/load_lora_adapter`).
Every output is written under a temporary name and renamed, so a crash never leaves a GGUF that
looks complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clinicloop.model.checkpoint import save_checkpoint
from clinicloop.model.gguf_export import quantize_gguf, write_gguf_f16
from clinicloop.rl.grpo import quiet_deprecations


@dataclass(frozen=True)
class MergedModel:
    hf_dir: Path
    gguf_f16: Path
    gguf: Path  # the quantized file a version serves


def merge_lora(base_hf_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """The base model with the adapter folded into its weights, saved as a HF directory."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    quiet_deprecations()
    base = AutoModelForCausalLM.from_pretrained(base_hf_dir)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return save_checkpoint(merged, base_hf_dir, out_dir)


def publishable_gguf(base_hf_dir: Path, adapter_dir: Path, out_dir: Path,
                     quant: str = "q8_0") -> MergedModel:
    """Merge, convert and quantize; `out_dir` receives `hf/`, `model-f16.gguf`, `model-<q>.gguf`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_dir = merge_lora(base_hf_dir, adapter_dir, out_dir / "hf")
    f16 = write_gguf_f16(hf_dir, out_dir / "model-f16.gguf")
    quantized = f16 if quant == "f16" else quantize_gguf(f16, out_dir / f"model-{quant}.gguf",
                                                          quant)
    return MergedModel(hf_dir, f16, quantized)
