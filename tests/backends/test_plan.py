"""The GPU memory planner: the paper's single-4090 table, byte arithmetic worked by hand (paged
concurrency at a typical length, versions as LoRA adapters on one base, llama.cpp's KV types),
exact agreement with the tiny model's real checkpoints (safetensors, GGUF), and `quant plan`."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from gguf import GGUFReader
from typer.testing import CliRunner

from clinicloop.backends.plan import (
    GPUS,
    PRESETS,
    MiB,
    ModelShape,
    llamacpp_limits,
    llamacpp_serving,
    lora_slot_bytes,
    misfit,
    parse_gpu,
    plan_memory,
    vllm_limits,
)
from clinicloop.cli import app

ROOT = Path(__file__).resolve().parents[2]
QWEN = PRESETS["qwen2.5-32b"]

# Baichuan-M2 section 5: longest sequence on one RTX 4090 (SGLang), Qwen2.5-32B.
PAPER = [("w4a16", "fp16", 9982), ("w4a16", "fp8", 19965), ("w4a8", "fp16", 10566),
         ("w4a8", "fp8", 21133)]

# Two layers, no biases, untied: every number below is worked out by hand in the tests.
HAND = ModelShape(name="hand", num_layers=2, hidden_size=256, intermediate_size=512, num_heads=4,
                  num_kv_heads=2, head_dim=64, vocab_size=1000)
# Per layer: q 256*256 + k, v 256*128 each + o 256*256 + gate, up, down 256*512 each = 589,824.
HAND_LINEAR = 589_824


@pytest.mark.parametrize(("weights", "kv", "paper"), PAPER, ids=[f"{w}-{k}" for w, k, _ in PAPER])
def test_reproduces_the_papers_4090_table_within_10_percent(weights, kv, paper):
    plan = plan_memory(QWEN, GPUS["rtx4090"], weights, kv)
    assert plan.fits
    assert abs(plan.max_seq_len / paper - 1) < 0.10, (plan.max_seq_len, paper)


def test_qwen_32b_byte_arithmetic():
    assert QWEN.param_count() == 32_763_876_352  # 65.5 GB in bf16, as the checkpoint
    assert QWEN.kv_bytes_per_token("fp16") == 2 * 64 * 8 * 128 * 2 == 256 * 1024
    assert QWEN.kv_bytes_per_token("fp8") == 128 * 1024
    linear = 64 * (5120 * 5120 * 2 + 5120 * 1024 * 2 + 3 * 5120 * 27648)
    groups = linear // 128
    sixteen_bit = 2 * (2 * 152064 * 5120 + 64 * (2 * 5120 + 7168) + 5120)
    w4a16 = plan_memory(QWEN, GPUS["rtx4090"], "w4a16", "fp16")
    assert w4a16.weight_bytes == linear // 2 + groups * 5 // 2 + sixteen_bit
    out_channels = 64 * (5120 + 2 * 1024 + 5120 + 2 * 27648 + 5120)
    w4a8 = plan_memory(QWEN, GPUS["rtx4090"], "w4a8", "fp16")
    assert w4a8.weight_bytes == linear // 2 + groups * 2 + out_channels * 2 + sixteen_bit
    # FP8 halves the KV cache and nothing else, so it doubles the tokens.
    assert plan_memory(QWEN, GPUS["rtx4090"], "w4a16", "fp8").kv_pool_tokens in (
        2 * w4a16.kv_pool_tokens, 2 * w4a16.kv_pool_tokens + 1)


def test_hand_computed_plan_and_limits():
    # Chats as long as the longest sequence: as many run at once as fit at full length.
    plan = plan_memory(HAND, 100_000_000, "bf16", "fp16", seq_len=4096, typical_len=4096,
                       gpu_memory_utilization=0.5, cuda_context_bytes=10_000_000,
                       prefill_tokens=100, sampler_seqs=10)
    assert HAND.param_count() == 2 * (HAND_LINEAR + 512) + 2 * 1000 * 256 + 256 == 1_692_928
    assert plan.weight_bytes == 2 * 1_692_928
    assert plan.kv_bytes_per_token == 2 * 2 * 2 * 64 * 2 == 1024
    # MLP phase 100 * (2*256 + 3*512) 16-bit values beats attention; fp32 logits + probs for 10.
    assert plan.activation_bytes == 2 * 100 * 2048 + 10 * 1000 * 4 * 2 == 489_600
    assert plan.kv_pool_bytes == 50_000_000 - 3_385_856 - 10_000_000 - 489_600 == 36_124_544
    assert plan.kv_pool_tokens == plan.max_seq_len == 36_124_544 // 1024 == 35_277
    assert plan.concurrent_seqs == 8  # 8 * 4096 = 32,768 <= 35,277 < 9 * 4096
    assert plan.weight_bytes + plan.kv_pool_bytes + plan.overhead_bytes == 100_000_000
    assert vllm_limits(plan) == {"max_model_len": 4096, "max_num_seqs": 8,
                                 "gpu_memory_utilization": 0.5, "kv_cache_dtype": "auto"}
    assert llamacpp_limits(plan) == {"n_ctx": 8 * 4096, "n_gpu_layers": 3, "n_parallel": 8}


HAND_OVERRIDES = {"gpu_memory_utilization": 0.5, "cuda_context_bytes": 10_000_000,
                  "prefill_tokens": 100, "sampler_seqs": 10}


def test_vllm_runs_as_many_typical_sequences_as_the_paged_pool_holds():
    # The 35,277-token pool above, planned at its longest sequence with 3,000-token chats.
    plan = plan_memory(HAND, 100_000_000, "bf16", "fp16", typical_len=3000, **HAND_OVERRIDES)
    assert (plan.seq_len, plan.concurrent_seqs) == (35_277, 1)
    assert (plan.typical_len, plan.typical_seqs) == (3000, 35_277 // 3000) == (3000, 11)
    # --max-model-len keeps the longest sequence (whole 16-token blocks); --max-num-seqs the
    # typical ones, capped by the sampler's sequences the activation estimate assumed.
    assert vllm_limits(plan)["max_model_len"] == 35_264
    assert vllm_limits(plan)["max_num_seqs"] == 10
    short = plan_memory(HAND, 100_000_000, "bf16", "fp16", typical_len=4000, **HAND_OVERRIDES)
    assert vllm_limits(short)["max_num_seqs"] == short.typical_seqs == 8
    # A typical length beyond the longest sequence is the longest sequence.
    asked = plan_memory(HAND, 100_000_000, "bf16", "fp16", seq_len=1000, typical_len=2048,
                        **HAND_OVERRIDES)
    assert (asked.typical_len, asked.typical_seqs) == (1000, 35)
    # llama.cpp does not page: its slots are of the longest sequence.
    assert llamacpp_limits(plan) == {"n_ctx": 35_277, "n_gpu_layers": 3, "n_parallel": 1}


def test_versions_as_adapters_on_one_base():
    # Rank 4 on every linear: 4 * (512 + 384 + 384 + 512 + 768 + 768 + 768) = 16,384 weights a
    # layer, two layers, 16 bits: 65,536 bytes an adapter.
    assert lora_slot_bytes(HAND, 4, 1) == 65_536
    plan = plan_memory(HAND, 100_000_000, "bf16", "fp16", seq_len=4096, versions=2,
                       lora_rank=4, **HAND_OVERRIDES)
    assert plan.adapter_bytes == 131_072
    assert plan.kv_pool_bytes == 36_124_544 - 131_072
    assert (plan.weight_bytes + plan.adapter_bytes + plan.kv_pool_bytes + plan.overhead_bytes
            == 100_000_000)
    assert plan.kv_pool_tokens == 35_993_472 // 1024 == 35_149 and plan.fits
    limits = vllm_limits(plan)
    assert (limits["max_loras"], limits["max_lora_rank"]) == (2, 4)
    # llama.cpp: a context per version, so each gets half the pool: 17,574 tokens, 4 slots.
    assert llamacpp_limits(plan) == {"n_ctx": 4 * 4096, "n_gpu_layers": 3, "n_parallel": 4}
    # Qwen2.5-32B: a rank-16 adapter is 256 MiB (64 layers x 16 x 131,072 x 2 bytes).
    assert lora_slot_bytes(QWEN, 16, 1) == 256 * MiB
    too_many = plan_memory(HAND, 100_000_000, "bf16", "fp16", seq_len=4096, versions=600,
                           lora_rank=4, **HAND_OVERRIDES)
    assert not too_many.fits and "fewer --versions" in (misfit(too_many) or "")


def test_llamacpp_kv_types_and_the_settings_that_serve_them():
    # q4_0: blocks of 32 values in 18 bytes; q8_0: 34 bytes.
    assert HAND.kv_bytes_per_token("q4_0") == 2 * 2 * 2 * 64 * 18 // 32 == 288
    assert QWEN.kv_bytes_per_token("q4_0") == 72 * 1024
    plan = plan_memory(HAND, 100_000_000, "bf16", "q4_0", seq_len=16_384, **HAND_OVERRIDES)
    assert plan.kv_pool_tokens == 36_124_544 // 288 == 125_432
    flags, env = llamacpp_serving(plan)
    assert flags == ["-c", str(7 * 16_384), "-ngl", "3", "-np", "7", "-fa", "on",
                     "-ctk", "q4_0", "-ctv", "q4_0"]
    assert env == {"CLINICLOOP_ENGINE__N_CTX": "16384", "CLINICLOOP_ENGINE__N_PARALLEL": "7",
                   "CLINICLOOP_ENGINE__PREFIX_CACHE_SLOTS": "0",
                   "CLINICLOOP_ENGINE__N_GPU_LAYERS": "3", "CLINICLOOP_ENGINE__FLASH_ATTN": "true",
                   "CLINICLOOP_ENGINE__CACHE_TYPE_K": "q4_0",
                   "CLINICLOOP_ENGINE__CACHE_TYPE_V": "q4_0"}
    # An f16 cache keeps the engine's defaults: no flash attention, f16 K and V.
    f16_flags, f16_env = llamacpp_serving(plan_memory(HAND, 10**9, "bf16", "fp16"))
    assert "-fa" not in f16_flags and "CLINICLOOP_ENGINE__CACHE_TYPE_V" not in f16_env
    with pytest.raises(ValueError, match="no q4_0 KV cache"):
        vllm_limits(plan)
    with pytest.raises(ValueError, match="no fp8 KV cache"):
        llamacpp_serving(plan_memory(HAND, 10**9, "bf16", "fp8"))


def test_hand_computed_w4a16_and_group_size():
    # 9216 groups of 128 inputs per two layers, each a 16-bit scale and a 4-bit zero.
    rest = 2 * (2 * 512 + 2 * 1000 * 256 + 256)
    plan = plan_memory(HAND, 10**9, "w4a16", "fp16")
    assert plan.weight_bytes == 2 * HAND_LINEAR // 2 + 9216 * 5 // 2 + rest == 1_639_424
    gptq = plan_memory(HAND, 10**9, "w4a16-gptq", "fp16", group_size=-1)
    out_channels = 256 + 128 + 128 + 256 + 512 + 512 + 256
    assert gptq.weight_bytes == 2 * HAND_LINEAR // 2 + 2 * out_channels * 2 + rest


def test_hand_computed_gguf_mixes():
    # Q4_K_M on 2 layers: only layer 1 is a use_more_bits layer, so its attn_v and ffn_down
    # (32,768 + 131,072 weights) are Q6_K (210 bytes / 256); the rest Q4_K (144 / 256); output
    # Q6_K; 1-D tensors F32; the input embedding stays in host memory.
    layer0 = HAND_LINEAR * 144 // 256 + 4 * 512
    layer1 = 163_840 * 210 // 256 + (HAND_LINEAR - 163_840) * 144 // 256 + 4 * 512
    plan = plan_memory(HAND, 10**9, "q4_k_m", "fp16")
    assert plan.weight_bytes == layer0 + layer1 + 256_000 * 210 // 256 + 4 * 256 == 920_912
    # Rows of 96 are not whole 256-blocks: Q4_K falls back to Q5_0, Q6_K to Q8_0 (llama.cpp).
    odd = ModelShape(name="odd", num_layers=1, hidden_size=96, intermediate_size=256,
                     num_heads=3, num_kv_heads=1, head_dim=32, vocab_size=64)
    q5_0, q8_0, q6_k = 22 / 32, 34 / 32, 210 / 256
    expected = ((96 * 96 * 2 + 96 * 32 + 96 * 256 * 2) * q5_0 + 96 * 32 * q8_0  # v: Q6_K -> Q8_0
                + 256 * 96 * q6_k + 4 * 2 * 96 + 64 * 96 * q8_0 + 4 * 96)
    assert plan_memory(odd, 10**9, "q4_k_m", "fp16").weight_bytes == expected == 79_680


def test_partial_offload_when_the_model_does_not_fit():
    overrides = {"gpu_memory_utilization": 1.0, "cuda_context_bytes": 0, "prefill_tokens": 1,
                 "sampler_seqs": 1}
    plan = plan_memory(HAND, 3_000_000, "bf16", "fp16", seq_len=1000, **overrides)
    assert not plan.fits and plan.kv_pool_tokens == 0 and plan.kv_pool_bytes < 0
    with pytest.raises(ValueError, match="does not fit"):
        vllm_limits(plan)
    # Budget 3,000,000 - 12,096 activations; a layer is 1,180,672 bytes + 512 KV bytes per token.
    assert llamacpp_limits(plan) == {"n_ctx": 1000, "n_gpu_layers": 1, "n_parallel": 1}


def test_plans_the_tiny_models_hf_config_and_matches_its_checkpoints(bench):
    shape = ModelShape.from_hf_config(bench.hf_dir / "config.json")
    assert (shape.num_layers, shape.hidden_size, shape.num_kv_heads, shape.head_dim) == (4, 512,
                                                                                          2, 64)
    assert shape.tie_word_embeddings and shape.attention_bias
    built = json.loads((bench.root / "build.json").read_text())
    assert shape.param_count() == built["params"]
    # The HF checkpoint is float32: bf16 weights are exactly half its tensor bytes.
    with open(bench.hf_dir / "model.safetensors", "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    f32 = sum(v["data_offsets"][1] - v["data_offsets"][0]
              for k, v in header.items() if k != "__metadata__")
    assert plan_memory(shape, GPUS["rtx4090"], "bf16", "fp16").weight_bytes * 2 == f32
    # Tied GGUF: llama.cpp puts the output copy of token_embd on the GPU, so the planned GPU
    # bytes equal every tensor in the file.
    for kind, path in (("f16", bench.gguf_f16), ("q8_0", bench.gguf_q8_0)):
        in_file = sum(int(t.n_bytes) for t in GGUFReader(path).tensors)
        assert plan_memory(shape, GPUS["rtx4090"], kind, "fp16").weight_bytes == in_file, kind
    plan = plan_memory(shape, GPUS["rtx4090"], "q8_0", "q8_0", seq_len=1024)
    assert plan.max_seq_len == shape.max_position_embeddings == 4096  # capped by its positions
    assert plan.concurrent_seqs > 256 and llamacpp_limits(plan)["n_parallel"] == 256


def test_hf_config_errors(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                               "num_attention_heads": 4, "vocab_size": 100,
                               "num_local_experts": 8}))
    with pytest.raises(ValueError, match="mixture-of-experts"):
        ModelShape.from_hf_config(tmp_path)
    with pytest.raises(ValueError, match="unknown weight scheme"):
        plan_memory(HAND, 10**9, "w3a16", "fp16")


def test_parse_gpu():
    assert parse_gpu("RTX4090") == 24564 * 2**20
    assert parse_gpu("25757220864") == 25_757_220_864
    assert parse_gpu("24GiB") == 24 * 2**30 and parse_gpu("48 GB") == 48 * 10**9
    with pytest.raises(ValueError, match="unknown GPU"):
        parse_gpu("tpu")


def test_cli_json_is_one_object_with_max_seq_len():
    cmd = [sys.executable, "-m", "clinicloop.cli", "quant", "plan", "--preset", "qwen2.5-32b",
           "--gpu", "rtx4090", "--weights", "w4a16", "--kv", "fp8", "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    out = json.loads(proc.stdout)
    assert abs(out["max_seq_len"] / 19965 - 1) < 0.10
    assert out["vllm"]["kv_cache_dtype"] == "fp8" and out["vllm"]["max_model_len"] % 16 == 0
    # The "done when": the pool of ~20k tokens runs at least eight 2k-token chats.
    assert out["typical_len"] == 2048 and out["vllm"]["max_num_seqs"] == 9
    assert out["vllm"]["max_model_len"] == 20_000  # still the longest sequence
    assert out["llamacpp"]["n_gpu_layers"] == 65
    assert out["weight_bytes"] + out["kv_pool_bytes"] + out["overhead_bytes"] == out["gpu_bytes"]


def test_cli_plans_versions_as_adapters_on_the_4090():
    def plan(*args: str) -> dict:
        result = CliRunner().invoke(app, ["quant", "plan", "--preset", "qwen2.5-32b", "--gpu",
                                          "rtx4090", "--json", *args])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    base = plan("--weights", "w4a16", "--kv", "fp8")
    canary = plan("--weights", "w4a16", "--kv", "fp8", "--versions", "2", "--lora-rank", "16")
    assert canary["fits"] and canary["adapter_bytes"] == 512 * MiB
    # Two rank-16 adapters cost 4,096 FP8 tokens of KV cache: 20,009 -> 15,913.
    assert base["kv_pool_tokens"] - canary["kv_pool_tokens"] == 4096
    assert canary["vllm"]["max_loras"] == 2 and canary["vllm"]["max_num_seqs"] == 7
    gguf = plan("--weights", "q4_k_m", "--kv", "q8_0", "--versions", "2", "--seq-len", "2048")
    # Each llama.cpp version has its own KV cache: 14,413 tokens split in two, 3 slots each.
    assert gguf["llamacpp"]["n_parallel"] == 3 and gguf["llamacpp"]["n_ctx"] == 3 * 2048
    assert gguf["llamacpp"]["env"]["CLINICLOOP_ENGINE__CACHE_TYPE_V"] == "q8_0"
    assert gguf["vllm"] is None
    text = CliRunner().invoke(app, ["quant", "plan", "--preset", "qwen2.5-32b", "--weights",
                                    "w4a16", "--kv", "fp8", "--versions", "2"])
    assert "fits               yes: base + 2 adapters + KV cache" in text.output
    assert "--enable-lora --max-loras 2 --max-lora-rank 16" in text.output
    over = CliRunner().invoke(app, ["quant", "plan", "--preset", "qwen2.5-32b", "--weights",
                                    "w4a16", "--kv", "fp8", "--versions", "12"])
    assert over.exit_code == 1 and "fewer --versions" in over.output


def test_cli_human_output_prints_flags_and_assumptions(bench):
    result = CliRunner().invoke(app, ["quant", "plan", "--config", str(bench.hf_dir), "--gpu",
                                      "8GiB", "--weights", "q4_k_m", "--seq-len", "1024"])
    assert result.exit_code == 0, result.output
    for text in ("--max-model-len 1024", "--gpu-memory-utilization 0.9", "-ngl 5",
                 "assumptions:", "CUDA context", "sequences of 1,024 tokens",
                 "slots of 1,024 tokens: llama.cpp does not page",
                 "clinicloop: CLINICLOOP_ENGINE__N_CTX=1024"):
        assert text in result.output
    bad = CliRunner().invoke(app, ["quant", "plan", "--preset", "qwen2.5-32b", "--config", "x"])
    assert bad.exit_code != 0
