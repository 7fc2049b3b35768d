"""What a model version's files must be before the server registers them.

The admin API refuses, with the reason, files no engine could serve: a GGUF must be a regular
file that begins with the GGUF magic and a version llama.cpp reads, and llama.cpp itself must load
it (header, metadata, every tensor within the file, the vocabulary, a chat template); a llama.cpp
LoRA must apply to its base; a peft adapter directory must hold an `adapter_config.json` that is a
LoRA config and weights whose safetensors header is whole.

The llama.cpp load runs in a child process (`python -m clinicloop.backends.artifacts`), loading
the vocabulary only for a whole model, or the base's weights memory-mapped on the CPU for a LoRA:
a file that crashes llama.cpp's parser crashes the child, never the server, and no GPU memory is
taken from the version that is serving.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import struct
import sys
from pathlib import Path
from typing import Any

from clinicloop.backends.registry import RegistryError

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
PROBE_TIMEOUT_S = 300.0


class VersionFilesError(RegistryError):
    """A version's files are not a model or adapter an engine can load."""


def check_gguf_file(path: Path, what: str = "GGUF") -> None:
    """A regular file with a GGUF header llama.cpp reads; `VersionFilesError` naming the
    problem otherwise."""
    if path.is_dir():
        raise VersionFilesError(f"{what} {path} is a directory, not a GGUF file")
    if not path.is_file():
        raise VersionFilesError(f"{what} {path}: file not found")
    with path.open("rb") as f:
        head = f.read(8)
    if head[:4] != GGUF_MAGIC:
        raise VersionFilesError(f"{what} {path} is not a GGUF file (it begins with "
                                f"{head[:4]!r}, not {GGUF_MAGIC!r})")
    if len(head) < 8:
        raise VersionFilesError(f"{what} {path} is truncated ({len(head)} bytes)")
    version = struct.unpack("<I", head[4:8])[0]
    if version not in GGUF_VERSIONS:
        raise VersionFilesError(f"{what} {path} has GGUF version {version}; llama.cpp reads "
                                f"{' and '.join(map(str, GGUF_VERSIONS))}")


def check_peft_adapter(directory: Path) -> None:
    """A peft LoRA adapter directory: its config and its weights' header are whole."""
    if not directory.is_dir():
        raise VersionFilesError(f"adapter {directory} is not a directory")
    config_path = directory / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VersionFilesError(f"adapter {directory} has no adapter_config.json") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VersionFilesError(f"{config_path} is not JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise VersionFilesError(f"{config_path} is not a LoRA config (peft_type "
                                f"{config.get('peft_type') if isinstance(config, dict) else None!r}"
                                ", expected 'LORA')")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise VersionFilesError(f"{config_path}: rank `r` must be a positive integer, not {rank!r}")
    if not config.get("target_modules"):
        raise VersionFilesError(f"{config_path} names no target_modules")
    weights = directory / "adapter_model.safetensors"
    if weights.is_file():
        _check_safetensors(weights)
    elif not (directory / "adapter_model.bin").is_file():
        raise VersionFilesError(f"adapter {directory} has no adapter_model.safetensors or "
                                "adapter_model.bin")


def _check_safetensors(path: Path) -> None:
    """The header (an 8-byte length, then JSON) parses and every tensor lies within the file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        length = struct.unpack("<Q", raw)[0] if len(raw) == 8 else size
        if length > size - 8:
            raise VersionFilesError(f"{path} is truncated: its header claims {length} bytes, the "
                                    f"file has {size}")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise VersionFilesError(f"{path} has no safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise VersionFilesError(f"{path} has no safetensors header")
    data = size - 8 - length
    for name, tensor in header.items():
        try:
            end = None if name == "__metadata__" else int(tensor["data_offsets"][1])
        except (KeyError, TypeError, IndexError, ValueError):
            raise VersionFilesError(f"{path}: tensor {name} has no data_offsets") from None
        if end is not None and end > data:
            raise VersionFilesError(f"{path} is truncated: tensor {name} ends past the file")


async def probe_llamacpp(model_path: Path, lora_path: Path | None = None,
                         timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """llama.cpp loads `model_path` (and applies the LoRA GGUF `lora_path` to it) in a child
    process; `VersionFilesError` with llama.cpp's own reason if it does not."""
    argv = [str(model_path)] + ([] if lora_path is None else [str(lora_path)])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "clinicloop.backends.artifacts", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise VersionFilesError(f"llama.cpp did not finish loading {model_path} within "
                                f"{timeout_s:.0f}s") from None
    subject = model_path if lora_path is None else lora_path
    if proc.returncode != 0:
        raise VersionFilesError(f"llama.cpp crashed loading {subject} (exit {proc.returncode})")
    error = json.loads(out.decode().splitlines()[-1])["error"]
    if error is not None:
        raise VersionFilesError(error)


def _probe(model_path: str, lora_path: str | None) -> str | None:
    """Load as the engine would; the reason it fails, from llama.cpp's log, or None."""
    import llama_cpp

    errors: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, _: Any) -> None:
        if level == 4:  # GGML_LOG_LEVEL_ERROR; lines are "function: message"
            line = text.decode("utf-8", "replace").strip().split(": ", 1)[-1]
            if line and line != "failed to load model":  # the generic last word
                errors.append(line)

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    params.vocab_only = lora_path is None  # a LoRA is checked against the base's tensors

    def reason(default: str) -> str:
        return f"{default}: {'; '.join(errors)}" if errors else default

    model = llama_cpp.llama_model_load_from_file(model_path.encode(), params)
    if not model:
        return reason(f"llama.cpp cannot load {model_path}")
    try:
        if lora_path is not None:
            adapter = llama_cpp.llama_adapter_lora_init(model, lora_path.encode())
            if not adapter:
                return reason(f"llama.cpp cannot apply the LoRA {lora_path} to {model_path}")
            return None
        buf = ctypes.create_string_buffer(1)
        if llama_cpp.llama_model_meta_val_str(model, b"tokenizer.chat_template", buf, 1) < 0:
            return f"{model_path} has no tokenizer.chat_template in its GGUF metadata"
        return None
    finally:
        llama_cpp.llama_model_free(model)


if __name__ == "__main__":
    print(json.dumps({"error": _probe(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)}))
