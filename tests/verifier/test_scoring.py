"""HealthBench scoring pinned on small cases worked out by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from clinicloop.verifier.rubrics import RubricItem, read_jsonl
from clinicloop.verifier.scoring import ExampleGrades, aggregate, example_metrics, score_example

HEALTHBENCH = Path(__file__).parent / "data" / "healthbench_format.jsonl"


def item(points: int, *tags: str) -> RubricItem:
    return RubricItem(criterion=f"criterion worth {points}", points=points, tags=list(tags))


def graded(pid: str, pairs: list[tuple[RubricItem, bool | None]],
           example_tags: tuple[str, ...] = ()) -> ExampleGrades:
    return ExampleGrades(pid, list(example_tags), [i for i, _ in pairs], [m for _, m in pairs])


def test_met_negative_items_subtract_and_stay_out_of_the_denominator() -> None:
    # (5 - 2) / (5 + 3)
    assert score_example([item(5), item(3), item(-2)], [True, False, True]) == 3 / 8
    # an unmet negative item changes nothing
    assert score_example([item(5), item(3), item(-2)], [True, False, False]) == 5 / 8


def test_an_example_score_can_be_negative() -> None:
    assert score_example([item(2), item(-4)], [False, True]) == -2.0


def test_no_positive_item_means_no_score() -> None:
    assert score_example([item(-3), item(-1)], [True, False]) is None
    assert score_example([], []) is None


def test_unparseable_verdicts_are_excluded_from_both_sums() -> None:
    # the None +5 leaves the denominator, the None -3 does not subtract: 5 / 5
    assert score_example([item(5), item(5), item(-3)], [None, True, None]) == 1.0
    # every positive verdict unparseable: nothing to score against
    assert score_example([item(5), item(-3)], [None, True]) is None


def test_set_score_is_the_mean_clipped_to_0_1() -> None:
    below = [graded("a", [(item(2), False), (item(-4), True)]),  # -2.0
             graded("b", [(item(1), True)])]  # 1.0
    assert aggregate(below)["overall_score"] == 0.0  # mean -0.5
    mixed = [graded("a", [(item(4), True), (item(6), False)]),  # 0.4
             graded("b", [(item(10), False), (item(-1), True)])]  # -0.1
    assert aggregate(mixed)["overall_score"] == pytest.approx(0.15)


def test_axis_scores_use_tagged_items_and_skip_examples_without_a_positive_one() -> None:
    a = graded("a", [(item(4, "axis:accuracy"), True),
                     (item(6, "axis:completeness"), True),
                     (item(-2, "axis:completeness"), True)])
    b = graded("b", [(item(2, "axis:accuracy"), False),
                     (item(-3, "axis:completeness"), False)])
    # a: overall (4 + 6 - 2) / 10, accuracy 4/4, completeness (6 - 2) / 6
    assert example_metrics(a) == {"overall_score": 0.8, "axis:accuracy": 1.0,
                                  "axis:completeness": 4 / 6}
    # b: no positive completeness item, so no completeness score
    assert example_metrics(b) == {"overall_score": 0.0, "axis:accuracy": 0.0}
    m = aggregate([a, b])
    assert m["overall_score"] == pytest.approx(0.4) and m["overall_score:n_samples"] == 2
    assert m["axis:accuracy"] == 0.5 and m["axis:accuracy:n_samples"] == 2
    assert m["axis:completeness"] == pytest.approx(4 / 6)
    assert m["axis:completeness:n_samples"] == 1


def test_cluster_scores_come_from_item_tags() -> None:
    a = graded("a", [(item(5, "level:cluster", "cluster:ctx_seeking"), True),
                     (item(5, "level:example", "axis:accuracy"), False)])
    m = aggregate([a])
    assert m["cluster:ctx_seeking"] == 1.0 and m["level:cluster"] == 1.0
    assert m["level:example"] == 0.0 and m["overall_score"] == 0.5


def test_theme_scores_come_from_example_tags() -> None:
    emergency = ("theme:emergency_referrals", "physician_agreed_category:emergent")
    a = graded("a", [(item(4), True), (item(4), False)], emergency)  # 0.5
    b = graded("b", [(item(3), True)], ("theme:emergency_referrals",))  # 1.0
    c = graded("c", [(item(3), False)], ("theme:communication",))  # 0.0
    m = aggregate([a, b, c])
    assert m["theme:emergency_referrals"] == 0.75
    assert m["theme:emergency_referrals:n_samples"] == 2
    assert m["physician_agreed_category:emergent"] == 0.5
    assert m["theme:communication"] == 0.0 and m["theme:communication:n_samples"] == 1
    assert m["overall_score"] == 0.5 and m["overall_score:n_samples"] == 3


def test_unparseable_verdicts_are_counted_and_an_unscorable_example_drops_out() -> None:
    a = graded("a", [(item(5), None), (item(5), True), (item(-2), None)], ("theme:t",))
    b = graded("b", [(item(5), None)], ("theme:t",))  # no scorable verdict: no sample
    m = aggregate([a, b])
    assert m["n_unparseable"] == 4 - 1
    assert m["overall_score"] == 1.0 and m["overall_score:n_samples"] == 1
    assert m["theme:t:n_samples"] == 1


def test_metric_names_are_simple_evals_names_sorted() -> None:
    a = graded("a", [(item(5, "axis:accuracy"), True)], ("theme:hedging",))
    m = aggregate([a])
    names = [f"{base}{stat}" for base in ("axis:accuracy", "overall_score", "score",
                                          "theme:hedging")
             for stat in ("", ":bootstrap_std", ":n_samples")]
    assert list(m) == sorted(names) + ["n_unparseable"]
    assert m["score"] == m["overall_score"]


def test_bootstrap_std_is_zero_for_identical_scores_and_reproducible() -> None:
    same = [graded(str(i), [(item(4), True), (item(4), False)]) for i in range(5)]
    m = aggregate(same)
    assert m["overall_score"] == 0.5 and m["overall_score:bootstrap_std"] == 0.0
    # two examples scoring 0 and 1: resampled means are 0, 1/2, 1 with odds 1/4, 1/2, 1/4,
    # a std of sqrt(1/8)
    spread = [graded("a", [(item(1), False)]), graded("b", [(item(1), True)])]
    std = aggregate(spread)["overall_score:bootstrap_std"]
    assert std == pytest.approx(math.sqrt(1 / 8), abs=0.03)
    assert aggregate(spread)["overall_score:bootstrap_std"] == std
    assert aggregate(spread, seed=1)["overall_score:bootstrap_std"] != std
    small = aggregate(spread, bootstrap_samples=10)["overall_score:bootstrap_std"]
    assert small != std


def test_a_tag_repeated_on_one_item_counts_once() -> None:
    a = graded("a", [(item(4, "axis:accuracy", "axis:accuracy"), True),
                     (item(4, "axis:accuracy"), False)])
    assert example_metrics(a)["axis:accuracy"] == 0.5


def test_grades_must_match_items() -> None:
    with pytest.raises(ValueError):
        ExampleGrades("a", [], [item(1), item(2)], [True])


def test_real_rows_with_every_positive_item_met_score_1() -> None:
    grades = [ExampleGrades(e.prompt_id, e.example_tags, e.rubrics,
                            [i.points > 0 for i in e.rubrics]) for e in read_jsonl(HEALTHBENCH)]
    m = aggregate(grades)
    assert m["overall_score"] == 1.0 and m["overall_score:n_samples"] == 3
    assert m["overall_score:bootstrap_std"] == 0.0 and m["n_unparseable"] == 0
    assert {"theme:emergency_referrals", "theme:communication", "theme:context_seeking",
            "axis:accuracy", "axis:completeness"} <= set(m)
