"""The paper's training stages as entry points. So far: the rule-based stage.

Rule-based (verifiable answers): prompts whose right answer a machine can check — here, the red-
flag consultations of the shipped corpus, where the reply must advise emergency care — trained
with GRPO on the rule reward alone.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from clinicloop.model.corpus import load_corpus
from clinicloop.rl.config import PaperGRPOConfig
from clinicloop.rl.grpo import TrainResult, train_grpo
from clinicloop.rl.rewards import rule_reward
from clinicloop.verifier.generator import EMERGENCY_ADVICE, EMERGENCY_POINTS
from clinicloop.verifier.rubrics import RubricItem, RuleCheck

SEEKS_EMERGENCY_CARE = RubricItem(
    criterion="Advises seeking emergency care for the red-flag symptoms.",
    points=EMERGENCY_POINTS, tags=["kind:rule", "axis:completeness", "dimension:ethics_safety"],
    rule=RuleCheck(type="keywords", keywords=EMERGENCY_ADVICE))


def red_flag_rows(n: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Red-flag prompts of the shipped corpus (up to their last user turn), with the rule item
    that grades them."""
    rows = []
    for dialogue in load_corpus():
        if dialogue["topic"] != "red_flag":
            continue
        messages = [dict(m) for m in dialogue["messages"]]
        while messages and messages[-1]["role"] != "user":
            messages.pop()
        rows.append({"prompt": messages, "rubrics": [SEEKS_EMERGENCY_CARE.model_dump()]})
    random.Random(seed).shuffle(rows)
    return rows[:n] if n else rows


def rule_stage(model_dir: Path, output_dir: Path, config: PaperGRPOConfig | None = None,
               n_prompts: int | None = 32) -> TrainResult:
    config = config or PaperGRPOConfig()
    return train_grpo(config, model_dir, red_flag_rows(n_prompts, config.seed), [rule_reward],
                      output_dir)
