"""Train a LoRA on the HF policy with `trl.GRPOTrainer`, configured by `PaperGRPOConfig`.

Nothing of ours runs in TRL's loop but the reward functions. Writes the adapter and `train.json`
(reward curve, wall time) to `output_dir`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clinicloop.rl.config import PaperGRPOConfig


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    reward_curve: list[float]  # mean total reward per logged step
    wall_s: float


def train_grpo(config: PaperGRPOConfig, model_dir: Path, rows: list[dict[str, Any]],
               reward_funcs: list[Any], output_dir: Path) -> TrainResult:
    """`rows`: dicts with a `prompt` (messages) plus whatever columns the rewards read."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    output_dir.mkdir(parents=True, exist_ok=True)
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        reward_funcs=reward_funcs,
        args=config.to_trl(output_dir),
        train_dataset=Dataset.from_list(rows),
        peft_config=config.lora(),
    )
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    adapter_dir = output_dir / "adapter"
    trainer.model.save_pretrained(adapter_dir)
    curve = [float(e["reward"]) for e in trainer.state.log_history if "reward" in e]
    (output_dir / "train.json").write_text(json.dumps(
        {"reward_curve": curve, "wall_s": wall, "steps": config.max_steps}, indent=2))
    return TrainResult(adapter_dir, curve, wall)
