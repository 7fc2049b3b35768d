"""What `store.durability=ack` costs: output tok/s of the same clinicloop server with `ack` and with
`async` logging, at one concurrency, on the `bench` tiny model, on two workloads: `chat` (short
turns, what apps send: ~24 prompt tokens, 16 output tokens) and `long` (~128 prompt tokens, 64
output tokens). `ack` holds each response's last byte until its record is on disk, a cost per
response, so short turns are where it shows.

Two servers (one per mode, same GGUF, one llama.cpp thread, `--concurrency` slots, each with its own
SQLite store and spool in a scratch directory, deleted afterwards: the benchmark's traffic is
stored nowhere else) get the same `serve_bench.py` random prompts. Runs alternate, the order
rotating by repeat, so load from other users of the machine falls on both alike; each mode's figure
is the median over `--repeats`, after one unmeasured warm-up run per server (the first run of a
fresh server is slower). The target, per workload: `ack` output tok/s >= 0.95x `async`'s. After the
runs, each server's log counters (inserted, ack timeouts, dead-lettered, dropped) show that every
request was logged.

    python benchmarks/durability_bench.py --repeats 6 --concurrency 8 --out var/durability_bench

It prints a table and writes `durability.json` and `durability.md` under `--out`, with the
servers' logs under `--out`/logs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import httpx
from peers import ROOT, Peer, bench_gguf, clinicloop_spec, start, stop
from pydantic import BaseModel
from serve_bench import RunResult, run_workload

MODES = ("ack", "async")
#: name: (prompt tokens, output tokens)
WORKLOADS = {"chat": (24, 16), "long": (128, 64)}
TARGET = 0.95
COUNTERS = ("inserted", "spooled", "dead_lettered", "dropped", "ack_timeouts")


class ModeRow(BaseModel):
    workload: str
    mode: str
    repeats: int
    output_tok_s: list[float]
    median_output_tok_s: float
    median_e2e_ms: float
    median_ttft_ms: float
    failed: int
    log: dict[str, float]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, default=None, help="default: the bench tiny model, q8_0")
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--workloads", default="chat,long",
                   help=f"comma-separated, of {', '.join(WORKLOADS)}")
    p.add_argument("--n-ctx", type=int, default=512)
    p.add_argument("--out", type=Path, default=ROOT / "var" / "durability_bench")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not args.workloads or set(args.workloads) - set(WORKLOADS):
        p.error(f"--workloads takes some of {', '.join(WORKLOADS)}")
    return args


def log_counters(peer: Peer, requests: int) -> dict[str, float]:
    """The server's `clinicloop:log_*` gauges, by short name, once `requests` records are in (an
    `async` writer may still hold the last ones for `flush_interval_s`) or after 10 s."""
    end = time.monotonic() + 10
    while True:
        text = httpx.get(f"http://127.0.0.1:{peer.port}/metrics", timeout=10).text
        values: dict[str, float] = {}
        for line in text.splitlines():
            for name in COUNTERS:
                if line.startswith((f"clinicloop:log_records_{name}{{",
                                    f"clinicloop:log_{name}{{")):
                    values[name] = float(line.rsplit(" ", 1)[1])
        if values.get("inserted", 0) >= requests or time.monotonic() > end:
            return values
        time.sleep(0.1)


async def measure(peers: dict[str, Peer], args: argparse.Namespace,
                  ) -> dict[tuple[str, str], list[RunResult]]:
    """Runs by (workload, mode)."""
    runs: dict[tuple[str, str], list[RunResult]] = {}
    for mode in MODES:  # warm-up, not measured
        await run_workload(peers[mode].v1, "random", args.concurrency,
                           num_prompts=args.concurrency, input_len=64, output_len=32,
                           seed=10_000, progress=False)
    for workload in args.workloads:
        input_len, output_len = WORKLOADS[workload]
        for repeat in range(args.repeats):
            order = MODES if repeat % 2 == 0 else MODES[::-1]
            for mode in order:
                result = await run_workload(
                    peers[mode].v1, "random", args.concurrency, num_prompts=args.num_prompts,
                    input_len=input_len, output_len=output_len, seed=repeat,
                    progress=args.progress)
                runs.setdefault((workload, mode), []).append(result)
                print(f"{workload} repeat {repeat + 1}/{args.repeats} {mode:5s} "
                      f"{result.output_throughput:7.1f} tok/s", file=sys.stderr)
    return runs


def row(workload: str, mode: str, results: list[RunResult], log: dict[str, float]) -> ModeRow:
    return ModeRow(
        workload=workload, mode=mode, repeats=len(results),
        output_tok_s=[r.output_throughput for r in results],
        median_output_tok_s=statistics.median(r.output_throughput for r in results),
        median_e2e_ms=statistics.median(r.e2e_ms["median"] for r in results),
        median_ttft_ms=statistics.median(r.ttft_ms["median"] for r in results),
        failed=sum(r.failed for r in results), log=log)


def table(rows: list[ModeRow], ratios: dict[str, float]) -> str:
    lines = ["| workload | durability | output tok/s (median) | runs | e2e median ms "
             "| TTFT median ms | failed |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        runs = ", ".join(f"{v:.1f}" for v in r.output_tok_s)
        lines.append(f"| {r.workload} | {r.mode} | {r.median_output_tok_s:.1f} | {runs} "
                     f"| {r.median_e2e_ms:.1f} | {r.median_ttft_ms:.1f} | {r.failed} |")
    lines.append("")
    for workload, ratio in ratios.items():
        verdict = "PASS" if ratio >= TARGET else "MISS"
        lines.append(f"- {workload}: ack / async output tok/s **{ratio:.3f}** "
                     f"(target >= {TARGET}): {verdict}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    gguf = bench_gguf(args.gguf, args.progress)
    log_dir = args.out.resolve() / "logs"
    peers: dict[str, Peer] = {}
    with tempfile.TemporaryDirectory(prefix="durability-bench-") as scratch:
        try:
            for mode in MODES:
                workdir = Path(scratch) / mode
                workdir.mkdir()
                spec = clinicloop_spec(gguf, workdir, args.n_ctx, args.concurrency,
                                       {"CLINICLOOP_STORE__DURABILITY": mode})
                peers[mode] = start(spec, workdir, log_dir / mode)
            runs = asyncio.run(measure(peers, args))
            # warm-up included
            requests = args.concurrency + len(args.workloads) * args.repeats * args.num_prompts
            logs = {mode: log_counters(peer, requests) for mode, peer in peers.items()}
        finally:
            for peer in peers.values():
                stop(peer)
    rows = [row(workload, mode, results, logs[mode]) for (workload, mode), results in runs.items()]
    medians = {(r.workload, r.mode): r.median_output_tok_s for r in rows}
    ratios = {w: medians[w, "ack"] / medians[w, "async"] for w in args.workloads}
    passed = all(ratio >= TARGET for ratio in ratios.values())
    machine = {"platform": platform.platform(), "cpus": os.cpu_count()}
    counters = "; ".join(f"{mode}: " + ", ".join(f"{k} {v:.0f}" for k, v in logs[mode].items())
                         for mode in MODES)
    report = "\n".join([
        f"# Logging durability cost, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC", "",
        f"Model `{gguf.name}`, {machine['cpus']} CPUs, one llama.cpp thread, concurrency "
        f"{args.concurrency}, {args.num_prompts} prompts per run (prompt/output tokens: "
        + ", ".join(f"{w} {WORKLOADS[w][0]}/{WORKLOADS[w][1]}" for w in args.workloads)
        + f"), SQLite store, median of {args.repeats} alternating repeats.", "",
        table(rows, ratios), "", f"Log counters after the runs: {counters}.", "",
    ])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "durability.md").write_text(report)
    (args.out / "durability.json").write_text(json.dumps({
        "created": datetime.now(UTC).isoformat(), "machine": machine, "gguf": str(gguf),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "target": TARGET, "ratios": ratios, "passed": passed, "log": logs,
        "rows": [r.model_dump() for r in rows],
        "runs": {f"{w}/{m}": [r.model_dump(mode="json", exclude={"requests", "texts"}) for r in rs]
                 for (w, m), rs in runs.items()},
    }, indent=1))
    print(report)
    print(f"wrote {args.out / 'durability.json'} and {args.out / 'durability.md'}")
    return 0 if all(r.failed == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
