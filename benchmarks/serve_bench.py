"""Client-side serving benchmark for any OpenAI-compatible base URL, with `vllm bench serve`'s
metric definitions, over streamed chat completions.

Per request (timestamps taken as each streamed chunk arrives):
- TTFT: time from sending the request to the first chunk that carries content. vLLM's client counts
  the first chunk with any `choices`, which on servers that open with an empty role chunk measures
  the headers, not the first token; this counts the first token.
- ITL: the gaps between successive content chunks.
- e2e: time to the last chunk with `choices` (the trailing usage chunk is not a token).
- TPOT: (e2e - TTFT) / (output_tokens - 1), for requests with more than one output token.
- output tokens: `usage.completion_tokens` of the stream's usage chunk (`stream_options.
  include_usage`), else the number of content chunks.
Per run: request throughput = completed requests / duration, output token throughput = total output
tokens / duration (duration: first request sent to last response done), and mean, median and p99
(numpy's linear percentile, as vLLM) of TTFT, TPOT, ITL and e2e in milliseconds. Failed requests
(HTTP errors, error events mid-stream, dropped connections) are counted and kept, never raised.

Workloads, all built deterministically from the shipped corpus and `--seed`, so every server and
every concurrency level gets the same prompts:
- random: `--num-prompts` prompts of about `--input-len` tokens (corpus words drawn at random,
  ~1.3 tokens a word; the real prompt sizes come back in the usage chunk).
- multiturn: `--num-prompts` conversations of `--turns` turns; turn 1 is a patient note of about
  `--input-len` tokens and a question, each later turn appends the assistant's reply and a new
  corpus question. Conversations run concurrently and each turn waits for a slot, so turns of
  different conversations interleave (what a prefix cache must survive); `ttft_by_turn_ms` shows
  turn 1 against turn N.
- chat: short chat turns, what apps send most: one corpus question each (prompts of 10-40
  tokens with the chat template), `max_tokens` = `--chat-max-tokens` (48) and never `ignore_eos`,
  so replies end on their own at the end of turn.
- quote: a patient note of ~450 words (600-900 tokens, by tokenizer) and a request to quote it back
  verbatim, the workload where speculative (prompt-lookup) drafting pays; compare `texts` across
  runs for exactness.
Every request is greedy (temperature 0) with a fixed `seed`; except in the chat workload,
`max_tokens` = `--output-len` and, by default, vLLM's `ignore_eos` so each request produces exactly
that many tokens; servers that reject unknown fields need `--no-ignore-eos`.

Run against a server (`make serve` in another shell):
    python benchmarks/serve_bench.py --base-url http://127.0.0.1:8000/v1 \
        --workload random,multiturn,quote --concurrency 1,2,4,8 --num-prompts 32 \
        --input-len 128 --output-len 64 --turns 5 --out var/serve_bench
It prints a summary table and writes `result.json` (every run with its per-request records) and
`result.png` (output throughput against concurrency; TTFT and ITL distributions) under `--out`.
`--write-prompts PATH` writes the locust prompt file (`benchmarks/locustfile.py`) and exits.

From Python: `await run_workload(base_url, "multiturn", 4, num_prompts=8, turns=5)` -> RunResult.

Every request carries `X-Clinicloop-Origin: service`: a clinicloop server logs the benchmark's
turns as service traffic, apart from patients' (see TRAFFIC_NOTE, printed at the start and in
--help).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import random
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple, cast

import httpx
import numpy as np
from pydantic import BaseModel, computed_field
from tqdm import tqdm

from clinicloop.model.corpus import SYSTEM_PROMPTS, load_corpus, system_messages
from clinicloop.verifier.client import ORIGIN_HEADER, TRAFFIC_NOTE

Workload = Literal["random", "chat", "multiturn", "quote"]
WORKLOADS: tuple[Workload, ...] = ("random", "chat", "multiturn", "quote")
# Typical of English BPE vocabularies (the bench tiny model: 1.2; the tiny one: 1.6).
TOKENS_PER_WORD = 1.3
# Notes tokenize denser than bare words (labels, punctuation: ~1.6 tokens a word): ~700 tokens.
QUOTE_NOTE_WORDS = 450
QUOTE_INSTRUCTION = (
    "Quote the patient's history above back to me verbatim, word for word, from the first line to "
    "the last, without adding, removing or changing anything."
)
SCRIBE_SYSTEM = "You are a careful medical scribe. You copy clinical notes exactly."
TIMEOUT = httpx.Timeout(900.0, connect=30.0)


class RequestRecord(BaseModel):
    """One streamed request. Times in seconds; `start_s` from the run's start, the rest from the
    request's own start."""

    index: int
    turn: int
    success: bool
    error: str = ""
    start_s: float
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    chunk_times_s: list[float] = []
    output_tokens: int = 0
    tokens_from_usage: bool = False
    prompt_tokens: int | None = None
    text: str = ""

    @computed_field
    @property
    def itl_s(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times_s, self.chunk_times_s[1:], strict=False)]

    @computed_field
    @property
    def tpot_s(self) -> float | None:
        if not self.success or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


class RunResult(BaseModel):
    workload: Workload
    concurrency: int
    model: str
    base_url: str
    num_prompts: int
    input_len: int
    output_len: int
    turns: int
    seed: int
    ignore_eos: bool
    duration_s: float
    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    ttft_by_turn_ms: dict[int, float]
    texts: list[str]
    requests: list[RequestRecord]


class Conversation(NamedTuple):
    index: int
    system: str | None
    user_turns: list[str]


def _stats_ms(values_s: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values_s or [0.0], dtype=float) * 1000
    return {"mean": float(arr.mean()), "median": float(np.median(arr)),
            "p99": float(np.percentile(arr, 99))}


def _words(n_tokens: int) -> int:
    return max(1, round(n_tokens / TOKENS_PER_WORD))


@functools.cache
def _corpus() -> tuple[list[str], list[str], list[dict[str, Any]]]:
    dialogues = load_corpus()
    words = [w for d in dialogues for m in d["messages"] for w in m["content"].split()]
    questions = [m["content"] for d in dialogues for m in d["messages"] if m["role"] == "user"]
    return words, questions, dialogues


def patient_note(rng: random.Random, n_words: int) -> str:
    """A synthetic clinical note of at most `n_words` words (at least one visit), stacked from
    corpus dialogues."""
    _, _, dialogues = _corpus()
    lines = ["PATIENT HISTORY"]
    total = 2
    while True:
        d = rng.choice(dialogues)
        user = next(m["content"] for m in d["messages"] if m["role"] == "user")
        answer = next(m["content"] for m in d["messages"] if m["role"] == "assistant")
        entry = (f"Visit {len(lines)} ({d['topic']}): patient reported: {user} "
                 f"Advice given: {answer} Assessment: {d['reasoning']}")
        if len(lines) > 1 and total + len(entry.split()) > n_words:
            return "\n".join(lines)
        lines.append(entry)
        total += len(entry.split())


def build_conversations(workload: Workload, num_prompts: int, input_len: int, turns: int,
                        seed: int) -> list[Conversation]:
    words, questions, _ = _corpus()
    # Seeded by workload too, so prompts do not depend on which other workloads run.
    rng = random.Random(f"{seed}:{workload}")
    convs = []
    for i in range(num_prompts):
        if workload == "random":
            prompt = " ".join(rng.choice(words) for _ in range(_words(input_len)))
            convs.append(Conversation(i, None, [prompt]))
        elif workload == "chat":
            convs.append(Conversation(i, None, [rng.choice(questions)]))
        elif workload == "multiturn":
            first = f"{patient_note(rng, _words(input_len))}\n\n{rng.choice(questions)}"
            later = [rng.choice(questions) for _ in range(turns - 1)]
            convs.append(Conversation(i, SYSTEM_PROMPTS[0], [first, *later]))
        else:
            note = patient_note(rng, QUOTE_NOTE_WORDS)
            convs.append(Conversation(i, SCRIBE_SYSTEM, [f"{note}\n\n{QUOTE_INSTRUCTION}"]))
    return convs


def loadtest_prompts(n: int = 64, seed: int = 0) -> list[dict[str, Any]]:
    """Rows of `benchmarks/data/loadtest_prompts.jsonl`: a corpus question, half of them after a
    patient note of 40-200 words, so prompt lengths vary as real traffic does."""
    _, questions, _ = _corpus()
    rng = random.Random(f"{seed}:loadtest")
    rows = []
    for i in range(n):
        question = rng.choice(questions)
        user = f"{patient_note(rng, rng.randint(40, 200))}\n\n{question}" if i % 2 else question
        rows.append({"messages": [*system_messages(i), {"role": "user", "content": user}]})
    return rows


def request_headers(api_key: str | None) -> dict[str, str]:
    """Every request's headers: the key, and the mark of the project's own traffic."""
    return {ORIGIN_HEADER: "service", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}


async def first_model(base_url: str, api_key: str | None = None) -> str:
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        url = f"{base_url.rstrip('/')}/models"
        resp = await client.get(url, headers=request_headers(api_key))
        if resp.status_code in (401, 403):
            raise SystemExit(f"{url} refused the key ({resp.status_code}): pass --api-key, or "
                             "set OPENAI_API_KEY")
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]


class StreamError(Exception):
    """The stream carried an error event."""


class StreamTally:
    """One streamed chat completion, fed line by line as it arrives: when each content chunk
    came (seconds after `start`), the text, the last chunk's time and the usage chunk."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.chunk_times: list[float] = []
        self.text: list[str] = []
        self.last = start
        self.usage: dict[str, Any] | None = None

    def feed(self, line: str) -> bool:
        """Take one SSE line; False once the stream has ended (`[DONE]`)."""
        if not line.startswith("data:"):
            return True  # blank separators and SSE comments (keep-alive pings)
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            return False
        now = time.perf_counter()
        event = json.loads(data)
        if "error" in event:
            raise StreamError(f"error event: {json.dumps(event['error'])[:500]}")
        if choices := event.get("choices"):
            delta = choices[0].get("delta") or {}
            if delta.get("content") or delta.get("reasoning_content"):
                self.chunk_times.append(now - self.start)
                self.text.append(delta.get("content") or "")
            self.last = now
        if event.get("usage"):
            self.usage = event["usage"]
        return True

    @property
    def completion_tokens(self) -> int | None:
        return None if self.usage is None else self.usage.get("completion_tokens")

    @property
    def output_tokens(self) -> int:
        """The usage chunk's count, else one per content chunk (token-by-token servers)."""
        tokens = self.completion_tokens
        return tokens if tokens is not None else len(self.chunk_times)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0]

    @property
    def e2e(self) -> float:
        return self.last - self.start

    def check_content(self) -> None:
        if not self.chunk_times:
            raise StreamError("stream ended without a content chunk")


async def _stream_one(client: httpx.AsyncClient, url: str, payload: dict[str, Any],
                      index: int, turn: int, run_start: float) -> RequestRecord:
    tally = StreamTally(time.perf_counter())
    error = ""
    try:
        async with client.stream("POST", url, json=payload) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                error = f"HTTP {resp.status_code}: {body[:500]}"
            else:
                async for line in resp.aiter_lines():
                    if not tally.feed(line):
                        break
        if not error:
            tally.check_content()
    except (httpx.HTTPError, json.JSONDecodeError, StreamError) as exc:
        error = str(exc) if isinstance(exc, StreamError) else f"{type(exc).__name__}: {exc}"
    return RequestRecord(
        index=index, turn=turn, success=not error, error=error,
        start_s=tally.start - run_start, ttft_s=tally.ttft if tally.chunk_times else 0.0,
        e2e_s=tally.e2e, chunk_times_s=tally.chunk_times, output_tokens=tally.output_tokens,
        tokens_from_usage=tally.completion_tokens is not None,
        prompt_tokens=(tally.usage or {}).get("prompt_tokens"), text="".join(tally.text),
    )


async def run_workload(base_url: str, workload: str, concurrency: int, *,
                       model: str | None = None, api_key: str | None = None,
                       num_prompts: int = 32, input_len: int = 128, output_len: int = 64,
                       turns: int = 5, seed: int = 0, ignore_eos: bool = True,
                       chat_max_tokens: int = 48, progress: bool = True) -> RunResult:
    """Run one workload at one concurrency (at most `concurrency` requests in flight). The chat
    workload asks for `chat_max_tokens` and never sends `ignore_eos`."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; choose from {WORKLOADS}")
    kind = cast(Workload, workload)
    if kind == "chat":
        output_len, ignore_eos = chat_max_tokens, False
    base_url = base_url.rstrip("/")
    model = model or await first_model(base_url, api_key)
    n_turns = turns if kind == "multiturn" else 1
    convs = build_conversations(kind, num_prompts, input_len, n_turns, seed)
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    bar = tqdm(total=num_prompts * n_turns, desc=f"{workload} c={concurrency}", unit="req",
               disable=not progress, file=sys.stderr)

    async def converse(client: httpx.AsyncClient, conv: Conversation) -> list[RequestRecord]:
        messages = [{"role": "system", "content": conv.system}] if conv.system else []
        records = []
        for turn, user in enumerate(conv.user_turns, start=1):
            messages.append({"role": "user", "content": user})
            payload = {
                "model": model, "messages": list(messages), "max_tokens": output_len,
                "temperature": 0.0, "seed": seed, "stream": True,
                "stream_options": {"include_usage": True},
                **({"ignore_eos": True} if ignore_eos else {}),
            }
            async with sem:
                record = await _stream_one(client, f"{base_url}/chat/completions", payload,
                                           conv.index, turn, run_start)
            bar.update()
            records.append(record)
            # A failed turn leaves an empty reply, so later turns still run and are counted.
            messages.append({"role": "assistant", "content": record.text})
        return records

    async with httpx.AsyncClient(timeout=TIMEOUT, limits=limits,
                                 headers=request_headers(api_key)) as client:
        run_start = time.perf_counter()
        per_conv = await asyncio.gather(*(converse(client, c) for c in convs))
        duration = time.perf_counter() - run_start
    bar.close()

    records = sorted((r for rs in per_conv for r in rs), key=lambda r: (r.index, r.turn))
    ok = [r for r in records if r.success]
    total_out = sum(r.output_tokens for r in ok)
    by_turn: dict[int, list[float]] = {}
    for r in ok:
        by_turn.setdefault(r.turn, []).append(r.ttft_s)
    return RunResult(
        workload=kind, concurrency=concurrency, model=model, base_url=base_url,
        num_prompts=num_prompts, input_len=input_len, output_len=output_len, turns=n_turns,
        seed=seed, ignore_eos=ignore_eos, duration_s=duration, completed=len(ok),
        failed=len(records) - len(ok),
        total_input_tokens=sum(r.prompt_tokens or 0 for r in ok), total_output_tokens=total_out,
        request_throughput=len(ok) / duration, output_throughput=total_out / duration,
        ttft_ms=_stats_ms([r.ttft_s for r in ok]),
        tpot_ms=_stats_ms([r.tpot_s for r in ok if r.tpot_s is not None]),
        itl_ms=_stats_ms([gap for r in ok for gap in r.itl_s]),
        e2e_ms=_stats_ms([r.e2e_s for r in ok]),
        ttft_by_turn_ms={t: float(np.mean(v)) * 1000 for t, v in sorted(by_turn.items())},
        texts=[r.text for r in records], requests=records,
    )


def summary(runs: Sequence[RunResult]) -> str:
    def trio(s: dict[str, float]) -> str:
        return f"{s['mean']:.1f}/{s['median']:.1f}/{s['p99']:.1f}"

    rows = [("workload", "c", "ok", "fail", "req/s", "out tok/s", "TTFT ms mean/med/p99",
             "TPOT ms mean/med/p99", "ITL ms mean/med/p99", "e2e ms mean/med/p99")]
    rows += [(r.workload, str(r.concurrency), str(r.completed), str(r.failed),
              f"{r.request_throughput:.2f}", f"{r.output_throughput:.1f}", trio(r.ttft_ms),
              trio(r.tpot_ms), trio(r.itl_ms), trio(r.e2e_ms)) for r in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    for r in runs:
        if r.workload == "multiturn":
            turns = ", ".join(f"{t}: {ms:.1f}" for t, ms in r.ttft_by_turn_ms.items())
            lines.append(f"multiturn c={r.concurrency} mean TTFT ms by turn: {turns}")
    return "\n".join(lines)


def plot(runs: Sequence[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tp, ax_ttft, ax_itl) = plt.subplots(1, 3, figsize=(17, 5))
    for workload in dict.fromkeys(r.workload for r in runs):
        rs = sorted((r for r in runs if r.workload == workload), key=lambda r: r.concurrency)
        ax_tp.plot([r.concurrency for r in rs], [r.output_throughput for r in rs], marker="o",
                   label=workload)
    ax_tp.set(xlabel="concurrency", ylabel="output tokens/s", title="Output throughput")
    ax_tp.set_xscale("log", base=2)
    concurrencies = sorted({r.concurrency for r in runs})
    ax_tp.set_xticks(concurrencies, [str(c) for c in concurrencies])
    ax_tp.legend()
    labels = [f"{r.workload}\nc={r.concurrency}" for r in runs]
    for ax, name, values in (
        (ax_ttft, "TTFT", [[q.ttft_s * 1000 for q in r.requests if q.success] for r in runs]),
        (ax_itl, "ITL", [[g * 1000 for q in r.requests if q.success for g in q.itl_s]
                         for r in runs]),
    ):
        ax.boxplot([v or [0.0] for v in values], tick_labels=labels, whis=(1, 99))
        ax.set(ylabel="ms", title=f"{name} distribution (whiskers p1-p99)")
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"{runs[0].model} at {runs[0].base_url}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_csv(kind: type, text: str) -> list[Any]:
    return [kind(x) for x in text.split(",") if x.strip()]


def add_workload_args(p: argparse.ArgumentParser, *, workloads: str, concurrency: str) -> None:
    """The workload options every script that runs `run_workload` takes."""
    p.add_argument("--workload", default=workloads,
                   help=f"comma-separated, of {', '.join(WORKLOADS)}")
    p.add_argument("--concurrency", default=concurrency, help="comma-separated sweep")
    p.add_argument("--num-prompts", type=int, default=32,
                   help="requests per run (conversations for multiturn)")
    p.add_argument("--input-len", type=int, default=128, help="approximate prompt tokens")
    p.add_argument("--output-len", type=int, default=64, help="max_tokens of every request")
    p.add_argument("--turns", type=int, default=5, help="turns per multiturn conversation")
    p.add_argument("--chat-max-tokens", type=int, default=48,
                   help="max_tokens of the chat workload's requests (they stop at end of turn)")
    p.add_argument("--seed", type=int, default=0)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=TRAFFIC_NOTE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1",
                   help="OpenAI-compatible base URL, ending in /v1")
    add_workload_args(p, workloads="random", concurrency="1,2,4,8")
    p.add_argument("--model", default=None, help="default: the first id of GET /models")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="bearer token (default: $OPENAI_API_KEY)")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="omit vLLM's ignore_eos (for servers that reject unknown fields)")
    p.add_argument("--out", type=Path, default=Path("var/serve_bench"))
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--write-prompts", type=Path, default=None,
                   help="write the locust prompt file to this path and exit")
    return p.parse_args(argv)


async def sweep(args: argparse.Namespace) -> list[RunResult]:
    model = args.model or await first_model(args.base_url, args.api_key)
    return [
        await run_workload(args.base_url, workload, c, model=model, api_key=args.api_key,
                           num_prompts=args.num_prompts, input_len=args.input_len,
                           output_len=args.output_len, turns=args.turns, seed=args.seed,
                           ignore_eos=args.ignore_eos, chat_max_tokens=args.chat_max_tokens,
                           progress=args.progress)
        for workload in parse_csv(str, args.workload) for c in parse_csv(int, args.concurrency)
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_prompts is not None:
        args.write_prompts.parent.mkdir(parents=True, exist_ok=True)
        args.write_prompts.write_text(
            "".join(json.dumps(row) + "\n" for row in loadtest_prompts(seed=args.seed)))
        return 0
    print(TRAFFIC_NOTE, file=sys.stderr)
    runs = asyncio.run(sweep(args))
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "created": datetime.now(UTC).isoformat(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count()},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                 if k not in ("api_key", "write_prompts")},
        "runs": [r.model_dump(mode="json") for r in runs],
    }
    (args.out / "result.json").write_text(json.dumps(report, indent=1))
    plot(runs, args.out / "result.png")
    print(summary(runs))
    print(f"wrote {args.out / 'result.json'} and {args.out / 'result.png'}")
    return 1 if any(r.failed for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
