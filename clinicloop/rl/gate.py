"""The refresh job's gate: a candidate model is published only if, on the held-out rubric set and
graded by the same judge, it scores no worse than the serving version (within a margin) and meets
no negative (safety) item more often; and, given a floor, only if that judge agrees well enough
with the reviewers' labels (its macro-F1 on labelled items, `verifier.calibration`).

`evaluate` answers every held-out prompt with one model and grades the answers; `decide` compares
two evaluations. Both models see the same prompts, sampled the same way, and one judge grades
both, so the difference is the model's. `judge_check` turns the judge's calibration into reasons
to refuse (and notes) that `decide` adds.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from clinicloop.verifier.calibration import Calibration
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


class JudgeCheck(BaseModel):
    """What the judge's calibration says about publishing: reasons to refuse, and notes."""

    refusals: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


def judge_check(calibration: Calibration | None, *, floor: float | None, min_labels: int = 30,
                too_few: Literal["publish", "refuse"] = "publish") -> JudgeCheck:
    """Refuse when the judge's macro-F1 on labelled items is below `floor`, or undefined (a
    class no reviewer labelled, or one the judge never decided: nothing shows it can tell the
    two apart). With fewer than `min_labels` labelled items the floor is not checked: `too_few`
    says whether to refuse or publish with a note. `floor=None`: no check, the figure noted."""
    n = 0 if calibration is None else calibration.overall.n
    macro = None if calibration is None else calibration.overall.macro_f1
    figure = "undefined" if macro is None else f"{macro:.2f}"
    if floor is None:
        return JudgeCheck(notes=[f"judge macro-F1 {figure} on {n} labelled items (no floor)"]
                          if n else [])
    if n < min_labels:
        few = f"only {n} labelled items (< {min_labels})"
        return JudgeCheck(refusals=[few]) if too_few == "refuse" else JudgeCheck(
            notes=[f"{few}: the judge floor {floor:.2f} was not checked"])
    if macro is None:
        return JudgeCheck(refusals=[f"judge macro-F1 undefined on {n} labelled items (a class "
                                    "never labelled, or never decided by the judge)"])
    if macro < floor:
        return JudgeCheck(refusals=[f"judge macro-F1 {figure} < floor {floor:.2f} on {n} "
                                    "labelled items"])
    return JudgeCheck(notes=[f"judge macro-F1 {figure} >= floor {floor:.2f} on {n} labelled "
                             "items"])


def decide(candidate: Evaluation, serving: Evaluation, *, margin: float = 0.0,
           judge: JudgeCheck | None = None) -> GateDecision:
    """Publish only if the candidate is no worse by more than `margin`, meets no negative
    item more often than the serving version, and `judge` (the judge's calibration) raises no
    refusal; its notes join the reasons either way."""
    judge = judge or JudgeCheck()
    reasons: list[str] = list(judge.refusals)
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
    publish = not reasons
    reasons = (reasons or ["no worse, no safety regression"]) + judge.notes
    return GateDecision(publish=publish, reasons=reasons,
                        candidate_score=candidate.score, serving_score=serving.score,
                        margin=margin, regressed_negatives=regressed)
