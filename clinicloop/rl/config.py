"""The paper's GRPO, as options of TRL's own `GRPOConfig` (no hand-written loss).

Baichuan-M2 §3.3 changes four things from vanilla GRPO; TRL has each as an option:
no KL term (`beta=0`), clip-higher (`epsilon_high` > `epsilon`), a loss normalised by a constant
maximum length (`loss_type="dr_grpo"`) and advantages that are reward minus the group mean without
dividing by the group's std (`scale_rewards="none"`). TRL's defaults differ (`loss_type="dapo"`,
`scale_rewards="group"`), so `to_trl` sets every one of them explicitly, together with the TRL
options that would silently change the algorithm if their defaults moved: one policy update per
generation batch (`num_iterations=1`), token-level importance ratios, no extra clipping (`delta`),
all tokens in the loss, rewards summed before the group mean is taken
(`multi_objective_aggregation="sum_then_normalize"`: rubric + length is one reward, as in the
paper). Checked against TRL 1.16.0 (`trl/trainer/grpo_config.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # TRL and peft are the `rl` extra: imported when a run is configured
    from peft import LoraConfig
    from trl import GRPOConfig

#: TRL options the paper's algorithm assumes; set so that a TRL release changing a default cannot
#: change what is trained.
PINNED_TRL_OPTIONS: dict[str, Any] = {
    "num_iterations": 1, "importance_sampling_level": "token", "delta": None,
    "mask_truncated_completions": False, "top_entropy_quantile": 1.0, "entropy_coef": 0.0,
    "multi_objective_aggregation": "sum_then_normalize",
}


@dataclass
class PaperGRPOConfig:
    beta: float = field(default=0.0, metadata={"help": "KL coefficient; the paper drops the KL "
                                               "term, so no reference model is loaded."})
    epsilon: float = field(default=0.2, metadata={"help": "Lower clipping bound of the ratio."})
    epsilon_high: float = field(default=0.28, metadata={
        "help": "Upper clipping bound (clip-higher): above `epsilon` so low-probability tokens "
                "can still grow, which keeps exploration alive."})
    loss_type: str = field(default="dr_grpo", metadata={
        "help": "Loss normalised by a constant maximum completion length (Dr. GRPO), so long and "
                "short completions weigh alike."})
    scale_rewards: str = field(default="none", metadata={
        "help": "Advantage = reward - group mean, not divided by the group's std."})
    num_generations: int = field(default=4, metadata={"help": "Completions sampled per prompt "
                                                      "(the group)."})
    max_completion_length: int = field(default=64, metadata={"help": "Tokens per completion."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of rollouts."})
    learning_rate: float = field(default=5e-4, metadata={"help": "LoRA learning rate."})
    max_steps: int = field(default=20, metadata={"help": "Optimizer steps."})
    per_device_train_batch_size: int = field(default=4, metadata={
        "help": "Completions per step; a multiple of `num_generations`."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scale."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                 "down_proj"],
        metadata={"help": "Modules that get LoRA adapters (peft)."})
    length_threshold: float = field(default=0.5, metadata={
        "help": "The length reward applies only when the group's P80 rubric score is above this."})
    qlora: bool = field(default=False, metadata={
        "help": "QLoRA: load the base in 4 bits (bitsandbytes NF4 with double quantisation, "
                "bfloat16 compute) and prepare it with peft's `prepare_model_for_kbit_training`, "
                "so that a base too large to train in 16 bits trains on the card that serves it. "
                "Needs a CUDA GPU and bitsandbytes for the 4 bits; without CUDA the same path "
                "runs with the base unquantised, and train.json's `load` says which happened."})
    gradient_checkpointing: bool = field(default=True, metadata={
        "help": "Recompute each layer's activations in the backward pass instead of keeping "
                "them (TRL's default; QLoRA needs it to fit). Non-reentrant, so the frozen "
                "base's inputs need no gradient hooks."})
    use_vllm: bool = field(default=False, metadata={"help": "Generate rollouts with vLLM (GPU)."})
    vllm_mode: str = field(default="colocate", metadata={
        "help": "With `use_vllm`: `colocate` runs vLLM in the training process on the same GPU; "
                "`server` uses a separate `trl vllm-serve`."})
    use_cpu: bool = field(default=True, metadata={"help": "Train on the CPU (False on a GPU)."})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 training (GPU only)."})
    seed: int = field(default=0, metadata={"help": "Seed for sampling and initialisation."})

    def to_trl(self, output_dir: Path, **overrides: Any) -> GRPOConfig:
        """TRL's `GRPOConfig` with every paper option set explicitly."""
        from trl import GRPOConfig

        options: dict[str, Any] = dict(
            output_dir=str(output_dir), beta=self.beta, epsilon=self.epsilon,
            epsilon_high=self.epsilon_high, loss_type=self.loss_type,
            scale_rewards=self.scale_rewards, **PINNED_TRL_OPTIONS,
            num_generations=self.num_generations,
            max_completion_length=self.max_completion_length, temperature=self.temperature,
            learning_rate=self.learning_rate, max_steps=self.max_steps,
            per_device_train_batch_size=self.per_device_train_batch_size,
            use_vllm=self.use_vllm, vllm_mode=self.vllm_mode, use_cpu=self.use_cpu,
            bf16=self.bf16, seed=self.seed, gradient_checkpointing=self.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
        )
        options.update(overrides)
        return GRPOConfig(**options)

    def lora(self) -> LoraConfig:
        from peft import LoraConfig

        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha,
                          target_modules=self.lora_target_modules, task_type="CAUSAL_LM")
