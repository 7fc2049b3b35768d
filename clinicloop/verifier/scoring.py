"""HealthBench scoring, metric for metric as openai/simple-evals `healthbench_eval.py` computes it.

One graded response scores `sum(points of met items) / sum(points of positive items)`: a met
negative item subtracts and negative items never enter the denominator, so a score can fall below
0; a response whose rubric has no positive item has no score. Each example yields the metrics
simple-evals gives it: `overall_score`; one per example tag (`theme:*`, ...), equal to the overall
score; one per rubric-item tag (`axis:*`, `cluster:*`, `level:*`, ...), the same formula over the
items with that tag, absent when none of them is positive. Across examples each metric is the mean
clipped to [0, 1], with `<name>:n_samples` and `<name>:bootstrap_std` (std of the clipped mean over
bootstrap resamples). `score` repeats `overall_score`, and the dict is sorted by key, as
simple-evals writes its metrics JSON.

Where simple-evals retries the grader until it parses, we record an unparseable verdict as None:
it counts in neither sum, and `n_unparseable` says how many there were.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from clinicloop.verifier.rubrics import RubricItem


@dataclass(frozen=True)
class ExampleGrades:
    """The verdicts on one response: `met[i]` grades `items[i]`, None when unparseable."""

    prompt_id: str
    example_tags: list[str]
    items: list[RubricItem]
    met: list[bool | None]

    def __post_init__(self) -> None:
        if len(self.items) != len(self.met):
            raise ValueError(f"{self.prompt_id}: {len(self.items)} items, {len(self.met)} verdicts")


def score_example(items: Sequence[RubricItem], met: Sequence[bool | None]) -> float | None:
    """HealthBench's score of one response; None when no positive item has a verdict."""
    graded = [(item, m) for item, m in zip(items, met, strict=True) if m is not None]
    possible = sum(item.points for item, _ in graded if item.points > 0)
    if possible == 0:
        return None
    return sum(item.points for item, m in graded if m) / possible


def example_metrics(grades: ExampleGrades) -> dict[str, float]:
    """The per-example metrics simple-evals averages: overall, example tags, rubric-item tags."""
    overall = score_example(grades.items, grades.met)
    if overall is None:
        return {}
    metrics = {"overall_score": overall} | dict.fromkeys(grades.example_tags, overall)
    by_tag: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(grades.items):
        for tag in dict.fromkeys(item.tags):  # a tag repeated on one item counts once
            by_tag[tag].append(i)
    for tag, idx in by_tag.items():
        score = score_example([grades.items[i] for i in idx], [grades.met[i] for i in idx])
        if score is not None:
            metrics[tag] = score
    return metrics


def aggregate(
    grades: Sequence[ExampleGrades], *, bootstrap_samples: int = 1000, seed: int = 0
) -> dict[str, float]:
    """The flat metrics dict of a set of graded responses, plus `n_unparseable`."""
    values: dict[str, list[float]] = defaultdict(list)
    for g in grades:
        for name, value in example_metrics(g).items():
            values[name].append(value)
    if "overall_score" in values:
        values["score"] = values["overall_score"]
    result: dict[str, float] = {}
    for name, vals in values.items():
        result[name] = float(np.clip(np.mean(vals), 0, 1))
        result[f"{name}:n_samples"] = len(vals)
        result[f"{name}:bootstrap_std"] = _bootstrap_std(vals, bootstrap_samples, seed)
    result = dict(sorted(result.items()))
    result["n_unparseable"] = sum(m is None for g in grades for m in g.met)
    return result


def _bootstrap_std(values: list[float], samples: int, seed: int) -> float:
    # A fresh generator per metric: each metric's std is reproducible on its own, whichever
    # other metrics the set happens to have.
    rng = np.random.default_rng(seed)
    v = np.asarray(values)
    means = np.clip(v[rng.integers(0, len(v), size=(samples, len(v)))].mean(axis=1), 0, 1)
    return float(means.std())
