"""Judge calibration: how well the judge's verdicts agree with human labels on rubric items.

The labels are reviewers' (the console's verdict labels in the store) or physicians' (a JSONL in
HealthBench's meta-evaluation form). The headline is macro-F1 as HealthBench's meta-evaluation
defines it (simple-evals `healthbench_meta_eval.py`, `pairwise_model_f1_balanced`, the number
HealthBench reports as 0.709 for its grader). What that code does, and what we do alike:

- "met" is the positive class. The grader's decision is compared with *each* physician's label
  of the same (completion, criterion), pairwise: every (grader, physician) pair counts once. There
  is no majority vote, so ties between physicians need no rule. A reviewer label in the store is
  one label per item, where pairwise comparison is plain agreement.
- Precision of a class = the share of the grader's decisions of that class the human agrees with;
  recall = the share of the human's labels of that class the grader agrees with; F1 of the class
  from those two (0 when both are 0; undefined when either is undefined: a class never predicted
  or never labelled). Macro-F1 = the mean of the "met" and "not met" F1, undefined when either is.

Ours on top: accuracy (the share of agreeing pairs), and a percentile-bootstrap 95% interval of
the macro-F1 that resamples labelled items (a meta-evaluation row's physician pairs stay together),
resamples with an undefined macro-F1 left out. Disagreements list the items where the judge's
decision differs from the humans' majority; an item whose labels tie is not listed.

Meta-evaluation rows carry a criterion's text without points: the judge grades it as a +1 item
(the `split` template then asks whether the response is acceptable against it), and the
`per_axis` breakdown is per row `category` (the file has no axis tags). In the store, the
breakdown is per the item's `axis:*` tag.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from clinicloop.store.db import Store
from clinicloop.store.records import TurnRecord
from clinicloop.store.reviews import VerdictLabel, latest_labels
from clinicloop.verifier.client import open_client
from clinicloop.verifier.judge import Judge, Template, item_key, verdict_key
from clinicloop.verifier.rubrics import RubricItem

#: Bootstrap resamples drawn at once (bounds the index matrix to a few MB).
_CHUNK_CELLS = 2_000_000


class ClassStats(BaseModel):
    precision: float | None
    recall: float | None
    f1: float | None
    support: int = Field(description="Human labels of this class (pairs, for several raters).")


class Interval(BaseModel):
    low: float | None
    high: float | None


class Agreement(BaseModel):
    n: int = Field(description="Labelled items.")
    macro_f1: float | None
    macro_f1_ci: Interval
    accuracy: float | None
    met: ClassStats
    not_met: ClassStats


class Disagreement(BaseModel):
    turn_id: str | None
    conversation_id: str | None
    prompt_id: str | None
    criterion: str
    points: int
    judge_met: bool
    label_met: bool
    explanation: str


class Calibration(BaseModel):
    judge_model: str
    template: str
    source: Literal["store", "meta_eval"]
    overall: Agreement
    per_axis: dict[str, Agreement]
    disagreements: list[Disagreement]
    n_unanswered: int = Field(0, description="Labelled items left out: the judge gave no verdict.")


@dataclass(frozen=True)
class _Item:
    """One labelled item with the judge's decision on it."""

    judge_met: bool
    human: tuple[bool, ...]
    group: str | None  # axis (store) or category (meta-evaluation)
    criterion: str
    points: int
    explanation: str
    turn_id: str | None = None
    conversation_id: str | None = None
    prompt_id: str | None = None


# -- the metric ---------------------------------------------------------------------------------


def _counts(judge_met: bool, human: Iterable[bool]) -> list[int]:
    """[tp, fp, fn, tn] of one item's (judge, human) pairs, "met" positive."""
    labels = list(human)
    met, not_met = sum(labels), len(labels) - sum(labels)
    return [met, not_met, 0, 0] if judge_met else [0, 0, met, not_met]


def _rates(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision/recall/F1, macro-F1 and accuracy of [..., 4] counts (NaN: undefined)."""
    tp, fp, fn, tn = (counts[..., i].astype(float) for i in range(4))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"met_p": tp / (tp + fp), "met_r": tp / (tp + fn),
               "not_p": tn / (tn + fn), "not_r": tn / (tn + fp),
               "accuracy": (tp + tn) / (tp + fp + fn + tn)}
        for cls in ("met", "not"):
            p, r = out[f"{cls}_p"], out[f"{cls}_r"]
            out[f"{cls}_f1"] = np.where(p + r == 0, 0.0, 2 * p * r / (p + r))
    out["macro"] = (out["met_f1"] + out["not_f1"]) / 2  # NaN when either F1 is
    return out


def _value(x: np.ndarray | float) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x


def _interval(counts: np.ndarray, bootstrap: int, seed: int) -> Interval:
    n = len(counts)
    if n == 0 or bootstrap <= 0:
        return Interval(low=None, high=None)
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // n)
    macros = []
    for start in range(0, bootstrap, chunk):
        picks = rng.integers(0, n, size=(min(chunk, bootstrap - start), n))
        macros.append(_rates(counts[picks].sum(axis=1))["macro"])
    values = np.concatenate(macros)
    values = values[~np.isnan(values)]
    if not len(values):
        return Interval(low=None, high=None)
    low, high = np.percentile(values, [2.5, 97.5])
    return Interval(low=float(low), high=float(high))


def _agreement(counts: np.ndarray, bootstrap: int, seed: int) -> Agreement:
    """Agreement over items given as an [n, 4] array of their pair counts."""
    counts = counts.reshape(-1, 4)
    total = counts.sum(axis=0)
    r = _rates(total)
    tp, fp, fn, tn = (int(c) for c in total)
    return Agreement(
        n=len(counts), macro_f1=_value(r["macro"]), macro_f1_ci=_interval(counts, bootstrap, seed),
        accuracy=_value(r["accuracy"]),
        met=ClassStats(precision=_value(r["met_p"]), recall=_value(r["met_r"]),
                       f1=_value(r["met_f1"]), support=tp + fn),
        not_met=ClassStats(precision=_value(r["not_p"]), recall=_value(r["not_r"]),
                           f1=_value(r["not_f1"]), support=tn + fp))


def agreement(judge: Sequence[bool], human: Sequence[bool], *, bootstrap: int = 1000,
              seed: int = 0) -> Agreement:
    """The judge's agreement with one human label per item (`judge[i]` vs `human[i]`)."""
    if len(judge) != len(human):
        raise ValueError(f"{len(judge)} judge decisions for {len(human)} labels")
    counts = np.array([_counts(j, [h]) for j, h in zip(judge, human, strict=True)], dtype=int)
    return _agreement(counts, bootstrap, seed)


def _majority(human: tuple[bool, ...]) -> bool | None:
    met = sum(human)
    return None if 2 * met == len(human) else 2 * met > len(human)


def _calibration(judge_model: str, template: str, source: Literal["store", "meta_eval"],
                 items: list[_Item], bootstrap: int, seed: int,
                 n_unanswered: int = 0) -> Calibration:
    def of(group: list[_Item]) -> Agreement:
        return _agreement(np.array([_counts(i.judge_met, i.human) for i in group], dtype=int),
                          bootstrap, seed)

    groups: dict[str, list[_Item]] = defaultdict(list)
    for i in items:
        if i.group is not None:
            groups[i.group].append(i)
    disagreements = [
        Disagreement(turn_id=i.turn_id, conversation_id=i.conversation_id, prompt_id=i.prompt_id,
                     criterion=i.criterion, points=i.points, judge_met=i.judge_met,
                     label_met=majority, explanation=i.explanation)
        for i in items if (majority := _majority(i.human)) is not None and majority != i.judge_met]
    return Calibration(judge_model=judge_model, template=template, source=source,
                       overall=of(items), per_axis={g: of(v) for g, v in sorted(groups.items())},
                       disagreements=disagreements, n_unanswered=n_unanswered)


def _axis(item: RubricItem) -> str | None:
    axes = item.tag_values("axis")
    return axes[0] if axes else None


# -- reviewer labels in the store ------------------------------------------------------------


def calibrate_stored(store: Store, *, judge_model: str | None = None,
                     template: str | None = None, bootstrap: int = 1000,
                     seed: int = 0) -> list[Calibration]:
    """One calibration per (judge model, template) among the stored verdicts on labelled items
    (the latest label per turn and item), optionally of one judge model / template; no model is
    called. A verdict counts for a label when it is on the label's turn and item (`item_key`)."""
    by_turn: dict[str, dict[str, VerdictLabel]] = defaultdict(dict)
    for (turn_id, key), label in latest_labels(store).items():
        by_turn[turn_id][key] = label
    groups: dict[tuple[str, str], list[_Item]] = defaultdict(list)
    for turn_id, labels in by_turn.items():
        turn = store.get(turn_id)
        for v in store.list_verdicts(turn_id):
            if v.criteria_met is None or judge_model not in (None, v.judge_model) \
                    or template not in (None, v.template):
                continue
            item = RubricItem.model_validate(v.item)
            label = labels.get(item_key(item))
            if label is None:
                continue
            groups[(v.judge_model, v.template)].append(_Item(
                judge_met=v.criteria_met, human=(label.criteria_met,), group=_axis(item),
                criterion=item.criterion, points=item.points, explanation=v.explanation,
                turn_id=turn_id, conversation_id=turn.conversation_id if turn else None))
    return [_calibration(model, tmpl, "store", items, bootstrap, seed)
            for (model, tmpl), items in sorted(groups.items())]


def _labelled_turns(store: Store) -> list[tuple[VerdictLabel, TurnRecord]]:
    """Every latest label with its (answered) turn."""
    turns: dict[str, TurnRecord | None] = {}
    found = []
    for (turn_id, _), label in sorted(latest_labels(store).items()):
        if turn_id not in turns:
            turns[turn_id] = store.get(turn_id)
        turn = turns[turn_id]
        if turn is not None and turn.response is not None:
            found.append((label, turn))
    return found


def _key(turn: TurnRecord, item: RubricItem, model: str, template: Template) -> str:
    """The verdict key of `item` on `turn`, as `score_logs` grades it."""
    return verdict_key(turn.messages, turn.response or "", item, model, template,
                       turn.tool_calls)


def label_verdicts(store: Store, model: str, template: Template) -> dict[str, bool]:
    """verdict_key -> the reviewer's latest label, for every labelled item, keyed for the judge
    `model` with `template`: what `Judge(labels=...)` takes."""
    return {_key(turn, RubricItem.model_validate(label.item), model, template): label.criteria_met
            for label, turn in _labelled_turns(store)}


async def calibrate_labelled(store: Store, judge: Judge, *, bootstrap: int = 1000,
                             seed: int = 0) -> Calibration:
    """`judge`'s agreement with every labelled item in the store: its stored verdict where there
    is one, else graded now (not stored). The judge must not carry labels: it is being measured."""
    if judge.labels:
        raise ValueError("calibration measures the judge: build it without labels")
    model, template = judge.client.model, judge.template
    pairs = await asyncio.to_thread(_labelled_turns, store)
    items: list[_Item] = []
    unanswered = 0
    for label, turn in pairs:
        item = RubricItem.model_validate(label.item)
        stored = await asyncio.to_thread(store.get_verdict, _key(turn, item, model, template))
        if stored is not None and stored.criteria_met is not None:
            met, explanation = stored.criteria_met, stored.explanation
        else:
            verdict = await judge.grade(turn.messages, turn.response or "", item,
                                        tool_calls=turn.tool_calls)
            if verdict.criteria_met is None:
                unanswered += 1
                continue
            met, explanation = verdict.criteria_met, verdict.explanation
        items.append(_Item(judge_met=met, human=(label.criteria_met,), group=_axis(item),
                           criterion=item.criterion, points=item.points, explanation=explanation,
                           turn_id=turn.id, conversation_id=turn.conversation_id))
    return _calibration(model, template, "store", items, bootstrap, seed, unanswered)


# -- HealthBench meta-evaluation files -------------------------------------------------------


class MetaEvalRow(BaseModel):
    """One row of HealthBench's meta-evaluation JSONL (other fields, e.g. the physicians' ids,
    are ignored)."""

    model_config = ConfigDict(extra="ignore")

    prompt: list[dict[str, Any]]
    completion: str
    rubric: str = Field(description="The criterion's text.")
    binary_labels: list[bool] = Field(description="Each physician's criteria-met label.")
    category: str | None = None
    prompt_id: str | None = None
    completion_id: str | None = None


def read_meta_eval(path: Path) -> list[MetaEvalRow]:
    return [MetaEvalRow.model_validate(json.loads(line))
            for line in path.read_text().splitlines() if line.strip()]


async def calibrate_meta_eval(rows: Sequence[MetaEvalRow], judge: Judge, *,
                              bootstrap: int = 1000, seed: int = 0) -> Calibration:
    """Grade each row's criterion (as a +1 item) on its completion with `judge` and compare
    with the physicians' labels; rows without labels are skipped."""
    if judge.labels:
        raise ValueError("calibration measures the judge: build it without labels")
    rows = [r for r in rows if r.binary_labels]
    verdicts = await asyncio.gather(*(
        judge.grade(r.prompt, r.completion, RubricItem(criterion=r.rubric, points=1))
        for r in rows))
    items = [_Item(judge_met=v.criteria_met, human=tuple(r.binary_labels), group=r.category,
                   criterion=r.rubric, points=1, explanation=v.explanation,
                   prompt_id=r.prompt_id)
             for r, v in zip(rows, verdicts, strict=True) if v.criteria_met is not None]
    return _calibration(judge.client.model, judge.template, "meta_eval", items, bootstrap, seed,
                        n_unanswered=len(rows) - len(items))


def calibrate_file(path: Path, judge_url: str | None, *, models_dir: Path,
                   judge_model: str | None = None, judge_key: str | None = None,
                   template: Template = "split", bootstrap: int = 1000,
                   seed: int = 0) -> Calibration:
    """`calibrate_meta_eval` on the JSONL at `path`, with the judge at `judge_url` (None: the
    tiny model in-process, from `models_dir`) as `verify score` opens it."""
    rows = read_meta_eval(path)

    async def run() -> Calibration:
        async with open_client(judge_url, api_key=judge_key, key_option="--judge-key",
                               model=judge_model, models_dir=models_dir) as client:
            # One sequence at a time in-process, as in `verify score`.
            judge = Judge(client, template=template, concurrency=8 if judge_url else 1)
            return await calibrate_meta_eval(rows, judge, bootstrap=bootstrap, seed=seed)

    return asyncio.run(run())


# -- the human summary -----------------------------------------------------------------------


def _f(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def _ci(ci: Interval) -> str:
    return "—" if ci.low is None or ci.high is None else f"{ci.low:.3f}–{ci.high:.3f}"


def _row(name: str, a: Agreement) -> str:
    return (f"  {name:<28} n={a.n:<5} macro-F1 {_f(a.macro_f1)} [{_ci(a.macro_f1_ci)}]  "
            f"met P {_f(a.met.precision)} R {_f(a.met.recall)}  "
            f"not met P {_f(a.not_met.precision)} R {_f(a.not_met.recall)}")


def format_calibrations(calibrations: Sequence[Calibration]) -> str:
    """Per judge and template: macro-F1 with its interval, per-class precision and recall,
    accuracy, per axis (or category), and how many disagreements there are."""
    lines = []
    for c in calibrations:
        o = c.overall
        lines += [
            f"judge {c.judge_model} ({c.template} template), labels from {c.source}: "
            f"{o.n} labelled items",
            f"  macro-F1 {_f(o.macro_f1)} (95% CI {_ci(o.macro_f1_ci)}), "
            f"accuracy {_f(o.accuracy)}",
            f"  met:     precision {_f(o.met.precision)}  recall {_f(o.met.recall)}  "
            f"F1 {_f(o.met.f1)}  (support {o.met.support})",
            f"  not met: precision {_f(o.not_met.precision)}  recall {_f(o.not_met.recall)}  "
            f"F1 {_f(o.not_met.f1)}  (support {o.not_met.support})",
        ]
        if c.per_axis:
            lines.append("  per " + ("category" if c.source == "meta_eval" else "axis") + ":")
            lines += [_row(name, a) for name, a in c.per_axis.items()]
        lines.append(f"  disagreements: {len(c.disagreements)}"
                     + (f"; {c.n_unanswered} items without a verdict" if c.n_unanswered else ""))
    return "\n".join(lines)
