"""Train a LoRA on the HF policy with `trl.GRPOTrainer`, configured by `PaperGRPOConfig`.

Nothing of ours runs in TRL's loop but the reward functions and a progress bar (which replaces
TRL's printing of every step's log dict). Writes the adapter and `train.json` (reward curve, wall
time) to `output_dir`.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clinicloop.rl.config import PaperGRPOConfig


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    reward_curve: list[float]  # mean total reward per logged step
    wall_s: float


def quiet_deprecations() -> None:
    """TRL 1.16 and peft 0.21 call transformers 5's deprecated gradient-checkpointing names on
    every step and merge; the warnings say nothing a user can act on."""
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*",
                            category=FutureWarning)


def _reward_bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class RewardBar(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            self.bar = tqdm(total=total, desc="grpo", unit="step", disable=not enabled)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None,
                   **_: Any) -> None:
            if logs and "reward" in logs:
                self.bar.set_postfix(reward=f"{float(logs['reward']):.3f}")

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            self.bar.update(state.global_step - self.bar.n)

        def on_train_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            self.bar.close()

    return RewardBar()


def train_grpo(config: PaperGRPOConfig, model_dir: Path, rows: list[dict[str, Any]],
               reward_funcs: list[Any], output_dir: Path, progress: bool = True,
               init_adapter: Path | None = None) -> TrainResult:
    """`rows`: dicts with a `prompt` (messages) plus whatever columns the rewards read.
    `init_adapter`: a peft adapter of `model_dir` to go on training (e.g. the version a vLLM
    upstream serves, which applies one adapter to its base), instead of a fresh LoRA."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import GRPOTrainer

    output_dir.mkdir(parents=True, exist_ok=True)
    quiet_deprecations()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_config = config.lora()
    if init_adapter is not None:
        from peft import PeftModel

        model, peft_config = PeftModel.from_pretrained(model, init_adapter,
                                                       is_trainable=True), None
    trainer = GRPOTrainer(
        model=model,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        reward_funcs=reward_funcs,
        args=config.to_trl(output_dir),
        train_dataset=Dataset.from_list(rows),
        peft_config=peft_config,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_reward_bar(config.max_steps, progress))
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    adapter_dir = output_dir / "adapter"
    trainer.model.save_pretrained(adapter_dir)
    curve = [float(e["reward"]) for e in trainer.state.log_history if "reward" in e]
    (output_dir / "train.json").write_text(json.dumps(
        {"reward_curve": curve, "wall_s": wall, "steps": config.max_steps}, indent=2))
    return TrainResult(adapter_dir, curve, wall)
