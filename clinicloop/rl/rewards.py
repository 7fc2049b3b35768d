"""GRPO reward functions in TRL's signature: `reward(prompts, completions, **columns) -> list`.

- `RubricReward`: each completion's HealthBench score against its prompt's rubric (the dataset's
  `rubrics` column), graded by a `Judge`; rule items are checked without a model; a completion
  with no gradable positive item gets 0.
- `length_rewards`: the paper's length reward, which needs the whole group of one prompt:
  `R_length(o) = 4 / sqrt(len(o))` if `P80 > threshold` and `R_rubric(o) >= P80`, else 0, where
  `P80 = quantile(group rubric scores, 0.2)` (the score 80% of the group reaches). TRL lays out
  the `num_generations` completions of one prompt consecutively, which is how groups are cut.
  `len(o)` counts tokens when a tokenizer is given, else characters.
- `RubricPlusLength`: rubric + length, the paper's reward for the rubric stage.
- `rule_reward`: verifiable answers, the score over the rubric's `kind:rule` items checked
  mechanically (1.0 or 0.0 for a single positive rule item); no model.

The judge is async and TRL calls rewards synchronously, so the judge runs on a `BackgroundLoop`:
one event loop in its own thread, which is also where its engine was started.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import numpy as np

from clinicloop.verifier.judge import Judge
from clinicloop.verifier.rubrics import RubricItem, check_rule
from clinicloop.verifier.scoring import score_example

T = TypeVar("T")


class BackgroundLoop:
    """An event loop in a daemon thread; `run` blocks the caller until a coroutine finishes."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="reward-loop")
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()

    def __enter__(self) -> BackgroundLoop:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def completion_text(completion: Any) -> str:
    """A completion as TRL passes it: plain text, or a list of messages (conversational)."""
    if isinstance(completion, str):
        return completion
    return str(completion[-1]["content"])


def prompt_messages(prompt: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def length_rewards(scores: Sequence[float], lengths: Sequence[int], group_size: int,
                   threshold: float) -> list[float]:
    if len(scores) != len(lengths) or len(scores) % group_size:
        raise ValueError("scores and lengths must cover whole groups of the same completions")
    rewards: list[float] = []
    for start in range(0, len(scores), group_size):
        group = scores[start:start + group_size]
        p80 = float(np.quantile(group, 0.2))
        for score, n in zip(group, lengths[start:start + group_size], strict=True):
            earns = p80 > threshold and score >= p80 and n > 0
            rewards.append(4.0 / math.sqrt(n) if earns else 0.0)
    return rewards


class RubricReward:
    __name__ = "rubric"  # TRL logs each reward under its function's name

    def __init__(self, judge: Judge, loop: BackgroundLoop) -> None:
        self.judge = judge
        self.loop = loop

    def __call__(self, prompts: list[Any], completions: list[Any],
                 rubrics: list[list[dict[str, Any]]], **_: Any) -> list[float]:
        return self.loop.run(self._score_all(prompts, completions, rubrics))

    async def _score_all(self, prompts: list[Any], completions: list[Any],
                         rubrics: list[list[dict[str, Any]]]) -> list[float]:
        async def one(prompt: Any, completion: Any, raw: list[dict[str, Any]]) -> float:
            items = [RubricItem.model_validate(i) for i in raw]
            verdicts = await self.judge.grade_all(prompt_messages(prompt),
                                                  completion_text(completion), items)
            score = score_example(items, [v.criteria_met for v in verdicts])
            return 0.0 if score is None else score

        return list(await asyncio.gather(*(one(p, c, r) for p, c, r in
                                           zip(prompts, completions, rubrics, strict=True))))


class RubricPlusLength:
    __name__ = "rubric_plus_length"

    def __init__(self, rubric: RubricReward, group_size: int, threshold: float,
                 tokenizer: Any = None) -> None:
        self.rubric = rubric
        self.group_size = group_size
        self.threshold = threshold
        self.tokenizer = tokenizer

    def _length(self, text: str) -> int:
        if self.tokenizer is None:
            return len(text)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        scores = self.rubric(prompts, completions, **columns)
        lengths = [self._length(completion_text(c)) for c in completions]
        bonus = length_rewards(scores, lengths, self.group_size, self.threshold)
        return [s + b for s, b in zip(scores, bonus, strict=True)]


def rule_reward(prompts: list[Any], completions: list[Any], rubrics: list[list[dict[str, Any]]],
                **_: Any) -> list[float]:
    """Verifiable answers: the HealthBench score over the rubric's `kind:rule` items alone,
    checked mechanically (no judge model); 0 when no positive rule item applies."""
    rewards = []
    for completion, raw in zip(completions, rubrics, strict=True):
        items = [i for i in map(RubricItem.model_validate, raw) if i.is_rule]
        text = completion_text(completion)
        score = score_example(items, [check_rule(i.rule, text) for i in items if i.rule])
        rewards.append(0.0 if score is None else score)
    return rewards
