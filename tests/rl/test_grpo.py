"""The paper's options reach TRL, and a real GRPO run with LoRA trains and saves an adapter."""

from __future__ import annotations

from safetensors.torch import load_file

from clinicloop.rl.config import PaperGRPOConfig
from clinicloop.rl.grpo import train_grpo
from clinicloop.rl.rewards import completion_text


def test_to_trl_sets_every_paper_option(tmp_path):
    trl = PaperGRPOConfig().to_trl(tmp_path)
    assert trl.beta == 0.0
    assert trl.epsilon == 0.2 and trl.epsilon_high == 0.28 > trl.epsilon
    assert trl.loss_type == "dr_grpo" and trl.scale_rewards == "none"
    assert trl.num_generations == 4 and not trl.use_vllm


def mentions_emergency(prompts, completions, **_):
    """A verifiable (rule) reward: does the reply advise emergency care?"""
    return [float("emergency" in completion_text(c).lower()) for c in completions]


def brevity(prompts, completions, **_):
    """Varies within every group of samples, so the advantages are never all zero."""
    return [-len(completion_text(c)) / 100 for c in completions]


def test_a_short_grpo_run_saves_an_adapter(tiny_model, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": text}]} for text in (
        "My father has chest pain spreading to his left arm. What should I do?",
        "I have a mild cough since yesterday.")]
    config = PaperGRPOConfig(max_steps=2, max_completion_length=24)
    result = train_grpo(config, tiny_model.hf_dir, rows, [mentions_emergency, brevity],
                        tmp_path / "run")
    assert len(result.reward_curve) == 2
    assert (result.adapter_dir / "adapter_config.json").exists()
    assert (tmp_path / "run" / "train.json").exists()
    # The steps really updated the adapter: LoRA's B matrices start at zero.
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert any(t.abs().sum() > 0 for name, t in weights.items() if "lora_B" in name)
