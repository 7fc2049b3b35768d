"""Hugging Face Qwen2 directory -> GGUF (f16) for llama.cpp, a peft LoRA adapter directory ->
llama.cpp LoRA adapter GGUF, and GGUF -> quantized GGUF.

Both GGUFs are written directly with ``gguf.GGUFWriter`` (no llama.cpp checkout or convert
script needed), with the same tensor names; quantization goes through llama.cpp's own
``llama_model_quantize`` so every quantization type llama.cpp knows is available by name.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors.numpy import load_file


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _vocab(hf_dir: Path, vocab_size: int) -> tuple[list[str], list[int], list[str], dict[str, int]]:
    """Tokens by id, their GGUF token types, the BPE merges and the id of every token text."""
    tok = _read_json(hf_dir / "tokenizer.json")
    ids: dict[str, int] = dict(tok["model"]["vocab"])
    types: dict[int, int] = {}
    for added in tok["added_tokens"]:
        ids[added["content"]] = added["id"]
        # As convert_hf_to_gguf does: special added tokens are control tokens (hidden when
        # detokenizing), the others user-defined (always rendered, e.g. the think tags).
        special = added["special"]
        types[added["id"]] = int(
            gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
        )
    by_id = {i: text for text, i in ids.items()}
    tokens: list[str] = []
    token_types: list[int] = []
    for i in range(vocab_size):
        # Embedding rows past the tokenizer's vocabulary (padding to a friendly width) still
        # need a token entry; llama.cpp never emits UNUSED tokens.
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        default = gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED
        token_types.append(types.get(i, int(default)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    return tokens, token_types, merges, ids


def write_gguf_f16(hf_dir: Path, out_path: Path, name: str | None = None) -> Path:
    """Write ``hf_dir`` (a saved ``Qwen2ForCausalLM`` + tokenizer) as a GGUF with f16 matrices.

    Norm weights and biases stay f32, as llama.cpp's converter keeps them.
    """
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    config = _read_json(hf_dir / "config.json")
    tok_config = _read_json(hf_dir / "tokenizer_config.json")
    n_layers = int(config["num_hidden_layers"])
    rope = config.get("rope_parameters") or {}
    rope_theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    tokens, token_types, merges, ids = _vocab(hf_dir, int(config["vocab_size"]))

    writer = _writer(out_path)
    writer.add_name(name or hf_dir.name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config["num_key_value_heads"]))
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    eos = ids[tok_config["eos_token"]]
    pad = ids[tok_config["pad_token"]]
    # Qwen2 has no BOS; llama.cpp wants an id anyway, and add_bos_token=False keeps it out.
    writer.add_bos_token_id(pad)
    writer.add_eos_token_id(eos)
    writer.add_pad_token_id(pad)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tok_config["chat_template"])

    names = _tensor_names(hf_dir)
    tensors = load_file(hf_dir / "model.safetensors")
    for hf_name in sorted(tensors):
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for tensor {hf_name!r}")
        data = tensors[hf_name]
        data = data.astype(np.float16 if data.ndim == 2 else np.float32)
        writer.add_tensor(gguf_name, data)

    return _finish(writer, out_path)


def _writer(out_path: Path) -> gguf.GGUFWriter:
    """A Qwen2 GGUF writer on ``<out_path>.part``; ``_finish`` renames it into place."""
    part = out_path.with_name(out_path.name + ".part")
    return gguf.GGUFWriter(part, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2])


def _finish(writer: gguf.GGUFWriter, out_path: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(out_path.with_name(out_path.name + ".part"), out_path)
    return out_path


def _tensor_names(hf_dir: Path) -> gguf.TensorNameMap:
    """HF -> GGUF tensor names for the Qwen2 model in ``hf_dir``."""
    config = _read_json(hf_dir / "config.json")
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, int(config["num_hidden_layers"]))


# peft LoRA options that llama.cpp's adapter (W + alpha/rank * B @ A on a base weight) cannot
# express, with the value that means "off".
_UNSUPPORTED_LORA = {"use_dora": False, "lora_bias": False, "alpha_pattern": {},
                     "alora_invocation_tokens": None}


def write_lora_gguf(adapter_dir: Path, base_hf_dir: Path, out_path: Path) -> Path:
    """Write the peft LoRA adapter in ``adapter_dir`` (``adapter_config.json`` +
    ``adapter_model.safetensors``) as a llama.cpp LoRA adapter GGUF for the base ``base_hf_dir``.

    As llama.cpp's ``convert_lora_to_gguf.py``: ``general.type = adapter``, ``adapter.type =
    lora``, ``adapter.lora.alpha``, and per adapted weight ``<base GGUF tensor>.lora_a`` (peft's
    ``lora_A``, rank x in) and ``.lora_b`` (``lora_B``, out x rank), here in f16. llama.cpp
    scales each pair by alpha / rank; peft's rsLoRA scales by alpha / sqrt(rank), so under
    rsLoRA ``lora_b`` carries the extra sqrt(rank). llama.cpp checks the arch and every shape
    against the base when it loads the adapter.
    """
    adapter_dir, out_path = Path(adapter_dir), Path(out_path)
    config = _read_json(adapter_dir / "adapter_config.json")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{adapter_dir} is a {config.get('peft_type')} adapter, not LoRA")
    for option, off in _UNSUPPORTED_LORA.items():
        if config.get(option, off) not in (off, None):
            raise ValueError(f"{adapter_dir}: llama.cpp LoRA adapters cannot express {option}")
    names = _tensor_names(Path(base_hf_dir))
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, data in load_file(adapter_dir / "adapter_model.safetensors").items():
        module, sep, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        gguf_name = names.get_name(module + ".weight", try_suffixes=(".weight",)) if sep else None
        if part not in ("A.weight", "B.weight") or gguf_name is None:
            raise ValueError(f"{adapter_dir}: {key!r} is not a LoRA matrix of a base weight")
        pairs.setdefault(gguf_name, {})[part[0]] = data

    writer = _writer(out_path)
    writer.add_name(adapter_dir.name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config["lora_alpha"]))
    for gguf_name in sorted(pairs):
        a, b = pairs[gguf_name]["A"], pairs[gguf_name]["B"]
        if config.get("use_rslora"):
            b = b * math.sqrt(a.shape[0])
        writer.add_tensor(f"{gguf_name}.lora_a", a.astype(np.float16))
        writer.add_tensor(f"{gguf_name}.lora_b", b.astype(np.float16))
    return _finish(writer, out_path)


def ftype_from_name(ftype_name: str) -> int:
    """``"q8_0"``, ``"q4_k_m"``, ``"f16"`` ... -> the ``llama_cpp.LLAMA_FTYPE_*`` value."""
    import llama_cpp

    key = ftype_name.strip().upper()
    for attr in (f"LLAMA_FTYPE_MOSTLY_{key}", f"LLAMA_FTYPE_{key}"):
        if hasattr(llama_cpp, attr):
            return int(getattr(llama_cpp, attr))
    known = sorted(
        a.removeprefix("LLAMA_FTYPE_MOSTLY_").lower()
        for a in dir(llama_cpp) if a.startswith("LLAMA_FTYPE_MOSTLY_")
    )
    raise ValueError(f"unknown GGUF quantization {ftype_name!r}; known: {', '.join(known)}")


def quantize_gguf(
    src: Path, dst: Path, ftype_name: str, n_threads: int = 0, verbose: bool = False
) -> Path:
    """Quantize the GGUF ``src`` into ``dst`` with llama.cpp (``n_threads=0``: all cores).

    Tensors whose width does not fit the type's block size (K-quants need multiples of 256) are
    given a fallback type by llama.cpp itself; ``verbose`` shows its per-tensor log.
    """
    import llama_cpp

    src, dst = Path(src), Path(dst)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_from_name(ftype_name)
    params.nthread = n_threads
    part = dst.with_name(dst.name + ".part")
    # llama-cpp-python forwards llama.cpp's log to stderr through this logger's level.
    log = logging.getLogger("llama-cpp-python")
    level = log.level
    if not verbose:
        log.setLevel(logging.ERROR)
    try:
        rc = llama_cpp.llama_model_quantize(
            str(src).encode(), str(part).encode(), ctypes.byref(params)
        )
    finally:
        log.setLevel(level)
    if rc != 0:
        part.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({src} -> {ftype_name}) failed with {rc}")
    os.replace(part, dst)
    return dst
