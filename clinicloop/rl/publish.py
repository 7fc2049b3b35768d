"""Turn a trained LoRA adapter into something the llama.cpp engine serves: merge it into the base
HF model (peft), write the merged model as GGUF f16 and quantize it (q8_0 by default).

Merging, rather than shipping a llama.cpp LoRA adapter, keeps serving a plain GGUF: one file per
version, the same load path as the base, and no adapter arithmetic on the hot path. A vLLM
upstream instead loads the adapter directory itself at runtime (`/v1/load_lora_adapter`).
All the work (the merged HF model, both GGUFs) is done in `<out_dir>.part`, next to `out_dir`,
which is renamed into place when complete: a crash never leaves a GGUF that looks complete, and
a killed publish leaves its files in that one directory, which the next publish to `out_dir`
removes before it starts, so nothing is left behind that nobody owns.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
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


def build_dir(final: Path, build: Callable[[Path], object]) -> None:
    """Build a directory as `<final>.part` (removing what a killed build left there first) and
    rename it into place, replacing `final`."""
    part = final.with_name(final.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    build(part)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(part, final)


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
    """Merge, convert and quantize; `out_dir` (replaced whole) receives `hf/`, `model-f16.gguf`
    and `model-<q>.gguf`."""

    def build(work: Path) -> None:
        work.mkdir(parents=True)
        merge_lora(base_hf_dir, adapter_dir, work / "hf")
        write_gguf_f16(work / "hf", work / "model-f16.gguf")
        if quant != "f16":
            quantize_gguf(work / "model-f16.gguf", work / f"model-{quant}.gguf", quant)

    build_dir(out_dir, build)
    return MergedModel(out_dir / "hf", out_dir / "model-f16.gguf",
                       out_dir / f"model-{quant}.gguf")
