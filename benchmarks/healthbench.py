"""HealthBench on any endpoint: a model answers each example, a judge grades each rubric item.

    python benchmarks/healthbench.py --data FILE --model-url URL --judge-url URL --out DIR \\
        [--examples N] [--seed S] [--model NAME] [--judge-model NAME] [--template split|healthbench]
        [--model-key KEY] [--judge-key KEY]

Both URLs are OpenAI-compatible base URLs ending in /v1 (our server, vLLM, a hosted API); one
server can be both. `--examples N` samples N rows with `--seed`, as simple-evals does. Writes to
DIR: `metrics.json` (simple-evals metric names: `overall_score`, `axis:*`, `theme:*`, each with
`:n_samples` and `:bootstrap_std`, plus `n_unparseable`), `verdicts.jsonl` (one line per rubric
item: `prompt_id`, `criterion`, `points`, `tags`, `criteria_met` or null when there is no verdict,
the judge's `explanation`, and `error`, the server's message, when the judge call failed) and
`report.md` (the headline score, sub-scores, failures by cause, a few graded examples).

A failed call is retried only when trying again can help (no answer, 429, 5xx); a 4xx such as a
prompt longer than the judge's context is reported with the server's message, not retried. An
example whose model call fails is left out and counted in the report with its cause.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from tqdm import tqdm

from clinicloop.errors import UserError
from clinicloop.verifier.client import (
    FALLBACK_KEY_ENV,
    TRAFFIC_NOTE,
    ChatClient,
    ChatError,
    key_env,
    open_client,
)
from clinicloop.verifier.judge import Judge, Verdict
from clinicloop.verifier.rubrics import Example, read_jsonl
from clinicloop.verifier.score_logs import sub_score_names
from clinicloop.verifier.scoring import ExampleGrades, aggregate, score_example

MODEL_ATTEMPTS = 3
REPORT_EXAMPLES = 3
_SNIPPET_CHARS = 600


class Graded(BaseModel):
    example: Example
    response: str
    verdicts: list[Verdict]

    @property
    def grades(self) -> ExampleGrades:
        return ExampleGrades(prompt_id=self.example.prompt_id,
                             example_tags=self.example.example_tags, items=self.example.rubrics,
                             met=[v.criteria_met for v in self.verdicts])


class Outcome(BaseModel):
    graded: list[Graded]
    failed: dict[str, int]  # examples left out, by why the model call failed
    wall_s: float
    model: str
    judge_model: str


def sample(examples: list[Example], n: int | None, seed: int) -> list[Example]:
    if n is None or n >= len(examples):
        return examples
    return random.Random(seed).sample(examples, n)


async def answer(model: ChatClient, example: Example, max_tokens: int) -> str | ChatError:
    """The model's response, or why it failed: retried only while trying again can help."""
    for attempt in range(MODEL_ATTEMPTS):
        try:
            return await model.chat(example.prompt, max_tokens=max_tokens, temperature=0.0,
                                    seed=attempt)
        except ChatError as exc:
            error = exc
            if not exc.retryable:
                break
    return error


async def run(args: argparse.Namespace) -> Outcome:
    examples = sample(list(read_jsonl(args.data)), args.examples, args.seed)
    started = time.perf_counter()
    async with open_client(args.model_url, api_key=args.model_key, key_option="--model-key",
                           model=args.model, concurrency=args.concurrency) as model, \
            open_client(args.judge_url, api_key=args.judge_key, key_option="--judge-key",
                        model=args.judge_model, concurrency=args.concurrency) as judge_client:
        judge = Judge(judge_client, template=args.template, concurrency=args.concurrency)
        with tqdm(total=len(examples), unit="example", desc="healthbench") as bar:

            async def one(example: Example) -> Graded | ChatError:
                response = await answer(model, example, args.max_tokens)
                graded = response if isinstance(response, ChatError) else Graded(
                    example=example, response=response,
                    verdicts=await judge.grade_all(example.prompt, response, example.rubrics))
                bar.update(1)
                return graded

            results = await asyncio.gather(*map(one, examples))
    return Outcome(graded=[g for g in results if isinstance(g, Graded)],
                   failed=dict(Counter(str(e) for e in results if isinstance(e, ChatError))),
                   model=model.model, judge_model=judge_client.model,
                   wall_s=time.perf_counter() - started)


def verdict_lines(graded: list[Graded]) -> list[str]:
    return [json.dumps({"prompt_id": g.example.prompt_id, "criterion": item.criterion,
                        "points": item.points, "tags": item.tags,
                        "criteria_met": verdict.criteria_met,
                        "explanation": verdict.explanation, "error": verdict.error},
                       ensure_ascii=False)
            for g in graded for item, verdict in zip(g.example.rubrics, g.verdicts, strict=True)]


def _last_user(prompt: list[dict[str, Any]]) -> str:
    text = next((m.get("content") for m in reversed(prompt) if m.get("role") == "user"), "")
    return str(text)


def _snip(text: str) -> str:
    return text if len(text) <= _SNIPPET_CHARS else text[:_SNIPPET_CHARS] + " …"


def _one_line(text: str) -> str:
    return _snip(" ".join(text.split()))  # HealthBench's cluster criteria span many lines


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in (_snip(text).splitlines() or [""]))


def report(args: argparse.Namespace, metrics: dict[str, float], outcome: Outcome) -> str:
    graded, failed, wall_s = outcome.graded, sum(outcome.failed.values()), outcome.wall_s
    n_verdicts = sum(len(g.verdicts) for g in graded)
    judge_errors = Counter(v.error for g in graded for v in g.verdicts if v.error is not None)
    overall = metrics.get("overall_score")
    headline = "n/a (no example had a gradable positive item)" if overall is None else \
        f"**{overall:.3f}** ± {metrics['overall_score:bootstrap_std']:.3f} (bootstrap std)"
    lines = [
        "# HealthBench report", "",
        f"- data: `{args.data}`, {len(graded)} examples graded"
        + (f", {failed} left out (model call failed)" if failed else ""),
        f"- model: {outcome.model} at {args.model_url}",
        f"- judge: {outcome.judge_model} at {args.judge_url}, `{args.template}` template",
        f"- verdicts: {n_verdicts}, {metrics.get('n_unparseable', 0):.0f} without a verdict "
        f"({sum(judge_errors.values())} failed judge calls); wall time {wall_s:.1f} s "
        f"({n_verdicts / wall_s if wall_s else 0:.2f} verdicts/s)",
        *[f"- model call failed ×{n}: {_one_line(cause)}" for cause, n in outcome.failed.items()],
        *[f"- judge call failed ×{n}: {_one_line(cause)}" for cause, n in judge_errors.items()],
        "", f"Overall score: {headline}", "",
        "| metric | score | bootstrap std | n |", "|---|---|---|---|",
    ]
    lines += [f"| {name} | {metrics[name]:.3f} | {metrics[name + ':bootstrap_std']:.3f} | "
              f"{metrics[name + ':n_samples']:.0f} |" for name in sub_score_names(metrics)]
    for g in graded[:REPORT_EXAMPLES]:
        score = score_example(g.example.rubrics, g.grades.met)
        lines += ["", f"## {g.example.prompt_id}: score "
                  + ("n/a" if score is None else f"{score:.2f}"), "",
                  "User:", "", _quote(_last_user(g.example.prompt)), "",
                  "Response:", "", _quote(g.response), ""]
        marks = {True: "met", False: "not met", None: "no verdict"}
        lines += [f"- [{item.points:+d}] {_one_line(item.criterion)} — **{marks[v.criteria_met]}**"
                  for item, v in zip(g.example.rubrics, g.verdicts, strict=True)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=TRAFFIC_NOTE)
    parser.add_argument("--data", type=Path, required=True, help="HealthBench-format JSONL.")
    parser.add_argument("--model-url", required=True, help="The answering model's /v1 URL.")
    parser.add_argument("--judge-url", required=True, help="The judge's /v1 URL.")
    parser.add_argument("--out", type=Path, required=True, help="Directory for the results.")
    parser.add_argument("--examples", type=int, default=None, help="Sample this many rows.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="Model name (default: the URL's first).")
    parser.add_argument("--judge-model", default=None, help="Judge model name (likewise).")
    parser.add_argument("--template", choices=["split", "healthbench"], default="split")
    parser.add_argument("--max-tokens", type=int, default=1024, help="Per model response.")
    parser.add_argument("--concurrency", type=int, default=8, help="Requests in flight per URL.")
    for option, url in (("--model-key", "--model-url"), ("--judge-key", "--judge-url")):
        parser.add_argument(option, default=None, help=f"API key for {url} (default: the first "
                            f"of ${key_env(option)}, ${', $'.join(FALLBACK_KEY_ENV)} set).")
    args = parser.parse_args(argv)

    print(TRAFFIC_NOTE, file=sys.stderr)
    try:
        outcome = asyncio.run(run(args))
    except UserError as exc:
        sys.exit(f"healthbench: {exc}")
    metrics = aggregate([g.grades for g in outcome.graded])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    lines = verdict_lines(outcome.graded)
    (args.out / "verdicts.jsonl").write_text("".join(line + "\n" for line in lines))
    text = report(args, metrics, outcome)
    (args.out / "report.md").write_text(text)
    print(text.split("\n## ")[0], end="")  # the examples stay in the file


if __name__ == "__main__":
    main()
