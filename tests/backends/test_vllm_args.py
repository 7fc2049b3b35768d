"""The `vllm serve` command built from engine settings: every feature the embedded engine has,
in vLLM's own flags and speculative-config JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clinicloop.backends.vllm_args import vllm_serve_command, vllm_serve_env
from clinicloop.config import EngineSettings, SpeculativeSettings
from tests.backends.test_vllm_launch import _flag


def test_defaults_carry_batching_prefix_caching_reasoning_and_lora():
    command = vllm_serve_command(EngineSettings(n_ctx=8192, n_parallel=16), "/models/m-awq",
                                 port=8011)
    assert command[:3] == ["vllm", "serve", "/models/m-awq"]
    assert _flag(command, "--port") == "8011" and _flag(command, "--max-model-len") == "8192"
    assert _flag(command, "--max-num-seqs") == "16"
    assert "--enable-prefix-caching" in command and "--enable-lora" in command
    assert _flag(command, "--reasoning-parser") == "qwen3"
    assert _flag(command, "--tool-call-parser") == "hermes"
    assert "--enable-auto-tool-choice" in command
    assert "--exclude-tools-when-tool-choice-none" in command
    assert "--quantization" not in command  # AWQ/GPTQ checkpoints pick their Marlin kernels
    assert "--speculative-config" not in command
    assert vllm_serve_env() == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    off = vllm_serve_command(EngineSettings(enable_prefix_caching=False), "m")
    assert "--no-enable-prefix-caching" in off and "--enable-prefix-caching" not in off


def test_speculative_configs():
    ngram = EngineSettings(speculative=SpeculativeSettings(mode="ngram", num_draft_tokens=5,
                                                           ngram=4))
    spec = json.loads(_flag(vllm_serve_command(ngram, "m"), "--speculative-config"))
    assert spec == {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4,
                    "prompt_lookup_min": 1}
    eagle = EngineSettings(speculative=SpeculativeSettings(
        mode="eagle3", draft_model=Path("/models/eagle3-head"), num_draft_tokens=3))
    spec = json.loads(_flag(vllm_serve_command(eagle, "m"), "--speculative-config"))
    assert spec == {"method": "eagle3", "model": "/models/eagle3-head",
                    "num_speculative_tokens": 3}
    with pytest.raises(ValueError, match="needs speculative.draft_model"):
        vllm_serve_command(EngineSettings(speculative=SpeculativeSettings(mode="draft_model")),
                           "m")


def test_names_reasoning_and_lora_follow_the_settings():
    command = vllm_serve_command(EngineSettings(served_model_name="baichuan-m2",
                                                reasoning_parser="none",
                                                tool_call_parser="none"), "m",
                                 enable_lora=False, extra=["--kv-cache-dtype", "fp8"])
    assert _flag(command, "--served-model-name") == "baichuan-m2"
    assert "--reasoning-parser" not in command and "--enable-lora" not in command
    assert "--tool-call-parser" not in command and "--enable-auto-tool-choice" not in command
    assert command[-2:] == ["--kv-cache-dtype", "fp8"]
    assert vllm_serve_env(enable_lora=False) == {}
