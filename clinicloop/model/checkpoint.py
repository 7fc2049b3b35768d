"""Writing a derived HF checkpoint (a merged LoRA, a quantized model) next to its source.

The source's own tokenizer and generation files are copied rather than re-saved, so the new
checkpoint tokenizes exactly as the source does in any transformers version (vLLM's included).
The directory is written under a temporary name and renamed, so a reader never sees a
half-written checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


def safetensors_bytes(folder: Path) -> int:
    """Weight bytes of a checkpoint directory: its safetensors files."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def save_checkpoint(model: Any, source_dir: Path, out_dir: Path, **save_kwargs: Any) -> Path:
    """`model.save_pretrained` into `out_dir` (replaced whole), with `source_dir`'s tokenizer."""
    part = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(part, ignore_errors=True)
    model.save_pretrained(part, **save_kwargs)
    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, part / name)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(part, out_dir)
    return out_dir
