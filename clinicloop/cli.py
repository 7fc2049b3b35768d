"""The `clinicloop` command: serve the model, build the tiny offline model, manage keys and the
conversation store. Every sub-command's --help says what it does."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from clinicloop.config import Settings

if TYPE_CHECKING:
    from clinicloop.rl.grpo import TrainResult

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
model_app = typer.Typer(help="Build models offline.", no_args_is_help=True)
keys_app = typer.Typer(help="Create API keys.", no_args_is_help=True)
store_app = typer.Typer(help="The conversation store: schema and redaction.", no_args_is_help=True)
verify_app = typer.Typer(
    help="The verifier: simulate consultations, score logged conversations with rubrics.",
    no_args_is_help=True)
app.add_typer(model_app, name="model")
rl_app = typer.Typer(help="Retrain the policy with GRPO (TRL) from rubric rewards.",
                     no_args_is_help=True)
app.add_typer(verify_app, name="verify")
app.add_typer(rl_app, name="rl")
app.add_typer(keys_app, name="keys")
app.add_typer(store_app, name="store")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Bind port (default 8000).")] = None,
    model: Annotated[Path | None, typer.Option(
        help="A GGUF file to serve (default: build and serve the tiny model).")] = None,
    engine: Annotated[str | None, typer.Option(help="llamacpp or openai.")] = None,
    upstream_url: Annotated[str | None, typer.Option(
        help="For --engine openai: the upstream's base URL, ending in /v1.")] = None,
) -> None:
    """Serve the OpenAI-compatible API (chat, completions, models, health, metrics)."""
    import uvicorn

    from clinicloop.serving.app import create_app

    settings = Settings()
    overrides = {"host": host, "port": port}
    settings.server = settings.server.model_copy(
        update={k: v for k, v in overrides.items() if v is not None})
    engine_overrides = {"model_path": model, "kind": engine, "upstream_url": upstream_url}
    settings.engine = settings.engine.model_copy(
        update={k: v for k, v in engine_overrides.items() if v is not None})
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # migrations log each plugin at INFO
    uvicorn.run(create_app(settings), host=settings.server.host, port=settings.server.port,
                log_level="info")


@model_app.command("build-tiny")
def build_tiny(
    size: Annotated[str, typer.Option(help="tiny (tests, demo) or bench (benchmarks).")] = "tiny",
    seed: Annotated[int, typer.Option(help="Training seed; same seed, same weights.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Cache root (default: models_dir).")] = None,
) -> None:
    """Build the tiny medical chat model offline (corpus, tokenizer, Qwen2, GGUF); cached."""
    from clinicloop.model.tiny import build_tiny as build

    tiny = build(size, seed=seed, out_root=out or Settings().models_dir)
    typer.echo(json.dumps({"name": tiny.name, "hf_dir": str(tiny.hf_dir),
                           "gguf_f16": str(tiny.gguf_f16), "gguf_q8_0": str(tiny.gguf_q8_0)}))


@keys_app.command("new")
def keys_new() -> None:
    """Print a new API key (give it to the client) and its hash (put it in the config)."""
    from clinicloop.serving.auth import new_key

    key, hashed = new_key()
    typer.echo(json.dumps({"key": key, "hash": hashed}))


@store_app.command("migrate")
def store_migrate() -> None:
    """Create or upgrade the store's schema (Alembic) at store.url."""
    from clinicloop.store.db import Store

    store = Store(Settings().store.url)
    store.migrate()
    typer.echo("store schema at head")


@store_app.command("redaction-recall")
def redaction_recall(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Measure PHI redaction recall on the shipped synthetic PHI set."""
    from clinicloop.store.redact_eval import main

    main(["--json"] if as_json else [])


@verify_app.command("score")
def verify_score(
    judge_url: Annotated[str | None, typer.Option(
        help="Judge: an OpenAI-compatible base URL ending in /v1 (default: the tiny model "
             "in-process).")] = None,
    since: Annotated[str | None, typer.Option(
        help="Only turns logged at or after this ISO 8601 time (UTC if naive).")] = None,
    model_version: Annotated[str | None, typer.Option(
        help="Only turns served by this model version.")] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many turns.")] = None,
    template: Annotated[str, typer.Option(
        help="split (acceptable / unacceptable by sign, the paper's) or healthbench.")] = "split",
    out: Annotated[Path | None, typer.Option(help="Write the summary as JSON here.")] = None,
    store_url: Annotated[str | None, typer.Option(
        help="The store (default: store.url from the settings).")] = None,
) -> None:
    """Score logged conversations not yet scored: generate or reuse rubrics, judge every item,
    write verdicts and scores back to the store. Resumable: finished verdicts are never redone."""
    from clinicloop.verifier.score_logs import score_command

    score_command(store_url or Settings().store.url, judge_url, since, model_version, limit,
                  template, out)


@verify_app.command("simulate")
def verify_simulate(
    doctor_url: Annotated[str | None, typer.Option(
        help="The doctor: an OpenAI-compatible base URL ending in /v1, e.g. our own server "
             "(default: the tiny model in-process).")] = None,
    patient_url: Annotated[str | None, typer.Option(
        help="The patient simulator's model, same form (default: the tiny model in-process).")
    ] = None,
    scripts: Annotated[int, typer.Option(help="How many patient scripts to run.")] = 10,
    max_turns: Annotated[int, typer.Option(help="Doctor turns before the budget ends it.")] = 6,
    seed: Annotated[int, typer.Option(help="Which scripts, and sampling.")] = 0,
    out: Annotated[Path, typer.Option(help="Folder for simulate.json.")] = Path("var/simulate"),
    store_url: Annotated[str | None, typer.Option(
        help="Where consultations are stored (default: store.url from the settings).")] = None,
    llm_gate: Annotated[bool, typer.Option(
        help="Also ask the patient model whether the consultation is over.")] = False,
    llm_fact_check: Annotated[bool, typer.Option(
        help="Also ask the patient model to check each reply against the record.")] = False,
) -> None:
    """Run consultations between the patient simulator and a doctor model, store them as
    conversations, and report privacy score, fact score, termination accuracy and turns."""
    from clinicloop.verifier.simulate_cli import simulate_command

    simulate_command(doctor_url, patient_url, scripts, max_turns, store_url, out, seed,
                     llm_gate=llm_gate, llm_fact_check=llm_fact_check)


def _policy_dir(model_dir: Path | None) -> Path:
    from clinicloop.model.tiny import build_tiny

    return model_dir or build_tiny("tiny", out_root=Settings().models_dir).hf_dir


def _echo_training(result: TrainResult) -> None:
    curve = ", ".join(f"{r:.2f}" for r in result.reward_curve)
    typer.echo(f"adapter: {result.adapter_dir}\nreward per step: {curve}\n"
               f"wall time: {result.wall_s:.1f} s")


PolicyDir = Annotated[Path | None, typer.Option(
    "--model-dir", help="HF policy directory (default: the tiny model).")]
Steps = Annotated[int, typer.Option(help="GRPO optimizer steps.")]
VerifierUrl = Annotated[str | None, typer.Option(
    help="Judge and rubric generator: an OpenAI-compatible base URL ending in /v1 (default: the "
         "tiny model in-process).")]


@rl_app.command("stage-rule")
def rl_stage_rule(
    steps: Steps = 20,
    prompts: Annotated[int, typer.Option(help="Red-flag prompts to train on.")] = 32,
    model_dir: PolicyDir = None,
    out: Annotated[Path, typer.Option(help="Where the adapter and train.json go.")] = Path(
        "var/rl/stage-rule"),
) -> None:
    """Rule-based stage: GRPO (the paper's options) with a LoRA on verifiable prompts, the
    corpus's red-flag consultations, rewarded when the reply advises emergency care."""
    from clinicloop.rl.config import PaperGRPOConfig
    from clinicloop.rl.stages import rule_stage

    _echo_training(rule_stage(_policy_dir(model_dir), out, PaperGRPOConfig(max_steps=steps),
                              n_prompts=prompts))


@rl_app.command("stage-rubric")
def rl_stage_rubric(
    steps: Steps = 20,
    data: Annotated[Path | None, typer.Option(
        help="HealthBench-format JSONL with the prompts and rubrics to train on (canaried rows "
             "are refused). Default: corpus prompts with rubrics the verifier writes.")] = None,
    prompts: Annotated[int, typer.Option(help="Corpus prompts, without --data.")] = 32,
    verifier_url: VerifierUrl = None,
    model_dir: PolicyDir = None,
    out: Annotated[Path, typer.Option(help="Where the adapter and train.json go.")] = Path(
        "var/rl/stage-rubric"),
) -> None:
    """Rubric-based stage: GRPO rewarded by the judge's HealthBench score of each completion
    against its prompt's rubric, plus the paper's length reward."""
    from clinicloop.rl.config import PaperGRPOConfig
    from clinicloop.rl.stages import Endpoint, healthbench_rows, rubric_stage

    rows = None if data is None else healthbench_rows(data)
    _echo_training(rubric_stage(_policy_dir(model_dir), out, Endpoint(url=verifier_url),
                                PaperGRPOConfig(max_steps=steps), rows=rows, n_prompts=prompts,
                                models_dir=Settings().models_dir))


@rl_app.command("stage-multiturn")
def rl_stage_multiturn(
    steps: Steps = 20,
    scripts: Annotated[int, typer.Option(help="Patient scripts to consult.")] = 16,
    max_turns: Annotated[int, typer.Option(help="Doctor turns per consultation.")] = 3,
    policy_url: Annotated[str | None, typer.Option(
        help="The policy as a chat model for the consultations, e.g. a `vllm serve` of "
             "--model-dir (default: the tiny model's GGUF in-process).")] = None,
    verifier_url: VerifierUrl = None,
    model_dir: PolicyDir = None,
    seed: Annotated[int, typer.Option(help="Which scripts, where dialogues are cut.")] = 0,
    out: Annotated[Path, typer.Option(help="Where the adapter and train.json go.")] = Path(
        "var/rl/stage-multiturn"),
) -> None:
    """Multi-turn stage: the policy consults the patient simulator; each dialogue is cut after a
    patient turn, the generator writes fresh rubrics for that slice, and the policy's next reply
    is what GRPO scores."""
    from clinicloop.rl.config import PaperGRPOConfig
    from clinicloop.rl.stages import Endpoint, multiturn_stage
    from clinicloop.verifier.patients import load_scripts
    from clinicloop.verifier.simulate_cli import select_scripts

    chosen = select_scripts(load_scripts(), scripts, seed)
    _echo_training(multiturn_stage(
        _policy_dir(model_dir), out, Endpoint(url=policy_url), Endpoint(url=verifier_url),
        chosen, PaperGRPOConfig(max_steps=steps, seed=seed), max_turns=max_turns,
        models_dir=Settings().models_dir))


@rl_app.command("refresh")
def rl_refresh(
    stage: Annotated[str, typer.Option(
        help="`rubric`: generated rubrics graded by the judge plus the length reward; `rule`: "
             "only the rubrics' machine-checked items.")] = "rubric",
    steps: Steps = 20,
    max_score: Annotated[float | None, typer.Option(
        help="Train only on prompts whose logged reply scored at most this.")] = None,
    margin: Annotated[float, typer.Option(
        help="Publish if the held-out score is at least serving's minus this.")] = 0.0,
    canary_share: Annotated[float | None, typer.Option(
        help="Put a passing candidate on canary with this share instead of activating it.")
    ] = None,
    judge_url: VerifierUrl = None,
    server_url: Annotated[str | None, typer.Option(
        help="The running server, e.g. http://127.0.0.1:8000: the swap goes through its admin "
             "API (key from CLINICLOOP_ADMIN_KEY). Without it only the registry file changes.")
    ] = None,
    model_dir: Annotated[Path | None, typer.Option(
        "--model-dir", help="HF weights of the serving version (default: what the registry "
                            "records for it).")] = None,
    run_id: Annotated[str | None, typer.Option(
        help="Resume this run (default: the latest unfinished run, else a new one).")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where runs are kept.")] = Path("var/rl/refresh"),
    until: Annotated[str | None, typer.Option(
        help="Stop after this step, e.g. `gate` to train and evaluate without publishing; "
             "run again without it to continue.")] = None,
) -> None:
    """Retrain from logged traffic: logged prompts -> GRPO LoRA -> held-out rubric gate against the
    serving version -> publish and hot-swap. Resumable: re-run after a crash to continue."""
    from clinicloop.rl.config import PaperGRPOConfig
    from clinicloop.rl.refresh import Paths, RefreshOptions, refresh

    settings = Settings()
    options = RefreshOptions(stage=stage, max_score=max_score, margin=margin,
                             canary_share=canary_share, judge_url=judge_url,
                             grpo=PaperGRPOConfig(max_steps=steps))
    paths = Paths(store_url=settings.store.url, registry_dir=settings.registry.dir,
                  runs_dir=runs_dir, models_dir=settings.models_dir, server_url=server_url,
                  admin_key=os.environ.get("CLINICLOOP_ADMIN_KEY"))
    job = refresh(paths, options, run_id=run_id, policy_hf=model_dir, until=until)
    if not job.state.finished:
        typer.echo(f"stopped after {until}; run {job.state.run_id} continues at "
                   f"{job.next_step()} ({job.run_dir})")
        return
    report = json.loads((job.run_dir / "report.json").read_text())
    typer.echo(f"before={report['before']} after={report['after']} "
               f"swapped={report['swapped']} report={job.run_dir / 'report.md'}")


if __name__ == "__main__":
    app()
