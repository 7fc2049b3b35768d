"""Redaction time on hostile text: for every PHI rule, 1 MiB built to be slow for it, through the
whole redactor, against a limit (1 s).

The log writer redacts every record before it is stored, so a message that makes one rule slow
stalls logging for everyone (a backtracking rule once froze the server for 40 s on 20 kB). For
each rule of `clinicloop.store.redact`, `hostile_shapes` builds texts from the rule's example:
the example over and over (every one a match to replace), near misses, its characters repeated
into one long token ("Best,\\nGretchennnn…"), a seeded mix of its pieces; `generic_shapes` adds
long runs of word characters, dots, digits, spaces, capitalised words, "@", "-" and a mix. Each
text is timed through `redact()` (all rules, as the writer runs them), best of `--repeats`.

Run: python benchmarks/redact_bench.py [--size 1048576] [--limit-s 1.0] [--repeats 1] --out FILE
Prints one line per rule as it goes, then a table; writes the results as JSON to FILE; exits 1
if any text took longer than the limit.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from pathlib import Path

from pydantic import BaseModel

from clinicloop.store.redact import RULES, redact
from clinicloop.store.redact_eval import generic_shapes, hostile_shapes


class RuleTiming(BaseModel):
    rule: int | None  # index in RULES; None for the generic shapes
    label: str
    example: str
    seconds: dict[str, float]  # shape -> best time
    worst_shape: str
    worst_s: float


class BenchResult(BaseModel):
    size_chars: int
    limit_s: float
    repeats: int
    rules: list[RuleTiming]
    worst_s: float
    ok: bool
    python: str
    machine: str
    cpus: int | None


def best_time(text: str, repeats: int) -> float:
    """The fastest of `repeats` runs of `redact(text)`, with the garbage collector paused."""
    best = float("inf")
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            redact(text)
            best = min(best, time.perf_counter() - start)
    finally:
        gc.enable()
    return best


def timing(rule: int | None, label: str, example: str, shapes: dict[str, str],
           repeats: int) -> RuleTiming:
    seconds = {name: round(best_time(text, repeats), 4) for name, text in shapes.items()}
    worst = max(seconds, key=lambda name: seconds[name])
    return RuleTiming(rule=rule, label=label, example=example, seconds=seconds,
                      worst_shape=worst, worst_s=seconds[worst])


def run(size: int, limit_s: float, repeats: int) -> BenchResult:
    timings: list[RuleTiming] = []
    jobs = [(i, rule.label, rule.example, hostile_shapes(rule, size))
            for i, rule in enumerate(RULES)]
    jobs.append((None, "any", "", generic_shapes(size)))
    for index, label, example, shapes in jobs:
        result = timing(index, label, example, shapes, repeats)
        timings.append(result)
        print(f"rule {'-' if index is None else index:>2} {label:<8} worst {result.worst_s:.3f}s"
              f" ({result.worst_shape})", file=sys.stderr, flush=True)
    worst = max(t.worst_s for t in timings)
    return BenchResult(size_chars=size, limit_s=limit_s, repeats=repeats, rules=timings,
                       worst_s=worst, ok=worst < limit_s, python=platform.python_version(),
                       machine=platform.processor() or platform.machine(), cpus=os.cpu_count())


def table(result: BenchResult) -> str:
    rows = [f"{'rule':>4}  {'kind':<8} {'example':<36} {'worst shape':<12} {'seconds':>7}"]
    for t in result.rules:
        index = "-" if t.rule is None else str(t.rule)
        rows.append(f"{index:>4}  {t.label:<8} {t.example[:36]!r:<36} {t.worst_shape[:12]:<12}"
                    f" {t.worst_s:>7.3f}")
    verdict = "ok" if result.ok else "TOO SLOW"
    rows.append(f"worst {result.worst_s:.3f}s for {result.size_chars} characters, limit "
                f"{result.limit_s:.3f}s: {verdict}")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1 << 20, help="characters per text")
    parser.add_argument("--limit-s", type=float, default=1.0, help="most seconds for one text")
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs")
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON")
    args = parser.parse_args()
    result = run(args.size, args.limit_s, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(result.model_dump_json(indent=2))
    print(table(result))
    sys.exit(0 if result.ok else 1)


if __name__ == "__main__":
    main()
