"""QLoRA's path through `train_grpo`: on a CPU it trains the unquantised base through the same
k-bit preparation, with gradient checkpointing, and says so; on CUDA it asks for NF4 + double
quantisation + bfloat16 compute."""

from __future__ import annotations

import json

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from clinicloop.rl.config import PaperGRPOConfig
from clinicloop.rl.grpo import policy_quantization, train_grpo
from tests.rl.test_grpo import brevity, mentions_emergency

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_qlora_trains_on_cpu_without_4_bits(tiny_model, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "My father has chest pain spreading to his "
                                                    "left arm. What should I do?"}]}]
    config = PaperGRPOConfig(qlora=True, max_steps=2, max_completion_length=16)
    result = train_grpo(config, tiny_model.hf_dir, rows, [mentions_emergency, brevity],
                        tmp_path / "run", progress=False)
    assert len(result.reward_curve) == 2

    report = json.loads((tmp_path / "run" / "train.json").read_text())
    assert report["load"]["quantization"] == "none" and report["load"]["device"] == "cpu"
    assert report["load"]["reason"].startswith("no CUDA")
    # Read off the model after a step's backward, not the option.
    assert report["load"]["gradient_checkpointing"] is True
    assert report["peak_gpu_bytes"] is None

    # A peft adapter on every projection of every layer, trained (B starts at zero), and loadable.
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    layers = AutoModelForCausalLM.from_pretrained(tiny_model.hf_dir).config.num_hidden_layers
    adapted = {(name.split(".layers.")[1].split(".")[0], name.split(".")[-3])
               for name in weights if "lora_B" in name}
    assert adapted == {(str(i), p) for i in range(layers) for p in PROJECTIONS}
    assert any(t.abs().sum() > 0 for name, t in weights.items() if "lora_B" in name)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model.hf_dir),
                                       result.adapter_dir)
    assert set(loaded.peft_config["default"].target_modules) == PROJECTIONS


def test_without_checkpointing_the_run_says_so(tiny_model, tmp_path):
    config = PaperGRPOConfig(qlora=True, gradient_checkpointing=False, max_steps=1,
                             max_completion_length=8)
    assert config.to_trl(tmp_path).gradient_checkpointing is False
    train_grpo(config, tiny_model.hf_dir, [{"prompt": [{"role": "user", "content": "A cough."}]}],
               [brevity], tmp_path / "run", progress=False)
    report = json.loads((tmp_path / "run" / "train.json").read_text())
    assert report["load"]["gradient_checkpointing"] is False


def test_cuda_gets_nf4_with_double_quantisation(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    quantization, load = policy_quantization(PaperGRPOConfig(qlora=True))
    assert quantization is not None and quantization.load_in_4bit
    assert quantization.bnb_4bit_quant_type == "nf4"
    assert quantization.bnb_4bit_use_double_quant
    assert quantization.bnb_4bit_compute_dtype == torch.bfloat16
    assert (load.quantization, load.device) == ("nf4-double", "cuda")
    # QLoRA off, the base loads as it always did, CUDA or not.
    assert policy_quantization(PaperGRPOConfig())[0] is None


def test_no_cuda_means_no_4_bits(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    quantization, load = policy_quantization(PaperGRPOConfig(qlora=True))
    assert quantization is None and load.quantization == "none" and "no CUDA" in load.reason
