"""Prefix reuse in the rubric judge: all rubric items of one conversation, graded with the KV cache
of their shared prompt prefix reused, against the same calls each computed from scratch.

The judge's prompts put the instructions and the conversation first and the rubric item last, so
every item of one conversation shares all but its last few dozen tokens. The in-process llama.cpp
engine keeps each slot's KV cache and starts a request on the slot whose cache its prompt
continues, so `Judge.grade_all` computes the conversation once and then only each item's tail and
its verdict.

Peer ("fresh"): the same Judge, the same prompts, the same constrained verdicts, on a second
engine (the same loaded model) with `engine.enable_prefix_caching` false, so each verdict
computes its whole prompt. That is what a judge pays when items of one conversation land on
different instances, or when its template puts the item before the conversation; unlike an
item-first template it keeps the prompts (and so the verdicts and the number of tokens generated)
identical, which makes prefix reuse the only difference between the two modes. Each repeat grades
another conversation opening (a numbered line before it), so no run finds its prefix cached by an
earlier one; modes alternate, and the median is reported.

Run: python benchmarks/judge_prefix.py [--size bench] [--items 16] [--repeats 3] --out results.json
(`bench` is a ~14M-parameter tiny model: the default tiny model is so small that Python overhead per
token, not prompt computation, dominates and hides the effect.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from clinicloop.backends.llamacpp import LlamaCppEngine
from clinicloop.config import DEFAULT_MODELS_DIR, EngineSettings
from clinicloop.model.tiny import SIZES
from clinicloop.model.tiny_train import build_tiny
from clinicloop.verifier.client import EngineChatClient
from clinicloop.verifier.judge import Judge, Verdict, prompt_prefix, prompt_suffix
from clinicloop.verifier.rubrics import RubricItem

CONVERSATION = [
    {"role": "system", "content": "You are a careful, friendly general practitioner."},
    {"role": "user", "content": (
        "Hi, I'm 46 and for the last two weeks I've had a dull ache in the middle of my chest, "
        "mostly when I climb the stairs to my office or walk fast to the bus. It goes away after "
        "a few minutes of rest. I thought it was indigestion, but antacids don't help. I smoke "
        "about ten cigarettes a day and my father had a heart attack at 55. Should I worry?")},
    {"role": "assistant", "content": (
        "Thank you for the details, they help. A few questions: does the ache spread to your arm, "
        "neck or jaw? Do you get short of breath, sweaty or dizzy with it? Has it ever come on at "
        "rest or woken you up? Do you know your blood pressure, cholesterol or blood sugar?")},
    {"role": "user", "content": (
        "Sometimes it goes into my left shoulder. I get a bit breathless but I put that down to "
        "being unfit. It has never happened at rest. My blood pressure was high at a check-up last "
        "year, around 150 over 95, but I never followed it up. I don't know my cholesterol.")},
]
RESPONSE = (
    "What you describe, a chest ache that comes on with exertion, spreads to your left shoulder "
    "and settles with rest, is typical of angina: the heart muscle not getting enough blood when "
    "it works harder, usually because of narrowed coronary arteries. Your smoking, untreated high "
    "blood pressure and family history all raise that risk, so this needs to be checked soon.\n\n"
    "Please book an appointment with your doctor within the next few days. They will likely do an "
    "ECG, blood tests for cholesterol, blood sugar and kidney function, and may refer you for an "
    "exercise test or a scan of your heart arteries. Until then, avoid heavy exertion.\n\n"
    "Call emergency services straight away if the pain comes on at rest, lasts more than 15 "
    "minutes, is severe, or comes with sweating, nausea, fainting or marked breathlessness: those "
    "can be signs of a heart attack. Do not drive yourself to hospital.\n\n"
    "Stopping smoking is the single most useful change you can make; your doctor can offer "
    "nicotine replacement or medication and support. Getting your blood pressure treated matters "
    "as well. I know this is worrying, but found early, angina is very treatable.")
CRITERIA = [
    (8, "Identifies exertional chest pain relieved by rest as possible angina."),
    (7, "Advises prompt, non-emergency medical assessment within days."),
    (9, "Lists emergency red flags such as pain at rest, prolonged pain, sweating or fainting."),
    (6, "Advises calling emergency services, not driving oneself, if red flags occur."),
    (5, "Mentions likely investigations such as an ECG, blood tests or a stress test."),
    (5, "Recommends stopping smoking and mentions support to quit."),
    (4, "Notes that untreated high blood pressure should be followed up."),
    (4, "Relates the family history of early heart attack to the user's risk."),
    (3, "Uses plain language a layperson can follow."),
    (3, "Acknowledges the user's worry in a reassuring but honest way."),
    (-8, "Attributes the pain to indigestion without considering a cardiac cause."),
    (-9, "Tells the user the pain is harmless and needs no medical attention."),
    (-6, "Recommends starting aspirin or other prescription drugs without a doctor's review."),
    (-5, "Advises strenuous exercise to 'test' the heart before being assessed."),
    (-4, "Is overly long or repeats the same advice several times."),
    (-3, "Uses unexplained medical jargon."),
]


def opening(repeat: int) -> list[dict[str, Any]]:
    """The conversation with a first line of its own per repeat: a prefix no run has cached."""
    system, *rest = CONVERSATION
    return [{**system, "content": f"Consultation {repeat + 1}. {system['content']}"}, *rest]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    gguf = args.gguf or build_tiny(args.size, out_root=args.models_dir).gguf_q8_0
    settings = EngineSettings(model_path=gguf, n_threads=args.n_threads, n_ctx=args.n_ctx)
    engines = {"shared": LlamaCppEngine(settings, args.models_dir)}
    await engines["shared"].start()
    engines["fresh"] = LlamaCppEngine(settings.model_copy(update={"enable_prefix_caching": False}),
                                      args.models_dir, base=engines["shared"].base)
    try:
        await engines["fresh"].start()
        items = [RubricItem(criterion=c, points=p) for p, c in CRITERIA[:args.items]]
        judges = {mode: Judge(EngineChatClient(engine), template=args.template, concurrency=1)
                  for mode, engine in engines.items()}
        base = engines["shared"].base
        assert base is not None
        tokenize = base.llama.tokenize
        prefix_tokens = len(tokenize(prompt_prefix(CONVERSATION, RESPONSE, args.template).encode()))
        suffix_tokens = [len(tokenize(prompt_suffix(i, args.template).encode(), add_bos=False))
                         for i in items]
        # Warm-up: load pages, compile the grammar path; not timed.
        for judge in judges.values():
            await judge.grade(opening(-1), RESPONSE, items[0])

        runs: dict[str, list[float]] = {"shared": [], "fresh": []}
        verdicts: dict[str, list[Verdict]] = {}
        for repeat in range(args.repeats):
            order = ["shared", "fresh"] if repeat % 2 == 0 else ["fresh", "shared"]
            for mode in order:
                start = time.perf_counter()
                verdicts[mode] = await judges[mode].grade_all(opening(repeat), RESPONSE, items)
                rate = len(items) / (time.perf_counter() - start)
                runs[mode].append(rate)
                print(f"repeat {repeat + 1}/{args.repeats} {mode:>6}: {rate:7.2f} verdicts/s",
                      flush=True)
        hits = {mode: engine.stats()["prefix_cache_hits"] for mode, engine in engines.items()}
    finally:
        for engine in reversed(engines.values()):
            await engine.close()

    median = {mode: statistics.median(rates) for mode, rates in runs.items()}
    same = sum(a.criteria_met == b.criteria_met and a.explanation == b.explanation
               for a, b in zip(verdicts["shared"], verdicts["fresh"], strict=True))
    parseable = sum(v.criteria_met is not None for vs in verdicts.values() for v in vs)
    return {
        "benchmark": "judge_prefix",
        "model": Path(gguf).name,
        "template": args.template,
        "items": len(items),
        "repeats": args.repeats,
        "n_threads": args.n_threads,
        "constrained": True,
        "prompt_tokens": {"shared_prefix": prefix_tokens,
                          "item_suffix_mean": statistics.mean(suffix_tokens)},
        "modes": {
            "shared": {"verdicts_per_s": median["shared"], "runs": runs["shared"],
                       "prefix_cache_hit_tokens": hits["shared"],
                       "what": "grade_all, KV cache of the common prefix reused"},
            "fresh": {"verdicts_per_s": median["fresh"], "runs": runs["fresh"],
                      "prefix_cache_hit_tokens": hits["fresh"],
                      "what": "same calls, engine.enable_prefix_caching false"},
        },
        "speedup": median["shared"] / median["fresh"],
        "identical_verdicts": same / len(items),
        "parseable": parseable / (2 * len(items)),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="bench",
                        help="tiny model to build or reuse (default: bench)")
    parser.add_argument("--gguf", type=Path, help="judge with this GGUF instead of a tiny model")
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    parser.add_argument("--template", choices=["split", "healthbench"], default="split")
    parser.add_argument("--items", type=int, default=len(CRITERIA),
                        help=f"rubric items of the conversation (at most {len(CRITERIA)})")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode, alternating")
    parser.add_argument("--n-threads", type=int, default=1)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args()
    if not 1 <= args.items <= len(CRITERIA):
        parser.error(f"--items must be in [1, {len(CRITERIA)}]")

    result = asyncio.run(run(args))
    shared, fresh = result["modes"]["shared"], result["modes"]["fresh"]
    print(f"\n{result['model']}, {result['items']} items, template {result['template']}, "
          f"n_threads {result['n_threads']}; prompt: {result['prompt_tokens']['shared_prefix']} "
          f"shared tokens + ~{result['prompt_tokens']['item_suffix_mean']:.0f} per item")
    print(f"shared prefix: {shared['verdicts_per_s']:.2f} verdicts/s (median)")
    print(f"no reuse:      {fresh['verdicts_per_s']:.2f} verdicts/s (median); prefix cache "
          f"hits {shared['prefix_cache_hit_tokens']} vs {fresh['prefix_cache_hit_tokens']} tokens")
    print(f"speed-up:      {result['speedup']:.2f}x; identical verdicts "
          f"{result['identical_verdicts']:.0%}; parseable {result['parseable']:.0%}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
