"""Scoring the logs (`clinicloop verify score`): rubric scores for the turns in the store.

For each answered turn (status ok) that matches the filters and has no score yet: the rubric of its
prompt (generated once per conversation prefix, then reused), one judge verdict per item, and the
turn's HealthBench score with per-tag sub-scores, all written back to the store. A run can be
killed at any point: the judge writes each verdict as it produces it (its cache is the `verdicts`
table, see `judge.StoreVerdictCache`), so a re-run judges only what is missing, and a turn counts
as done once its `turn_scores` row exists (written here).

A turn is graded with its tool calls: the reply's own (`LoggedChoice.tool_calls`; a reply that is
only a call, with no text, is graded like any other) and those and their results in the history,
which reach the judge as logged.

Verdicts are keyed by content (conversation, response and its calls, item, judge model, template),
so two turns with identical text share one verdict row: the second is graded from the first's
verdicts (or, graded at the same time, writes the same row). Only client turns are scored: the
store leaves out service traffic (the judge's, the simulator's, benchmarks'). One turn failing
stops the run at once, with the others cancelled, instead of leaving them running.

Several scorers can run at once on one store: each page of turns is claimed first
(`store.claims`: a turn another scorer holds is skipped, one whose claim expired is taken over)
and released once graded, and `shard` limits a scorer to one slice of the turns (an Indexed Job).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Coroutine, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, Field
from tqdm import tqdm

from clinicloop.store.claims import (
    Shard,
    claim_turns,
    count_claimable,
    default_worker,
    release_claims,
)
from clinicloop.store.db import Store, TurnScore
from clinicloop.store.records import TurnRecord
from clinicloop.verifier.client import open_client
from clinicloop.verifier.generator import RubricGenerator
from clinicloop.verifier.judge import Judge, StoreVerdictCache, Template, Verdict, verdict_key
from clinicloop.verifier.rubrics import RubricItem
from clinicloop.verifier.scoring import ExampleGrades, aggregate, example_metrics, score_example

PAGE = 64  # turns claimed from the store, and graded concurrently, at a time
LEASE_S = 900.0  # how long a claim keeps other scorers off a turn
T = TypeVar("T")


class ScoreSummary(BaseModel):
    judge_model: str
    template: str
    worker: str = Field(description="This scorer's name, on its claims.")
    shard: str | None = Field(None, description="I/N: the run took only shard I of N.")
    n_turns: int = Field(description="Turns graded in this run.")
    n_scored: int = Field(description="Of them, turns with a score (a positive item was graded).")
    n_verdicts: int
    n_judged: int = Field(description="Verdicts the judge model was asked for in this run.")
    n_cached: int = Field(description="Verdicts found in the store from an earlier run.")
    n_unparseable: int = Field(description="Verdicts without an answer: unparseable or failed.")
    errors: dict[str, int] = Field(description="Failed judge calls by the server's message.")
    n_rubric_errors: int = Field(description="Turns whose rubric generation failed: graded on "
                                             "their rule items only.")
    score: float | None = Field(description="overall_score: the mean turn score, clipped to [0,1].")
    metrics: dict[str, float] = Field(description="`aggregate`'s simple-evals metrics.")
    wall_s: float
    verdicts_per_s: float = Field(description="n_judged per second of wall time, rubric "
                                              "generation included.")


async def _score_turn(turn: TurnRecord, items: list[RubricItem], store: Store, judge: Judge,
                      cache: StoreVerdictCache, bar: tqdm) -> tuple[ExampleGrades, list[Verdict]]:
    conversation, response = turn.messages, turn.response or ""
    calls = turn.tool_calls
    model = judge.client.model
    keys = [verdict_key(conversation, response, item, model, judge.template, calls)
            for item in items]
    cache.expect(turn.id, keys, items, model, judge.template)
    try:
        verdicts = await judge.grade_all(conversation, response, items, tool_calls=calls)
    finally:
        cache.forget(keys)
    grades = ExampleGrades(prompt_id=turn.id, example_tags=[], items=items,
                           met=[v.criteria_met for v in verdicts])
    await asyncio.to_thread(store.put_turn_score, TurnScore(
        turn_id=turn.id, score=score_example(items, grades.met), metrics=example_metrics(grades),
        n_items=len(items), n_unparseable=sum(m is None for m in grades.met),
        red_flags=sum(i.points < 0 and m is True for i, m in zip(items, grades.met, strict=True)),
        judge_model=model))
    bar.update(1)
    return grades, verdicts


async def _all(coroutines: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Run concurrently, results in order. The first failure cancels the others, waits for them
    to stop (nothing keeps using the engine behind the caller's back) and is raised as itself."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in coroutines]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [t.result() for t in tasks]


async def score_logs(store: Store, judge: Judge, generator: RubricGenerator, *,
                     since: datetime | None = None, model_version: str | None = None,
                     only_unscored: bool = True, limit: int | None = None,
                     worker: str | None = None, lease_s: float = LEASE_S,
                     shard: Shard | None = None, page_size: int = PAGE,
                     progress: bool = True) -> ScoreSummary:
    """Score the store's turns with `judge`, whose cache must be a `StoreVerdictCache(store)`.

    Pages of `page_size` turns are claimed as `worker` (default `<hostname>-<pid>`) for
    `lease_s`, from `shard` only if given; smaller pages spread turns more evenly over scorers.
    """
    cache = judge.cache
    if not isinstance(cache, StoreVerdictCache) or cache.store is not store:
        raise ValueError("score_logs needs a Judge built with cache=StoreVerdictCache(store)")
    worker = worker or default_worker()
    filters: dict[str, Any] = {"since": since, "model_version": model_version,
                               "only_unscored": only_unscored, "shard": shard}
    total = await asyncio.to_thread(count_claimable, store, **filters)
    total = total if limit is None else min(total, limit)
    started = time.perf_counter()
    grades: list[ExampleGrades] = []
    verdicts: list[Verdict] = []
    after: tuple[datetime, str] | None = None
    rubric_errors = 0
    with tqdm(total=total, disable=not progress, unit="turn", desc="scoring") as bar:

        while len(grades) < total:
            page = await asyncio.to_thread(
                claim_turns, store, worker, lease_s=lease_s, after=after,
                limit=min(page_size, total - len(grades)), **filters)
            if not page:
                break
            after = (page[-1].created_at, page[-1].id)
            try:
                # All of a page's rubrics first: on a one-sequence engine, a rubric request
                # between two verdicts of one conversation would evict the prefix they share.
                rubrics = await _all(generator.for_conversation(t.messages) for t in page)
                rubric_errors += sum(r.error is not None for r in rubrics)
                graded = await _all(_score_turn(t, r.items, store, judge, cache, bar)
                                    for t, r in zip(page, rubrics, strict=True))
            finally:
                await asyncio.to_thread(release_claims, store, worker, [t.id for t in page])
            for turn_grades, turn_verdicts in graded:
                grades.append(turn_grades)
                verdicts.extend(turn_verdicts)
    wall_s = time.perf_counter() - started
    metrics = aggregate(grades) if grades else {}
    judged = sum(v.source in ("llm", "unparseable", "error") for v in verdicts)
    return ScoreSummary(
        judge_model=judge.client.model, template=judge.template, worker=worker,
        shard=None if shard is None else str(shard), n_turns=len(grades),
        n_scored=sum(score_example(g.items, g.met) is not None for g in grades),
        n_verdicts=len(verdicts), n_judged=judged,
        n_cached=sum(v.source == "cache" for v in verdicts),
        n_unparseable=sum(v.criteria_met is None for v in verdicts),
        errors=dict(Counter(v.error for v in verdicts if v.error is not None)),
        n_rubric_errors=rubric_errors,
        score=metrics.get("overall_score"), metrics=metrics, wall_s=wall_s,
        verdicts_per_s=judged / wall_s if wall_s > 0 else 0.0)


def format_summary(summary: ScoreSummary) -> str:
    """The human summary: headline figures, then each sub-score with its sample count."""
    score = "n/a" if summary.score is None else (
        f"{summary.score:.3f} ± {summary.metrics['overall_score:bootstrap_std']:.3f}")
    lines = [
        f"judge {summary.judge_model} ({summary.template} template)",
        f"worker {summary.worker}" + (f", shard {summary.shard}" if summary.shard else ""),
        f"turns scored: {summary.n_turns} ({summary.n_scored} with a score)",
        f"score: {score}",
        f"verdicts: {summary.n_verdicts} ({summary.n_judged} judged, {summary.n_cached} cached, "
        f"{summary.n_unparseable} unanswered: unparseable or failed), "
        f"{summary.n_rubric_errors} rubric errors",
        f"wall time: {summary.wall_s:.1f} s, {summary.verdicts_per_s:.2f} verdicts/s",
    ]
    lines += [f"  judge error x{n}: {message}" for message, n in summary.errors.items()]
    lines += [f"  {name:<40} {summary.metrics[name]:.3f}  "
              f"(n={summary.metrics[name + ':n_samples']:.0f})"
              for name in sub_score_names(summary.metrics)]
    return "\n".join(lines)


def sub_score_names(metrics: dict[str, float]) -> list[str]:
    """The sub-scores (`axis:*`, `theme:*`, `dimension:*`, ...) of an `aggregate` result."""
    return sorted(k for k in metrics if ":" in k and not k.endswith(("n_samples", "bootstrap_std")))


async def _score(store: Store, judge_url: str | None, judge_key: str | None,
                 template: Template, models_dir: Path, **filters: Any) -> ScoreSummary:
    async with open_client(judge_url, api_key=judge_key, key_option="--judge-key",
                           models_dir=models_dir) as client:
        # One sequence at a time in-process: a second conversation would evict the prefix cache.
        judge = Judge(client, template=template, cache=StoreVerdictCache(store),
                      concurrency=8 if judge_url else 1)
        return await score_logs(store, judge, RubricGenerator(client, store=store), **filters)


def score_store(store_url: str, judge_url: str | None, *, models_dir: Path,
                judge_key: str | None = None, template: Template = "split",
                since: datetime | None = None, model_version: str | None = None,
                limit: int | None = None, worker: str | None = None, lease_s: float = LEASE_S,
                shard: Shard | None = None, page_size: int = PAGE,
                out: Path | None = None) -> ScoreSummary:
    """Score the unscored turns of the store at `store_url` (its schema upgraded first).

    `judge_url` is an OpenAI-compatible base URL ending in /v1 (None: the tiny model in-process,
    from `models_dir`), `judge_key` its API key (None: from the environment, see
    `client.resolve_key`). `worker`, `lease_s`, `shard`, `page_size`: as in `score_logs`.
    `out`: where the summary is written as JSON.
    """
    store = Store(store_url)
    try:
        store.migrate()
        summary = asyncio.run(_score(store, judge_url, judge_key, template, models_dir,
                                     since=since, model_version=model_version, limit=limit,
                                     worker=worker, lease_s=lease_s, shard=shard,
                                     page_size=page_size))
    finally:
        store.dispose()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(summary.model_dump_json(indent=2) + "\n")
    return summary
