"""Train a LoRA on the HF policy with `trl.GRPOTrainer`, configured by `PaperGRPOConfig`.

Nothing of ours runs in TRL's loop but the reward functions and a progress bar (which replaces
TRL's printing of every step's log dict). Writes the adapter, `train.json` (reward curve, wall
time, processes, how the base was loaded, peak GPU memory) and the rows (`dataset.jsonl`) to
`output_dir`, from the main process only when `accelerate launch` runs it in several.

`load_policy` loads the base for training, for a fresh LoRA and for going on from an adapter alike.
With `qlora` on a CUDA GPU it is QLoRA's recipe: the base in 4 bits (bitsandbytes NF4, double
quantisation, bfloat16 compute), then peft's `prepare_model_for_kbit_training`. Without CUDA the
same calls run on the unquantised base (bitsandbytes' 4-bit layers need CUDA), which keeps the path
testable on a CPU. Rollouts come from the model being trained (TRL's `use_vllm=False`): a colocated
vLLM would hold a second copy of the weights on the card, which a 24 GB card serving a 32B model
does not have room for.
"""

from __future__ import annotations

import importlib.util
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from clinicloop.errors import UserError
from clinicloop.rl.config import PaperGRPOConfig

if TYPE_CHECKING:  # the `rl` extra, imported when a run starts
    from transformers import BitsAndBytesConfig, PreTrainedModel


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    reward_curve: list[float]  # mean total reward per logged step
    wall_s: float


@dataclass(frozen=True)
class PolicyLoad:
    """How `load_policy` loaded the base; written to train.json as `load`."""

    quantization: Literal["nf4-double", "none"]
    reason: str
    device: Literal["cuda", "cpu"]


def policy_quantization(config: PaperGRPOConfig) -> tuple[BitsAndBytesConfig | None, PolicyLoad]:
    """How `load_policy` loads the base. With `qlora` on a CUDA GPU, QLoRA's 4-bit base (Dettmers
    et al. 2023): NF4 weights, their constants quantised again (double quantisation, about 0.37
    bits per weight saved), matrix products in bfloat16."""
    import torch

    device: Literal["cuda", "cpu"] = "cpu" if config.use_cpu else "cuda"
    if not config.qlora:
        return None, PolicyLoad("none", "qlora off", device)
    if not torch.cuda.is_available():
        return None, PolicyLoad("none", "no CUDA: bitsandbytes' 4-bit layers need a CUDA GPU, "
                                "so the base loaded unquantised and went through the same k-bit "
                                "preparation", "cpu")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16), PolicyLoad(
        "nf4-double", "qlora on a CUDA GPU", "cuda")


def load_policy(config: PaperGRPOConfig, model_dir: Path, init_adapter: Path | None = None
                ) -> tuple[PreTrainedModel, PolicyLoad]:
    """The model GRPO trains: the base of `model_dir` (in 4 bits with `qlora` on a CUDA GPU, and
    k-bit prepared whenever `qlora`), wrapped in `init_adapter` when given, trainable."""
    import torch
    from transformers import AutoModelForCausalLM

    quantization, load = policy_quantization(config)
    if quantization is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    else:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("qlora on a CUDA GPU loads the base with bitsandbytes, which is not "
                            "installed: pip install bitsandbytes")
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, quantization_config=quantization, dtype=torch.bfloat16,
            device_map={"": torch.cuda.current_device()})
    if config.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    if init_adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
    return model, load


def _checkpointing_probe() -> Any:
    """Reads, after each step's backward, whether the model trained with gradient checkpointing
    (TRL turns it off while generating and back on for the loss)."""
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        seen: bool | None = None

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None,
                        **_: Any) -> None:
            self.seen = bool(model.is_gradient_checkpointing)

    return Probe()


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
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback
    from trl import GRPOTrainer

    output_dir.mkdir(parents=True, exist_ok=True)
    quiet_deprecations()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    model, load = load_policy(config, model_dir, init_adapter)
    # A 4-bit base sits on the GPU and computes in bfloat16, so the trainer must run there too.
    on_gpu = {"use_cpu": False, "bf16": True} if load.quantization != "none" else {}
    trainer = GRPOTrainer(
        model=model,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        reward_funcs=reward_funcs,
        # Under `accelerate launch` every LoRA weight takes part in each forward, so DDP need not
        # search the graph for unused ones (transformers assumes it must for a peft model).
        args=config.to_trl(output_dir, ddp_find_unused_parameters=False, **on_gpu),
        train_dataset=Dataset.from_list(rows),
        peft_config=None if init_adapter is not None else config.lora(),
    )
    # Under `accelerate launch` every rank runs this; only the main one writes files or a bar.
    main = trainer.accelerator.is_main_process
    if main:
        with (output_dir / "dataset.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_reward_bar(config.max_steps, progress and main))
    probe = _checkpointing_probe()
    trainer.add_callback(probe)
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    adapter_dir = output_dir / "adapter"
    curve = [float(e["reward"]) for e in trainer.state.log_history if "reward" in e]
    if main:
        trainer.model.save_pretrained(adapter_dir)
        (output_dir / "train.json").write_text(json.dumps({
            "reward_curve": curve, "wall_s": wall, "steps": config.max_steps,
            "world_size": trainer.accelerator.num_processes,
            "load": {**asdict(load), "gradient_checkpointing": probe.seen},
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else None,
        }, indent=2))
    return TrainResult(adapter_dir, curve, wall)
