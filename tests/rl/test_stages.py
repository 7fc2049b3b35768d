"""The rule-based stage: verifiable prompts, the mechanical reward, a short real run."""

from __future__ import annotations

from clinicloop.rl.config import PaperGRPOConfig
from clinicloop.rl.rewards import rule_reward
from clinicloop.rl.stages import red_flag_rows, rule_stage


def test_red_flag_rows_end_on_a_user_turn_with_a_rule_item():
    rows = red_flag_rows()
    assert len(rows) >= 100
    assert all(r["prompt"][-1]["role"] == "user" for r in rows)
    assert all(r["rubrics"][0]["tags"][0] == "kind:rule" for r in rows)
    assert red_flag_rows(5, seed=1) == red_flag_rows(5, seed=1) != red_flag_rows(5, seed=2)


def test_rule_reward_checks_mechanically():
    rubrics = [red_flag_rows(1)[0]["rubrics"]] * 3
    completions = ["Call 911 now.", [{"role": "assistant", "content": "Go to the ER."}],
                   "Rest and drink fluids."]
    assert rule_reward([None] * 3, completions, rubrics) == [1.0, 1.0, 0.0]


def test_rule_stage_runs(tiny_model, tmp_path):
    result = rule_stage(tiny_model.hf_dir, tmp_path, PaperGRPOConfig(max_steps=2,
                                                                     max_completion_length=24),
                        n_prompts=4)
    assert len(result.reward_curve) == 2 and (result.adapter_dir / "adapter_config.json").exists()
