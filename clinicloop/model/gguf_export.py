"""Hugging Face Qwen2 directory -> GGUF (f16) for llama.cpp, and GGUF -> quantized GGUF.

The f16 file is written directly with ``gguf.GGUFWriter`` (no llama.cpp checkout or convert
script needed); quantization goes through llama.cpp's own ``llama_model_quantize`` so every
quantization type llama.cpp knows is available by name.
"""

from __future__ import annotations

import ctypes
import json
import logging
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

    part = out_path.with_name(out_path.name + ".part")
    writer = gguf.GGUFWriter(part, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2])
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

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, n_layers)
    tensors = load_file(hf_dir / "model.safetensors")
    for hf_name in sorted(tensors):
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for tensor {hf_name!r}")
        data = tensors[hf_name]
        data = data.astype(np.float16 if data.ndim == 2 else np.float32)
        writer.add_tensor(gguf_name, data)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(part, out_path)
    return out_path


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
