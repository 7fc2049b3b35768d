"""Memory of model versions that differ by a LoRA on the in-process llama.cpp engine: adapter
versions sharing one loaded base against versions that each load the whole model.

Each scenario runs in a fresh process and reads its resident set (VmRSS) after every engine has
started and answered one greedy request (so the weights, adapter, KV cache and compute buffers it
uses are resident):
- shared: the base engine, then adapter versions started on its base (`base=first.base`);
- whole: the base engine, then the same adapter versions each loading the model themselves.
Expected growth per adapter version when the base is shared: the adapter GGUF's size plus the KV
cache llama.cpp allocates for the version's context (`LlamaCppEngine.kv_cache_bytes`); what is
measured beyond that is the context's compute buffers and the decode thread.

Run: python benchmarks/lora_memory.py --adapter A.gguf [--adapter B.gguf] [--model BASE.gguf]
     [--n-ctx 2048 --n-parallel 4 --prefix-cache-slots 8] --out results.json
(default model: the `bench` tiny model's q8_0 GGUF; one --adapter given twice is two versions.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from clinicloop.backends.base import Delta, SamplingParams
from clinicloop.backends.kinds import rss_bytes
from clinicloop.backends.llamacpp import LlamaCppEngine
from clinicloop.config import DEFAULT_MODELS_DIR, EngineSettings
from clinicloop.model.tiny_train import build_tiny

MiB = 2**20
PROMPT = [{"role": "user", "content": "I have had a sore throat and a fever since yesterday."}]


async def _answer(engine: LlamaCppEngine) -> None:
    async for event in engine.chat(PROMPT, SamplingParams(max_tokens=16, temperature=0.0), {}):
        assert not isinstance(event, Delta) or event.index == 0


async def measure(scenario: str, settings: EngineSettings, adapters: list[Path]) -> dict[str, Any]:
    """RSS after the base engine and after each adapter version, in this process."""
    steps = [{"engines": "base", "rss": rss_bytes()}]
    first = LlamaCppEngine(settings, DEFAULT_MODELS_DIR)
    engines = [first]
    try:
        await first.start()
        await _answer(first)
        steps[0] = {"engines": "base", "rss": rss_bytes(), "start_rss": steps[0]["rss"]}
        for i, adapter in enumerate(adapters, 1):
            version = settings.model_copy(update={"lora_path": adapter})
            engine = LlamaCppEngine(version, DEFAULT_MODELS_DIR,
                                    base=first.base if scenario == "shared" else None)
            engines.append(engine)
            await engine.start()
            await _answer(engine)
            steps.append({"engines": f"base + {i} adapter version{'s' * (i > 1)}",
                          "rss": rss_bytes(),
                          "kv_cache_bytes": engine.kv_cache_bytes(),
                          "adapter_bytes": adapter.stat().st_size})
        if scenario == "shared":
            assert all(e.base is first.base for e in engines)
        return {"scenario": scenario, "base_kv_cache_bytes": first.kv_cache_bytes(),
                "steps": steps}
    finally:
        for engine in reversed(engines):
            await engine.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = args.model or build_tiny("bench", out_root=args.models_dir, progress=False).gguf_q8_0
    common = ["--model", str(model), "--n-ctx", str(args.n_ctx), "--n-parallel",
              str(args.n_parallel), "--prefix-cache-slots", str(args.prefix_cache_slots)]
    for adapter in args.adapter:
        common += ["--adapter", str(adapter)]
    scenarios = {}
    for scenario in ("shared", "whole"):
        print(f"measuring {scenario} ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, __file__, "--scenario", scenario, *common],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{scenario} scenario failed:\n{done.stderr}")
        scenarios[scenario] = json.loads(done.stdout.splitlines()[-1])
    shared, whole = scenarios["shared"]["steps"], scenarios["whole"]["steps"]
    added = shared[-1]["rss"] - shared[0]["rss"]
    expected = sum(s["adapter_bytes"] + s["kv_cache_bytes"] for s in shared[1:])
    return {
        "model": str(model), "model_bytes": model.stat().st_size,
        "adapters": [str(a) for a in args.adapter],
        "settings": {"n_ctx": args.n_ctx, "n_parallel": args.n_parallel,
                     "prefix_cache_slots": args.prefix_cache_slots},
        "shared": scenarios["shared"], "whole": scenarios["whole"],
        "shared_added_bytes": added, "expected_added_bytes": expected,
        "overhead_bytes": added - expected,
        "whole_added_bytes": whole[-1]["rss"] - whole[0]["rss"],
    }


def summary(result: dict[str, Any]) -> str:
    lines = [f"model {result['model']} ({result['model_bytes'] / MiB:.1f} MiB), settings "
             f"{result['settings']}",
             f"{'':34}{'shared base':>14}{'whole models':>14}"]
    for shared, whole in zip(result["shared"]["steps"], result["whole"]["steps"], strict=True):
        lines.append(f"{shared['engines']:34}{shared['rss'] / MiB:>10.1f} MiB"
                     f"{whole['rss'] / MiB:>10.1f} MiB")
    lines.append(
        f"adapter versions add {result['shared_added_bytes'] / MiB:.1f} MiB on a shared base "
        f"(adapters + KV caches: {result['expected_added_bytes'] / MiB:.1f} MiB; compute buffers "
        f"and threads: {result['overhead_bytes'] / MiB:.1f} MiB), "
        f"{result['whole_added_bytes'] / MiB:.1f} MiB as whole models")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", type=Path, action="append", required=True,
                        help="a LoRA adapter GGUF of the model; repeat for more versions")
    parser.add_argument("--model", type=Path, help="the base GGUF (default: bench q8_0)")
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    parser.add_argument("--n-ctx", type=int, default=EngineSettings().n_ctx)
    parser.add_argument("--n-parallel", type=int, default=EngineSettings().n_parallel)
    parser.add_argument("--prefix-cache-slots", type=int,
                        default=EngineSettings().prefix_cache_slots)
    parser.add_argument("--scenario", choices=["shared", "whole"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.scenario:  # a child: one scenario, its JSON on the last line
        settings = EngineSettings(model_path=args.model, n_ctx=args.n_ctx,
                                  n_parallel=args.n_parallel,
                                  prefix_cache_slots=args.prefix_cache_slots)
        print(json.dumps(asyncio.run(measure(args.scenario, settings, args.adapter))))
        return
    result = run(args)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    print(summary(result))


if __name__ == "__main__":
    main()
