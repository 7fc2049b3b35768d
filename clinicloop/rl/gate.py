"""The refresh job's gate: a candidate model is published only if, on the held-out rubric set and
graded by the same judge, it scores no worse than the serving version (within a margin) and meets
no negative (safety) item more often.

`evaluate` answers every held-out prompt with one model and grades the answers; `decide` compares
two evaluations. Both models see the same prompts, sampled the same way, and one judge grades
both, so the difference is the model's.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from clinicloop.verifier.client import ChatClient, ChatError
from clinicloop.verifier.judge import Judge
from clinicloop.verifier.rubrics import RubricItem
from clinicloop.verifier.scoring import ExampleGrades, aggregate


class HeldoutExample(BaseModel):
    prompt_id: str
    messages: list[dict[str, Any]]
    rubrics: list[RubricItem]


class Evaluation(BaseModel):
    model: str
    score: float | None = Field(description="overall_score (clipped mean), None if nothing graded")
    metrics: dict[str, float]
    #: For each negative item (prompt_id, criterion): how many of the samples met it.
    negatives_met: dict[str, int]
    responses: dict[str, list[str]]
    n_failed: int = Field(0, description="Answers the model endpoint failed to give.")


class GateDecision(BaseModel):
    publish: bool
    reasons: list[str]
    candidate_score: float | None
    serving_score: float | None
    margin: float
    regressed_negatives: list[str] = Field(
        default_factory=list, description="Negative items the candidate met more often.")


def _negative_key(prompt_id: str, item: RubricItem) -> str:
    return f"{prompt_id} :: {item.criterion}"


async def evaluate(model: ChatClient, judge: Judge, examples: list[HeldoutExample], *,
                   samples: int = 1, max_tokens: int = 256, temperature: float = 0.0,
                   seed: int = 0) -> Evaluation:
    """Answer each held-out prompt `samples` times with `model`, grade every answer."""
    grades: list[ExampleGrades] = []
    negatives: dict[str, int] = {}
    responses: dict[str, list[str]] = {}
    failed = 0
    for example in examples:
        for item in example.rubrics:
            if item.points < 0:
                negatives.setdefault(_negative_key(example.prompt_id, item), 0)
        for sample in range(samples):
            try:
                answer = await model.chat(example.messages, max_tokens=max_tokens,
                                          temperature=temperature, seed=seed + sample)
            except ChatError:
                failed += 1
                continue
            responses.setdefault(example.prompt_id, []).append(answer)
            verdicts = await judge.grade_all(example.messages, answer, example.rubrics)
            met = [v.criteria_met for v in verdicts]
            grades.append(ExampleGrades(example.prompt_id, [], example.rubrics, met))
            for item, was_met in zip(example.rubrics, met, strict=True):
                if item.points < 0 and was_met:
                    negatives[_negative_key(example.prompt_id, item)] += 1
    metrics = aggregate(grades) if grades else {}
    return Evaluation(model=model.model, score=metrics.get("overall_score"), metrics=metrics,
                      negatives_met=negatives, responses=responses, n_failed=failed)


def decide(candidate: Evaluation, serving: Evaluation, *, margin: float = 0.0) -> GateDecision:
    """Publish only if the candidate is no worse by more than `margin` and meets no negative
    item more often than the serving version."""
    reasons: list[str] = []
    if candidate.score is None:
        reasons.append("the candidate produced no gradable answer")
    elif serving.score is not None and candidate.score < serving.score - margin:
        reasons.append(f"score {candidate.score:.3f} is below serving {serving.score:.3f} "
                       f"minus margin {margin:.3f}")
    if candidate.n_failed:
        reasons.append(f"the candidate failed to answer {candidate.n_failed} prompts")
    regressed = sorted(k for k, n in candidate.negatives_met.items()
                       if n > serving.negatives_met.get(k, 0))
    if regressed:
        reasons.append(f"{len(regressed)} negative (safety) items met more often")
    return GateDecision(publish=not reasons, reasons=reasons or ["no worse, no safety regression"],
                        candidate_score=candidate.score, serving_score=serving.score,
                        margin=margin, regressed_negatives=regressed)
