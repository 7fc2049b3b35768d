"""The paper's options reach TRL, and a real GRPO run with LoRA trains and saves an adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from clinicloop.rl.config import PaperGRPOConfig
from clinicloop.rl.grpo import train_grpo
from clinicloop.rl.rewards import completion_text
from clinicloop.rl.stages import Endpoint, healthbench_rows, multiturn_stage
from clinicloop.verifier.patients import load_scripts
from clinicloop.verifier.rubrics import read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def test_to_trl_sets_every_paper_option(tmp_path):
    trl = PaperGRPOConfig().to_trl(tmp_path)
    assert trl.beta == 0.0
    assert trl.epsilon == 0.2 and trl.epsilon_high == 0.28 > trl.epsilon
    assert trl.loss_type == "dr_grpo" and trl.scale_rewards == "none"
    assert trl.num_generations == 4 and not trl.use_vllm
    # The options TRL could drift on, pinned to what the paper assumes.
    assert trl.num_iterations == 1 and trl.importance_sampling_level == "token"
    assert trl.delta is None and not trl.mask_truncated_completions
    assert trl.top_entropy_quantile == 1.0 and trl.entropy_coef == 0.0
    assert trl.multi_objective_aggregation == "sum_then_normalize"
    assert trl.use_cpu and not trl.bf16


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

    # Going on from that adapter (what a refresh of a vLLM-served adapter does): more steps move
    # it a little, where a fresh LoRA would draw new random A matrices and start B at zero.
    more = train_grpo(PaperGRPOConfig(max_steps=2, max_completion_length=24), tiny_model.hf_dir,
                      rows, [mentions_emergency, brevity], tmp_path / "more",
                      init_adapter=result.adapter_dir)
    after = load_file(more.adapter_dir / "adapter_model.safetensors")
    assert after.keys() == weights.keys()
    moved = {name: float((after[name] - weights[name]).norm() / weights[name].norm())
             for name in weights if weights[name].abs().sum() > 0}
    assert all(m < 0.05 for n, m in moved.items() if "lora_A" in n), moved
    assert any(m > 0 for n, m in moved.items() if "lora_B" in n), moved


def test_healthbench_rows_refuse_canaried_examples(tmp_path):
    examples = list(read_jsonl(ROOT / "tests/verifier/data/healthbench_format.jsonl"))
    with pytest.raises(ValueError, match="canary"):
        healthbench_rows(ROOT / "tests/verifier/data/healthbench_format.jsonl")
    clean = tmp_path / "train.jsonl"
    write_jsonl(clean, [e.model_copy(update={"canary": None}) for e in examples])
    rows = healthbench_rows(clean)
    assert [r["prompt"] for r in rows] == [e.prompt for e in examples]
    assert rows[0]["rubrics"][0]["criterion"] == examples[0].rubrics[0].criterion


def test_multiturn_stage_scores_the_reply_to_a_dialogue_slice(tiny_model, tmp_path):
    """The tiny model is the policy, the patient, the rubric generator and the judge."""
    model = Endpoint(gguf=tiny_model.gguf_q8_0)
    config = PaperGRPOConfig(max_steps=2, max_completion_length=16)
    result = multiturn_stage(tiny_model.hf_dir, tmp_path / "run", model, model,
                             load_scripts()[:2], config, max_turns=2, models_dir=tmp_path)
    assert len(result.reward_curve) == 2
    assert (result.adapter_dir / "adapter_config.json").exists()
    rows = [json.loads(line) for line in (tmp_path / "run" / "dataset.jsonl").open()]
    assert len(rows) == 2
    for row in rows:  # a slice ends on a patient turn, after the doctor's system prompt
        assert row["prompt"][0]["role"] == "system" and row["prompt"][-1]["role"] == "user"
        assert row["rubrics"]
