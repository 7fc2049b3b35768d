"""clinicloop against llama.cpp's two servers on the same GGUF: `python -m llama_cpp.server`
(llama-cpp-python's, one request at a time) and llama.cpp's C++ `llama-server` (continuous
batching, `--slots` slots; build it once with `make llama-server`, else it is skipped with a note).

Every server runs with one llama.cpp thread and `--n-ctx` tokens per sequence, and gets the same
`serve_bench.py` workloads, prompts and seed, greedy. Runs alternate: each (workload, concurrency,
repeat) cell runs against every server before the next cell starts, the server order rotating by
repeat, so load from other users of the machine falls on all of them alike; `--repeats` reports the
median. Each cell has its own seed (the same for every server), so no run finds its prompts already
in a server's prefix cache from an earlier cell. `ignore_eos` goes only to servers that honour it;
llama_cpp.server drops it silently, so its requests may stop early (see "tok/req").

The targets, as clinicloop / peer ratios, each PASS or MISS:
- random, lowest concurrency: output tok/s >= 0.9x llama-server's;
- random, chat and multiturn, every concurrency of 8 or more: output tok/s >= 1.0x llama-server's;
- random, chat and multiturn: clinicloop's output tok/s never falls as concurrency rises (each
  level >= 0.97x the level below: the 3% is run-to-run noise on this machine, see the README);
- random, highest concurrency: p99 TTFT <= 2x llama-server's;
- multiturn, lowest concurrency: mean TTFT of the last turn <= 0.5x llama_cpp.server's (at c=1
  TTFT is prefill alone, so this measures prefix reuse, not queueing);
- quote, lowest concurrency: with `--draft-env` (e.g. CLINICLOOP_ENGINE__SPECULATIVE__MODE=ngram)
  a second clinicloop, "clinicloop+draft", runs the quote workload; its output tok/s >= 1.5x
  clinicloop's, and its texts identical. Without `--draft-env` that row is "not run".

Run (about 6 minutes a repeat with the defaults on a 2-core box):
    make llama-server   # once per machine, optional
    python benchmarks/compare_llamacpp_server.py --repeats 3 \
        --draft-env CLINICLOOP_ENGINE__SPECULATIVE__MODE=ngram --out var/compare
It prints the targets and a table of every server x workload x concurrency, and writes
`compare.json` (rows, targets, every run without per-request records) and `compare.md` under
`--out`, with the servers' logs under `--out`/logs.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import httpx
from peers import (
    Peer,
    PeerSpec,
    bench_gguf,
    clinicloop_spec,
    llama_cpp_python_spec,
    llama_server_bin,
    llama_server_spec,
    start,
    stop,
)
from pydantic import BaseModel
from serve_bench import WORKLOADS, RunResult, add_workload_args, parse_csv, run_workload
from tqdm import tqdm

CLINICLOOP, LCPP_PY, LLAMA_SERVER = "clinicloop", "llama_cpp.server", "llama-server"
DRAFT = "clinicloop+draft"
SERVERS = (CLINICLOOP, LCPP_PY, LLAMA_SERVER)
Key = tuple[str, str, int]  # server, workload, concurrency
#: Workloads whose throughput is compared with llama-server's at every concurrency >= AT_SCALE.
SCALED = ("random", "chat", "multiturn")
AT_SCALE = 8
#: A concurrency level's throughput may be this much below the level under it (run-to-run noise).
NOISE = 0.03


class Row(BaseModel):
    """One server x workload x concurrency: medians over the repeats."""

    server: str
    workload: str
    concurrency: int
    repeats: int
    completed: int
    failed: int
    ignore_eos: bool
    output_tokens_per_request: float
    request_throughput: float
    output_throughput: float
    ttft_median_ms: float
    ttft_p99_ms: float
    tpot_median_ms: float
    tpot_p99_ms: float
    ttft_last_turn_ms: float | None  # multiturn: mean TTFT of the conversations' last turn


class Target(BaseModel):
    target: str
    rule: str
    measured: str
    ratio: float | None
    status: Literal["PASS", "MISS", "not run"]
    note: str = ""


def aggregate(server: str, runs: Sequence[RunResult]) -> Row:
    def med(metric: Callable[[RunResult], float]) -> float:
        return statistics.median(metric(r) for r in runs)

    last = runs[0].turns
    return Row(
        server=server, workload=runs[0].workload, concurrency=runs[0].concurrency,
        repeats=len(runs), completed=sum(r.completed for r in runs),
        failed=sum(r.failed for r in runs), ignore_eos=runs[0].ignore_eos,
        output_tokens_per_request=med(lambda r: r.total_output_tokens / max(r.completed, 1)),
        request_throughput=med(lambda r: r.request_throughput),
        output_throughput=med(lambda r: r.output_throughput),
        ttft_median_ms=med(lambda r: r.ttft_ms["median"]),
        ttft_p99_ms=med(lambda r: r.ttft_ms["p99"]),
        tpot_median_ms=med(lambda r: r.tpot_ms["median"]),
        tpot_p99_ms=med(lambda r: r.tpot_ms["p99"]),
        ttft_last_turn_ms=(med(lambda r: r.ttft_by_turn_ms.get(last, float("nan")))
                           if runs[0].workload == "multiturn" else None),
    )


def ratio_target(rows: dict[Key, Row], target: str, rule: str, peer: str, workload: str, c: int,
                 metric: Callable[[Row], float | None], unit: str, bound: float,
                 higher_is_better: bool, skipped: dict[str, str]) -> Target:
    ours, theirs = rows.get((CLINICLOOP, workload, c)), rows.get((peer, workload, c))
    if ours is None or theirs is None:
        missing = peer if ours is not None else CLINICLOOP
        why = "skipped (see Servers)" if missing in skipped else f"{workload} c={c} not in this run"
        return Target(target=target, rule=rule, measured="-", ratio=None, status="not run",
                      note=f"{missing}: {why}")
    a, b = metric(ours), metric(theirs)
    if a is None or b is None or not b:
        return Target(target=target, rule=rule, measured="-", ratio=None, status="not run",
                      note="no successful requests")
    ratio = a / b
    ok = ratio >= bound if higher_is_better else ratio <= bound
    notes = [f"{r.server}: {r.failed} failed requests" for r in (ours, theirs) if r.failed]
    return Target(target=target, rule=rule, measured=f"{a:.1f} vs {b:.1f} {unit}", ratio=ratio,
                  status="PASS" if ok and not ours.failed else "MISS", note="; ".join(notes))


def draft_target(rows: dict[Key, Row], runs: dict[Key, list[RunResult]], c: int,
                 draft_env: dict[str, str], skipped: dict[str, str]) -> Target:
    target, rule = f"quote c={c}: drafting on vs off", "on ≥ 1.5× off, identical text"
    off, on = rows.get((CLINICLOOP, "quote", c)), rows.get((DRAFT, "quote", c))
    if not draft_env or off is None or on is None:
        note = ("pass --draft-env KEY=VALUE" if not draft_env else
                f"{DRAFT}: skipped (see Servers)" if DRAFT in skipped else
                f"quote c={c} not in this run")
        return Target(target=target, rule=rule, measured="-", ratio=None, status="not run",
                      note=note)
    ratio = on.output_throughput / off.output_throughput if off.output_throughput else 0.0
    # Repeat k of each ran on the same prompts; a dropped run leaves the pairs that both made.
    pairs = [(a, b) for r_off, r_on in zip(runs[CLINICLOOP, "quote", c], runs[DRAFT, "quote", c],
                                           strict=False)
             for a, b in zip(r_off.texts, r_on.texts, strict=True)]
    differ = [i for i, (a, b) in enumerate(pairs) if a != b]
    first = ""
    if differ:
        a, b = pairs[differ[0]]
        at = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                  min(len(a), len(b)))
        first = f" (first: request {differ[0]}, from character {at})"
    notes = [f"{len(differ)} of {len(pairs)} texts differ{first}" if differ else
             f"all {len(pairs)} texts identical"]
    notes += [f"{r.server}: {r.failed} failed requests" for r in (off, on) if r.failed]
    ok = ratio >= 1.5 and not differ and not off.failed and not on.failed
    return Target(target=target, rule=rule,
                  measured=f"{on.output_throughput:.1f} vs {off.output_throughput:.1f} tok/s",
                  ratio=ratio, status="PASS" if ok else "MISS", note="; ".join(notes))


def monotone_target(rows: dict[Key, Row], workload: str, levels: Sequence[int]) -> Target:
    """clinicloop's output tok/s across `levels` (ascending): none below NOISE under the last."""
    target, rule = f"{workload}: throughput c={levels[0]}→{levels[-1]}", \
        f"never falls (each ≥ {1 - NOISE:.2f}× the level below)"
    got = [rows.get((CLINICLOOP, workload, c)) for c in levels]
    if len(levels) < 2 or any(r is None for r in got):
        return Target(target=target, rule=rule, measured="-", ratio=None, status="not run",
                      note=f"needs {workload} at two or more concurrencies")
    tps = [r.output_throughput for r in got if r is not None]
    steps = list(itertools.pairwise(zip(levels, tps, strict=True)))
    # A level with no output at all (every request failed) has no ratio to the next one.
    worst = min((b / a for (_, a), (_, b) in steps if a), default=0.0)
    falls = [f"c={lo}→{hi}" for (lo, a), (hi, b) in steps if b < (1 - NOISE) * a]
    falls += [f"c={c} (no output)" for c, t in zip(levels, tps, strict=True) if not t]
    return Target(target=target, rule=rule, measured=" → ".join(f"{t:.0f}" for t in tps),
                  ratio=worst, status="MISS" if falls else "PASS",
                  note=f"falls at {', '.join(falls)}" if falls else "")


def targets(rows: dict[Key, Row], runs: dict[Key, list[RunResult]], args: argparse.Namespace,
            skipped: dict[str, str]) -> list[Target]:
    levels = sorted(args.concurrency)
    lo, hi = levels[0], levels[-1]
    last = args.turns
    multiturn = ratio_target(
        rows, f"multiturn c={lo}: turn-{last} TTFT", "≤ 0.5× llama_cpp.server", LCPP_PY,
        "multiturn", lo, lambda r: r.ttft_last_turn_ms, "ms", 0.5, False, skipped)
    ours, theirs = rows.get((CLINICLOOP, "multiturn", lo)), rows.get((LCPP_PY, "multiturn", lo))
    # Each server's replies go into its own history, so shorter replies mean shorter last prompts.
    if ours and theirs and theirs.output_tokens_per_request < 0.9 * ours.output_tokens_per_request:
        multiturn.note = "; ".join(n for n in (multiturn.note, (
            f"{LCPP_PY} replies {theirs.output_tokens_per_request:.1f} tokens vs "
            f"{ours.output_tokens_per_request:.1f}: its last-turn prompts are shorter")) if n)
    scaled = [w for w in SCALED if w in args.workload]
    return [
        ratio_target(rows, f"random c={lo}: output tok/s", "≥ 0.9× llama-server", LLAMA_SERVER,
                     "random", lo, lambda r: r.output_throughput, "tok/s", 0.9, True, skipped),
        *(ratio_target(rows, f"{w} c={c}: output tok/s", "≥ 1.0× llama-server", LLAMA_SERVER,
                       w, c, lambda r: r.output_throughput, "tok/s", 1.0, True, skipped)
          for w in scaled for c in levels if c >= AT_SCALE),
        *(monotone_target(rows, w, levels) for w in scaled),
        ratio_target(rows, f"random c={hi}: p99 TTFT", "≤ 2× llama-server", LLAMA_SERVER,
                     "random", hi, lambda r: r.ttft_p99_ms, "ms", 2.0, False, skipped),
        multiturn,
        draft_target(rows, runs, lo, args.draft_env, skipped),
    ]


def targets_table(ts: Sequence[Target]) -> str:
    lines = ["| target | rule | clinicloop vs peer | ratio | result | note |",
             "|---|---|---|---:|---|---|"]
    lines += [f"| {t.target} | {t.rule} | {t.measured} | "
              f"{'-' if t.ratio is None else f'{t.ratio:.2f}×'} | {t.status} | {t.note} |"
              for t in ts]
    return "\n".join(lines)


def rows_table(rows: dict[Key, Row]) -> str:
    lines = ["| server | workload | c | ok/failed | tok/req | req/s | out tok/s | "
             "× llama-server | TTFT med/p99 ms | TPOT med/p99 ms | last-turn TTFT ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (server, workload, c), r in rows.items():
        top = rows.get((LLAMA_SERVER, workload, c))
        vs = f"{r.output_throughput / top.output_throughput:.2f}" if top and \
            top.output_throughput else "-"
        last = "-" if r.ttft_last_turn_ms is None else f"{r.ttft_last_turn_ms:.1f}"
        lines.append(
            f"| {server} | {workload} | {c} | {r.completed}/{r.failed} | "
            f"{r.output_tokens_per_request:.1f} | {r.request_throughput:.2f} | "
            f"{r.output_throughput:.1f} | {vs} | {r.ttft_median_ms:.1f}/{r.ttft_p99_ms:.1f} | "
            f"{r.tpot_median_ms:.2f}/{r.tpot_p99_ms:.2f} | {last} |")
    return "\n".join(lines)


def start_peers(args: argparse.Namespace, gguf: Path, scratch: Path,
                log_dir: Path) -> tuple[dict[str, Peer], dict[str, str]]:
    """Start the servers asked for; return those running and, for the rest, why not."""
    specs: list[PeerSpec] = []
    skipped: dict[str, str] = {}
    for name in args.servers:
        if name == CLINICLOOP:
            specs.append(clinicloop_spec(gguf, scratch / "clinicloop", args.n_ctx, args.slots,
                                         args.clinicloop_env))
            if args.draft_env and "quote" in args.workload:
                spec = clinicloop_spec(gguf, scratch / "clinicloop_draft", args.n_ctx,
                                       args.slots, {**args.clinicloop_env, **args.draft_env})
                specs.append(dataclasses.replace(spec, name=DRAFT))
        elif name == LCPP_PY:
            specs.append(llama_cpp_python_spec(gguf, args.n_ctx))
        else:
            binary, why = llama_server_bin()
            if binary is None:
                skipped[name] = why
                continue
            specs.append(llama_server_spec(binary, gguf, args.n_ctx, args.slots,
                                           args.llama_server_args))
    running: dict[str, Peer] = {}
    for spec in tqdm(specs, desc="starting servers", disable=not args.progress, file=sys.stderr):
        workdir = scratch / spec.dirname
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            running[spec.name] = start(spec, workdir, log_dir, args.startup_timeout)
        except RuntimeError as exc:
            if spec.name == CLINICLOOP:
                for peer in running.values():
                    stop(peer)
                raise
            skipped[spec.name] = str(exc).splitlines()[0]
    return running, skipped


async def measure(running: dict[str, Peer], args: argparse.Namespace,
                  skipped: dict[str, str]) -> dict[Key, list[RunResult]]:
    runs: dict[Key, list[RunResult]] = defaultdict(list)
    cells = [(w, c, rep) for w in args.workload for c in args.concurrency
             for rep in range(args.repeats)]

    def servers_for(workload: str) -> list[str]:
        return [n for n in running if n != DRAFT or workload == "quote"]

    bar = tqdm(total=sum(len(servers_for(w)) for w, _, _ in cells), desc="compare", unit="run",
               disable=not args.progress, file=sys.stderr)

    async def run(name: str, workload: str, c: int, num_prompts: int, output_len: int,
                  seed: int, progress: bool) -> RunResult | None:
        peer = running[name]
        try:
            return await run_workload(
                peer.v1, workload, c, num_prompts=num_prompts, input_len=args.input_len,
                output_len=output_len, turns=args.turns, seed=seed,
                ignore_eos=args.ignore_eos and peer.spec.accepts_ignore_eos,
                chat_max_tokens=args.chat_max_tokens, progress=progress)
        except httpx.HTTPError as exc:
            # A server that stopped answering is dropped; the comparison goes on without it.
            skipped[name] = f"stopped answering during {workload} c={c}: {exc!r}"
            return None

    # A first request pays for page faults and lazy allocations; no server is measured cold.
    for name in running:
        await run(name, "random", 1, 1, 8, args.seed - 1, False)
    for i, (workload, c, rep) in enumerate(cells):
        names = [n for n in servers_for(workload) if n not in skipped]
        shift = rep % max(len(names), 1)
        for name in names[shift:] + names[:shift]:
            bar.set_postfix_str(f"{name} {workload} c={c} repeat {rep + 1}")
            result = await run(name, workload, c, args.num_prompts, args.output_len,
                               args.seed + i, args.progress)
            if result is not None:
                runs[name, workload, c].append(result)
            bar.update()
    bar.close()
    return runs


def engine_env(peer: Peer) -> list[str]:
    """The clinicloop engine settings a server ran with (its store paths are scratch)."""
    return [f"{k}={v}" for k, v in peer.spec.env.items() if k.startswith("CLINICLOOP_ENGINE__")]


def parse_env(items: Sequence[str]) -> dict[str, str]:
    pairs = dict(item.split("=", 1) for item in items)
    if bad := [k for k in pairs if not k]:
        raise SystemExit(f"--*-env wants KEY=VALUE, got {bad}")
    return pairs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, default=None,
                   help="model every server loads (default: the bench tiny model's q8_0 GGUF)")
    p.add_argument("--servers", default=",".join(SERVERS),
                   help=f"comma-separated, of {', '.join(SERVERS)}")
    add_workload_args(p, workloads=",".join(WORKLOADS), concurrency="1,2,4,8,16")
    p.add_argument("--repeats", type=int, default=1, help="runs per cell; the median is reported")
    p.add_argument("--n-ctx", type=int, default=2048, help="context tokens per sequence")
    p.add_argument("--slots", type=int, default=8,
                   help="sequences decoded together: llama-server --parallel, clinicloop "
                   "engine.n_parallel")
    p.add_argument("--clinicloop-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for clinicloop (and clinicloop+draft)")
    p.add_argument("--draft-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment that turns drafting on, for the clinicloop+draft run")
    p.add_argument("--llama-server-args", default="", metavar="ARGS",
                   help="extra llama-server flags, split like a shell would (e.g. '-fa off': its "
                   "default '-fa auto' turns flash attention on for the CPU)")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="send ignore_eos to no server")
    p.add_argument("--startup-timeout", type=float, default=180.0, help="seconds per server")
    p.add_argument("--out", type=Path, default=Path("var/compare_llamacpp_server"))
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    args.servers = parse_csv(str, args.servers)
    args.workload = parse_csv(str, args.workload)
    args.concurrency = parse_csv(int, args.concurrency)
    if unknown := set(args.servers) - set(SERVERS) or set(args.workload) - set(WORKLOADS):
        p.error(f"unknown server or workload: {sorted(unknown)}")
    if CLINICLOOP not in args.servers:
        p.error("the comparison needs clinicloop in --servers")
    args.clinicloop_env = parse_env(args.clinicloop_env)
    args.draft_env = parse_env(args.draft_env)
    try:
        args.llama_server_args = shlex.split(args.llama_server_args)
    except ValueError as exc:  # an unclosed quote
        p.error(f"--llama-server-args: {exc}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    gguf = bench_gguf(args.gguf, args.progress)
    log_dir = args.out.resolve() / "logs"
    with tempfile.TemporaryDirectory(prefix="compare-llamacpp-") as scratch:
        running, skipped = start_peers(args, gguf, Path(scratch), log_dir)
        try:
            runs = asyncio.run(measure(running, args, skipped))
        finally:
            for peer in running.values():
                stop(peer)
    order = [*SERVERS, DRAFT]
    rows = {key: aggregate(key[0], runs[key]) for key in sorted(
        runs, key=lambda k: (args.workload.index(k[1]), k[2], order.index(k[0])))}
    ts = targets(rows, runs, args, skipped)

    notes = [f"- {name} skipped: {why}" for name, why in skipped.items()]
    notes += [f"- {name}: `{' '.join([*engine_env(peer), *peer.command])}`"
              f"{'' if peer.spec.accepts_ignore_eos else ' (ignore_eos not honoured)'}"
              for name, peer in running.items()]
    machine = {"platform": platform.platform(), "processor": platform.processor(),
               "cpus": os.cpu_count()}
    report = "\n".join([
        f"# clinicloop vs llama.cpp servers, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"Model `{gguf.name}`, {machine['cpus']} CPUs ({machine['platform']}), one llama.cpp "
        f"thread per server, {args.num_prompts} prompts x {args.output_len} output tokens, "
        f"input ~{args.input_len} tokens, {args.turns} turns, seed {args.seed}, "
        f"median of {args.repeats} repeat(s).",
        "", "## Targets", "", targets_table(ts),
        "", "## All runs", "", rows_table(rows),
        "", "## Servers", "", *notes, "",
    ])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.md").write_text(report)
    (args.out / "compare.json").write_text(json.dumps({
        "created": datetime.now(UTC).isoformat(), "machine": machine, "gguf": str(gguf),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "servers": {name: {"command": peer.command, "env": engine_env(peer), "port": peer.port,
                           "ignore_eos": peer.spec.accepts_ignore_eos,
                           "log": str(peer.log_path)} for name, peer in running.items()},
        "skipped": skipped,
        "targets": [t.model_dump() for t in ts],
        "rows": [r.model_dump() for r in rows.values()],
        "runs": [r.model_dump(mode="json", exclude={"requests"})
                 for rs in runs.values() for r in rs],
    }, indent=1))
    print(report)
    print(f"wrote {args.out / 'compare.json'} and {args.out / 'compare.md'}")
    # Peers may fail or be missing; clinicloop must have answered every request of every run.
    ours = [r for (server, _, _), r in rows.items() if server in (CLINICLOOP, DRAFT)]
    return 1 if CLINICLOOP in skipped or any(r.failed for r in ours) else 0


if __name__ == "__main__":
    sys.exit(main())
