"""build_tiny end to end: cached build, determinism, GGUF export, llama.cpp agreement with HF."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import gguf
import llama_cpp
import pytest
import torch
from llama_cpp import Llama
from transformers import AutoTokenizer, Qwen2ForCausalLM

from clinicloop.model import tiny_train
from clinicloop.model.corpus import load_corpus
from clinicloop.model.gguf_export import ftype_from_name, quantize_gguf
from clinicloop.model.tiny import SIZES, TinyModel, build_hash, find_tiny
from clinicloop.model.tiny_train import build_examples, build_tiny, train_model
from clinicloop.model.tokenizer import render_chat, train_tokenizer, training_texts

PROMPT_ROWS = [0, 57, 210, 260, 330, 420, 480, 540]


def _prompts(mode: str) -> list[str]:
    rows = load_corpus()
    return [render_chat(rows[i]["messages"][:-1], thinking_mode=mode) for i in PROMPT_ROWS]


def test_build_writes_a_complete_cached_build(tiny_model: TinyModel) -> None:
    assert tiny_model.name == "clinicloop-tiny"
    assert tiny_model.root.name == f"clinicloop-tiny-{build_hash(SIZES['tiny'], 0)[:12]}"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (tiny_model.hf_dir / name).is_file(), name
    assert tiny_model.gguf_f16.is_file() and tiny_model.gguf_q8_0.is_file()
    assert not list(tiny_model.root.parent.glob(".*tmp*"))

    manifest = json.loads((tiny_model.root / "build.json").read_text())
    assert manifest["hash"] == build_hash(SIZES["tiny"], 0)
    assert 100_000 <= manifest["params"] <= 1_000_000
    assert manifest["train"]["loss"]["final"] < manifest["train"]["loss"]["first"] / 5
    assert manifest["format_rate"]["off"] >= 0.75 and manifest["format_rate"]["on"] >= 0.75

    generation = json.loads((tiny_model.hf_dir / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model.hf_dir)
    assert generation["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_second_call_is_cached(tiny_model: TinyModel) -> None:
    started = time.perf_counter()
    again = build_tiny(out_root=tiny_model.root.parent, progress=False)
    assert time.perf_counter() - started < 2
    assert again == tiny_model
    assert find_tiny(out_root=tiny_model.root.parent) == tiny_model


def test_find_tiny_without_a_build_is_none(tmp_path: Path) -> None:
    assert find_tiny(out_root=tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_hash_depends_on_seed_and_size() -> None:
    hashes = {build_hash(SIZES[s], seed) for s in SIZES for seed in (0, 1)}
    assert len(hashes) == 2 * len(SIZES)
    assert build_hash(SIZES["tiny"], 0) == build_hash(SIZES["tiny"], 0)


def test_interrupted_build_leaves_nothing_that_looks_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny_train, "train_model", killed)
    with pytest.raises(KeyboardInterrupt):
        build_tiny(out_root=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unknown_size_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown size"):
        build_tiny("huge", out_root=tmp_path, progress=False)


def test_same_seed_same_weights() -> None:
    rows = load_corpus()[:40]
    tokenizer = train_tokenizer(training_texts(rows), 512)
    examples = build_examples(rows, tokenizer)

    def weights(seed: int) -> dict[str, torch.Tensor]:
        model, _ = train_model(SIZES["tiny"], tokenizer, examples, seed, steps=4, progress=False)
        return model.state_dict()

    first, second, other = weights(0), weights(0), weights(1)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_gguf_metadata(tiny_model: TinyModel) -> None:
    reader = gguf.GGUFReader(tiny_model.gguf_f16)

    def field(key: str) -> object:
        return reader.fields[key].contents()

    config = json.loads((tiny_model.hf_dir / "config.json").read_text())
    assert field("general.architecture") == "qwen2"
    assert field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == "qwen2"
    assert field("qwen2.block_count") == config["num_hidden_layers"]
    assert field("qwen2.embedding_length") == config["hidden_size"]
    assert field("qwen2.attention.head_count_kv") == config["num_key_value_heads"]
    assert "thinking_mode" in str(field("tokenizer.chat_template"))
    assert len(field("tokenizer.ggml.tokens")) == config["vocab_size"]
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "blk.0.attn_q.bias", "blk.1.ffn_down.weight"
            } <= names
    assert "output.weight" not in names  # tied embeddings


def test_gguf_generates_in_format(tiny_model: TinyModel) -> None:
    llm = Llama(model_path=str(tiny_model.gguf_f16), n_ctx=512, n_threads=1, verbose=False)
    config = json.loads((tiny_model.hf_dir / "config.json").read_text())
    assert int(llm.metadata["qwen2.context_length"]) == config["max_position_embeddings"]
    for mode, budget in (("off", 64), ("on", 160)):
        stopped = 0
        for prompt in _prompts(mode):
            choice = llm.create_completion(prompt, max_tokens=budget, temperature=0.0)["choices"][0]
            stopped += choice["finish_reason"] == "stop"
            if mode == "on" and choice["finish_reason"] == "stop":
                reasoning, _, answer = choice["text"].partition("</think>")
                assert reasoning.strip() and answer.strip()
        assert stopped >= 6, mode


def test_q8_0_loads_and_generates(tiny_model: TinyModel) -> None:
    reader = gguf.GGUFReader(tiny_model.gguf_q8_0)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0
    llm = Llama(model_path=str(tiny_model.gguf_q8_0), n_ctx=512, n_threads=1, verbose=False)
    choice = llm.create_completion(_prompts("off")[0], max_tokens=64, temperature=0.0)["choices"][0]
    assert choice["finish_reason"] == "stop"


def test_hf_and_gguf_agree_on_greedy_tokens(tiny_model: TinyModel) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model.hf_dir)
    model = Qwen2ForCausalLM.from_pretrained(tiny_model.hf_dir).eval()
    llm = Llama(model_path=str(tiny_model.gguf_f16), n_ctx=512, n_threads=1, verbose=False)
    for prompt in _prompts("on")[:4] + _prompts("off")[:2]:
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        expected = out[0, len(ids):].tolist()
        llm.reset()
        got: list[int] = []
        for token in llm.generate(ids, temp=0.0, reset=True):
            got.append(token)
            if len(got) == len(expected):
                break
        assert got == expected, prompt


def test_quantization_names() -> None:
    assert ftype_from_name("q8_0") == llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    assert ftype_from_name("Q4_K_M") == llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert ftype_from_name("f16") == llama_cpp.LLAMA_FTYPE_MOSTLY_F16
    with pytest.raises(ValueError, match="unknown GGUF quantization"):
        ftype_from_name("q9_9")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CLINICLOOP_SLOW") != "1", reason="set CLINICLOOP_SLOW=1")
def test_bench_size_builds_and_k_quantizes(models_root: Path, tmp_path: Path) -> None:
    bench = build_tiny("bench", out_root=models_root, progress=False)
    config = json.loads((bench.hf_dir / "config.json").read_text())
    manifest = json.loads((bench.root / "build.json").read_text())
    assert manifest["params"] >= 10_000_000
    for key in ("hidden_size", "intermediate_size", "vocab_size"):
        assert config[key] % 256 == 0, key

    q4 = quantize_gguf(bench.gguf_f16, tmp_path / "bench-q4_k_m.gguf", "q4_k_m")
    types = {t.tensor_type for t in gguf.GGUFReader(q4).tensors if len(t.shape) == 2}
    k_quants = {gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K}
    assert types <= k_quants, types
    for path in (bench.gguf_f16, q4):
        llm = Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False)
        stopped = sum(
            llm.create_completion(p, max_tokens=64, temperature=0.0)["choices"][0]["finish_reason"]
            == "stop"
            for p in _prompts("off")
        )
        assert stopped >= 6, path
