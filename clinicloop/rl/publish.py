"""Turn a trained LoRA adapter into a version a backend serves.

By default a version is the adapter on the serving version's base (`publishable_adapter`): the
backend writes what it loads at run time next to the peft directory (for llama.cpp a LoRA GGUF,
about 0.6 MB on the bench model where a merged q8_0 GGUF is 15 MB; a vLLM upstream loads the peft
directory itself), and all versions share the base in memory. The peft directory is kept: the
next refresh goes on training it. As an option (`publishable_gguf`, llama.cpp only) the adapter
is merged into the base HF model (peft), written as GGUF f16 and quantized (q8_0 by default): a
version of its own, with no adapter arithmetic on the hot path but a whole model per version.
Both build in `<out_dir>.part`, next to `out_dir`, which is renamed into place when complete: a
crash never leaves a GGUF that looks complete, and a killed publish leaves its files in that one
directory, which the next publish to `out_dir` removes before it starts, so nothing is left
behind that nobody owns.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clinicloop.backends.kinds import Backend
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


def publishable_adapter(backend: Backend, base_hf_dir: Path, adapter_dir: Path,
                        out_dir: Path) -> Path:
    """Write what `backend` loads as a version's adapter; `out_dir` (replaced whole) receives
    `adapter/` (the peft directory) and, for llama.cpp, `adapter.gguf`. Returns the path a
    version's `lora_path` names."""
    build_dir(out_dir, lambda work: backend.publish_adapter(adapter_dir, base_hf_dir, work))
    return backend.published_adapter(out_dir)
