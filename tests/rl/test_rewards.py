"""Reward maths by hand, and the rubric reward graded by a real judge."""

from __future__ import annotations

import math

import pytest

from clinicloop.backends.llamacpp import LlamaCppEngine
from clinicloop.config import EngineSettings
from clinicloop.rl.rewards import (
    BackgroundLoop,
    RubricPlusLength,
    RubricReward,
    completion_text,
    length_rewards,
    rule_reward,
)
from clinicloop.verifier.client import EngineChatClient
from clinicloop.verifier.judge import Judge
from clinicloop.verifier.rubrics import RubricItem
from clinicloop.verifier.scoring import score_example


def test_length_reward_by_hand():
    # Group 1: scores [0.9, 0.8, 0.6, 1.0] -> P80 = quantile(., 0.2) = 0.72 > 0.5; the three
    # members at or above 0.72 earn 4/sqrt(len); group 2: P80 = 0.1 <= 0.5, nobody earns it.
    scores = [0.9, 0.8, 0.6, 1.0, 0.1, 0.1, 0.9, 0.1]
    lengths = [16, 25, 4, 100, 9, 9, 9, 9]
    got = length_rewards(scores, lengths, group_size=4, threshold=0.5)
    assert got == pytest.approx([1.0, 0.8, 0.0, 0.4, 0, 0, 0, 0])
    # Ties at P80 earn it; a whole group of equal scores all earn it.
    assert length_rewards([0.7] * 4, [4] * 4, 4, 0.5) == [2.0] * 4
    # P80 exactly at the threshold is not above it.
    assert length_rewards([0.5] * 4, [4] * 4, 4, 0.5) == [0.0] * 4
    assert length_rewards([1.0, 1.0], [0, 1], 2, 0.5) == [0.0, 4.0]
    with pytest.raises(ValueError):
        length_rewards([1.0] * 3, [1] * 3, 2, 0.5)


def test_completion_text_takes_both_shapes():
    assert completion_text("a") == "a"
    assert completion_text([{"role": "assistant", "content": "b"}]) == "b"


SEEKS_CARE = {"criterion": "Advises emergency care.", "points": 8, "tags": ["kind:rule"],
              "rule": {"type": "keywords", "keywords": ["emergency", "911"]}}
WAITS = {"criterion": "Says to wait and see.", "points": -4, "tags": ["kind:rule"],
         "rule": {"type": "keywords", "keywords": ["wait and see"]}}


EXPLAINS = {"criterion": "Explains why chest pain needs urgent assessment.", "points": 4,
            "tags": ["axis:completeness"]}


def test_rubric_and_length_reward_with_a_real_judge(tiny_model, tmp_path):
    with BackgroundLoop() as loop:
        engine = LlamaCppEngine(EngineSettings(model_path=tiny_model.gguf_q8_0), tmp_path)
        loop.run(engine.start())
        try:
            judge = Judge(EngineChatClient(engine), concurrency=1)
            rubric = RubricReward(judge, loop)
            prompts = [[{"role": "user", "content": "Crushing chest pain for an hour."}]] * 2
            completions = [
                [{"role": "assistant", "content": "Call 911 now: this is an emergency."}],
                [{"role": "assistant", "content": "Let's wait and see."}]]
            # Rule items alone: graded mechanically, so the scores are known.
            rules = [[SEEKS_CARE, WAITS]] * 2
            assert rubric(prompts, completions, rubrics=rules) == [1.0, -0.5]
            total = RubricPlusLength(rubric, group_size=2, threshold=-1.0)(
                prompts, completions, rubrics=rules)
            # P80 of [1.0, -0.5] is -0.2 > -1.0: only the first (>= P80) earns 4/sqrt(35 chars).
            assert total == pytest.approx([1.0 + 4 / math.sqrt(35), -0.5])

            # With an item the model judges: the reward is the HealthBench score of its verdicts
            # (greedy, so the same verdicts come back), unparseable ones left out.
            mixed = [[SEEKS_CARE, WAITS, EXPLAINS]] * 2
            got = rubric(prompts, completions, rubrics=mixed)
            items = [RubricItem.model_validate(i) for i in mixed[0]]
            for prompt, completion, reward in zip(prompts, completions, got, strict=True):
                verdicts = loop.run(judge.grade_all(prompt, completion[0]["content"], items))
                assert verdicts[2].source in ("llm", "unparseable")
                met = [v.criteria_met for v in verdicts]
                assert reward == pytest.approx(score_example(items, met))
            # met / not met / unparseable: 12/12, 8/12, 8/8 and 0/12, -4/12, -4/8.
            assert got[0] in (1.0, pytest.approx(8 / 12))
            assert got[1] in (0.0, pytest.approx(-4 / 12), -0.5)
        finally:
            loop.run(engine.close())


def test_rule_reward_without_a_positive_rule_item_is_zero():
    assert rule_reward([None], ["Call 911."], [[WAITS]]) == [0.0]
