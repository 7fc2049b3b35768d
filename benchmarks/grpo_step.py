"""GRPO step time: our runner (`clinicloop.rl.grpo.train_grpo` with `PaperGRPOConfig`) against
plain `trl.GRPOTrainer` built by hand with the same model, data, reward and options, in one run.

Both train a LoRA on the tiny model with the paper's options and the rule-based stage's data and
reward; runs alternate (ours, plain, plain, ours, ...) after one untimed warm-up each. A run's
time is `trainer.train()` alone, divided by its steps. Both sides use the same seed, so they
generate the same completions and do the same work. The ratio compares the fastest run of each
side (the one least disturbed by other processes on a shared machine); medians are reported too.
The target is ours <= 1.05x plain: nothing of ours sits in TRL's hot loop.

Run: python benchmarks/grpo_step.py [--steps 8] [--repeats 5] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from clinicloop.config import DEFAULT_MODELS_DIR
from clinicloop.model.tiny_train import build_tiny
from clinicloop.rl.config import PINNED_TRL_OPTIONS, PaperGRPOConfig
from clinicloop.rl.grpo import train_grpo
from clinicloop.rl.rewards import rule_reward
from clinicloop.rl.stages import red_flag_rows


def ours(config: PaperGRPOConfig, model_dir: Path, rows: list, out: Path) -> float:
    return train_grpo(config, model_dir, rows, [rule_reward], out).wall_s


def plain(config: PaperGRPOConfig, model_dir: Path, rows: list, out: Path) -> float:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(out), beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type="dr_grpo",
        scale_rewards="none", **PINNED_TRL_OPTIONS, num_generations=config.num_generations,
        max_completion_length=config.max_completion_length, temperature=config.temperature,
        learning_rate=config.learning_rate, max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size, use_cpu=True,
        bf16=False, seed=config.seed, logging_steps=1, save_strategy="no", report_to=[],
        disable_tqdm=True)
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        processing_class=AutoTokenizer.from_pretrained(model_dir), reward_funcs=[rule_reward],
        args=args, train_dataset=Dataset.from_list(rows),
        peft_config=LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                               target_modules=config.lora_target_modules,
                               task_type="CAUSAL_LM"))
    started = time.perf_counter()
    trainer.train()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side")
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args()

    model_dir = build_tiny("tiny", out_root=args.models_dir).hf_dir
    config = PaperGRPOConfig(max_steps=args.steps, max_completion_length=32)
    rows = red_flag_rows(32)
    runners = {"ours": ours, "plain": plain}
    times: dict[str, list[float]] = {"ours": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in runners.items():  # warm-up: imports, first allocation
            run(config, model_dir, rows, Path(tmp) / f"warm-{name}")
        for repeat in range(args.repeats):
            order = ["ours", "plain"] if repeat % 2 == 0 else ["plain", "ours"]
            for name in order:
                seconds = runners[name](config, model_dir, rows, Path(tmp) / f"{name}-{repeat}")
                times[name].append(seconds / args.steps)
                print(f"repeat {repeat + 1}/{args.repeats} {name:>5}: {seconds / args.steps:.3f} "
                      "s/step", flush=True)
    result = {"ours": min(times["ours"]), "plain": min(times["plain"]),
              "ours_median": statistics.median(times["ours"]),
              "plain_median": statistics.median(times["plain"])}
    result["ratio"] = result["ours"] / result["plain"]
    result["ratio_median"] = result["ours_median"] / result["plain_median"]
    print(f"ours {result['ours']:.3f} s/step, plain TRL {result['plain']:.3f} s/step (fastest "
          f"runs), ratio {result['ratio']:.3f} (target <= 1.05); medians: ratio "
          f"{result['ratio_median']:.3f}")
    if args.out:
        args.out.write_text(json.dumps({**result, "runs": times, "steps": args.steps}, indent=2))


if __name__ == "__main__":
    main()
