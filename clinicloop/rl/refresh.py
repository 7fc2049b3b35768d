"""`clinicloop rl refresh`: retrain the serving policy on its own logged traffic, gate the result on
a held-out rubric set, and swap it in.

A run is a directory under `runs_dir`; its steps run in order, each writing its output there and
then being recorded as done in `state.json`:

  prompts    logged prompts (`prompts.py`) with their rubrics (reviewers' edits applied by the
             generator) -> train.jsonl, heldout.jsonl
  calibrate  the judge measured against every reviewer label in the store (its stored verdicts,
             else graded now) -> calibration.json; the labels keyed for this judge, which
             rewards and the gate's grading take instead of its verdicts -> labels.json. A judge
             below `judge_floor` (or too few labels, when told to refuse) refuses the run here,
             before anything trains: decision.json says why, and only the report follows
  baseline   the serving version answers the held-out prompts; the judge grades -> baseline.json
  train      GRPO (TRL) trains a LoRA on the serving version's base HF weights, starting from
             its adapter if it has one, in this process or in `train_processes` through
             `accelerate launch` (`train_job.py`) -> train/
  publish    what the serving backend loads as an adapter (`publish=lora`, the default): a
             llama.cpp LoRA GGUF beside the peft directory, or the peft directory a vLLM loads;
             or (`publish=merged`, llama.cpp) the adapter merged, written as GGUF and
             quantized -> candidate/
  candidate  the candidate answers the same prompts, the same judge grades -> candidate.json
  gate       `gate.decide`, with the judge's calibration as a note -> decision.json
  swap       if the gate passed: registered as a version and activated (or put on canary)
  report     report.json, report.md, reward_curve.png

A re-run continues the latest run, if it is unfinished, at its first step not done; a step
killed midway starts over, and since every output is built under a `.part` name in the run
directory and renamed into place, nothing half-written is ever read and a kill leaves nothing
outside the run. Nothing touches serving before `swap`, which is idempotent (a fixed version id;
activating the active version changes nothing), so a crash anywhere leaves the old version
serving. A lock file, and on a Postgres store an advisory lock (refresh pods on several nodes),
stop two jobs at once. The run's options are stored with it, so a resumed run trains and grades
exactly as it began.

A step that raises is recorded in the run (`failed`), and the error says the three ways on: run
again (the step is retried: right for a server that was down), `fresh` (abandon the run and start
a new one) or `abandon` (give the run up and stop). Only the latest run is ever resumed: an
abandoned run, or one a newer run superseded, never is.

With a maintenance window (`Paths.window`, `rl refresh --window`; `window.py`) the steps from
`train` to `swap` run inside a window on the serving gateway: opened (requests drained, the engine
released) before `train`, the engine resumed before `candidate`, closed after `swap`; a step that
raises closes it too, and a killed job's window closes when its lease runs out. The window's
record (treatment, counts of queued, fallback and refused requests, times) goes in the run's
state and report. A resumed run opens a new window; one resumed after `publish` does not release
the engine.

A candidate is the serving version's base plus the new adapter, so versions share one base in
memory on both engines. Versions are opened for evaluation by their backend (`backends/kinds.py`,
never asked which kind it is): in-process on llama.cpp; through the upstream for `vllm` and
`openai` versions, where the candidate adapter is loaded at run time under the version id it will
be published as (`load_inplace`, so loading it again is harmless) and left loaded, the name the
server then serves it by.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field

from clinicloop.backends.kinds import Backend, open_backend
from clinicloop.backends.registry import (
    Registry,
    RegistryState,
    Version,
    VersionSpec,
    open_registry,
)
from clinicloop.config import DEFAULT_MODELS_DIR, EngineSettings, RegistrySettings
from clinicloop.rl.config import PaperGRPOConfig
from clinicloop.rl.gate import (
    Evaluation,
    GateDecision,
    HeldoutExample,
    JudgeCheck,
    decide,
    evaluate,
    judge_check,
)
from clinicloop.rl.prompts import LoggedPrompt, logged_prompts
from clinicloop.rl.publish import build_dir, publishable_adapter, publishable_gguf
from clinicloop.rl.report import write_refusal_report, write_report
from clinicloop.rl.runfiles import read_rows, write_atomic
from clinicloop.rl.stages import Endpoint, Row
from clinicloop.rl.train_job import TrainSpec, train
from clinicloop.rl.window import MaintenanceWindow, WindowError, WindowOptions
from clinicloop.store.claims import REFRESH_LOCK_KEY, try_advisory_lock
from clinicloop.store.db import Store
from clinicloop.store.reviews import latest_labels, turns_with_feedback
from clinicloop.verifier.calibration import Calibration, calibrate_labelled, label_verdicts
from clinicloop.verifier.client import EngineChatClient
from clinicloop.verifier.generator import RubricGenerator, rule_items
from clinicloop.verifier.judge import Judge
from clinicloop.verifier.rubrics import RubricItem

STEPS = ("prompts", "calibrate", "baseline", "train", "publish", "candidate", "gate", "swap",
         "report")
#: The steps a run refused at `calibrate` skips: nothing is trained, evaluated or published.
SKIPPED_WHEN_REFUSED = ("baseline", "train", "publish", "candidate", "gate", "swap")
#: The steps a maintenance window spans; the engine is released for the first two.
WINDOW_STEPS = ("train", "publish", "candidate", "gate", "swap")


class RefreshBusy(RuntimeError):
    """Another refresh job holds the lock."""


class RefreshFailed(RuntimeError):
    """A step of a run raised; the message names the run, the step, the cause and the ways on."""


class RefreshOptions(BaseModel):
    """What a run trains and grades with; stored in the run, so a resumed run keeps them."""

    stage: Literal["rule", "rubric"] = Field(
        "rubric", description="`rubric`: the generator's rubric for each prompt, graded by the "
        "judge, plus the length reward; `rule`: only the rubric's `kind:rule` items (verifiable, "
        "checked without a model), and prompts with none are skipped.")
    heldout_fraction: float = Field(0.2, description="Share of prompts (by hash) held out.")
    max_score: float | None = Field(
        None, description="Train only on prompts whose logged reply scored at most this.")
    include_unscored: bool = Field(True, description="Keep prompts the verifier has not scored.")
    since: datetime | None = Field(None, description="Only turns logged from this time on.")
    max_train_prompts: int | None = Field(None, description="Cap on training prompts.")
    eval_max_tokens: int = Field(128, description="Tokens per held-out answer (greedy).")
    margin: float = Field(0.0, description="The candidate may score this much below serving.")
    canary_share: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Put a passing candidate on canary with this share instead of activating.")
    publish: Literal["lora", "merged"] = Field(
        "lora", description="`lora`: the candidate is the serving version's base plus the new "
        "adapter (a llama.cpp LoRA GGUF, or the peft directory an upstream loads), sharing the "
        "base in memory; `merged` (llama.cpp only): the adapter merged into the weights and "
        "written as a whole GGUF of type `quant`.")
    quant: str = Field("q8_0", description="`publish=merged`: the GGUF type of the candidate.")
    judge_url: str | None = Field(
        None, description="Judge and rubric generator: an OpenAI-compatible base URL ending in "
        "/v1 (default: the tiny model in-process).")
    judge_model: str | None = Field(None, description="Model name at `judge_url`.")
    judge_floor: float | None = Field(
        None, ge=0.0, le=1.0, description="Refuse to publish when the judge's macro-F1 on the "
        "reviewers' labelled items is below this (None: no check).")
    judge_min_labels: int = Field(
        30, ge=1, description="Fewer labelled items than this: the floor is not checked, and "
        "`judge_too_few_labels` decides.")
    judge_too_few_labels: Literal["publish", "refuse"] = Field(
        "publish", description="With too few labels: `publish` (the decision says so) or "
        "`refuse`.")
    feedback: Literal["up", "down"] | None = Field(
        None, description="Train only on prompts whose logged reply got this rating from an "
        "app (`POST /v1/feedback`); held-out prompts are kept as they are.")
    grpo: PaperGRPOConfig = Field(default_factory=PaperGRPOConfig)
    train_processes: int = Field(
        1, ge=1, description="Processes the `train` step runs in: 1 trains in this process; "
        "N > 1 runs only that step through `accelerate launch` in N data-parallel processes "
        "(one per GPU of a multi-GPU node; ranks on the CPU where training is on the CPU), "
        "every other step staying in this one.")


class StepFailure(BaseModel):
    step: str
    error: str
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class RunState(BaseModel):
    run_id: str
    created_at: datetime
    options: RefreshOptions
    serving_version: str
    policy_hf: Path
    done: dict[str, float] = Field(default_factory=dict, description="step -> seconds it took")
    swapped: Literal["activated", "canary"] | None = None
    version_id: str | None = None
    windows: list[dict[str, Any]] = Field(
        default_factory=list, description="Maintenance windows the run held, as the gateway "
        "summarised each when it closed.")
    server_memory: dict[str, Any] | None = Field(
        None, description="The server's memory account (`GET /admin/v1/versions`) right after "
        "a swap through its admin API.")
    failed: StepFailure | None = Field(None, description="The last step that raised, until it "
                                       "passes.")
    abandoned: str | None = Field(None, description="Why the run was given up; never resumed.")
    refused: str | None = Field(
        None, description="Why the run was refused before training (its judge below the floor): "
        "it goes on to its report only.")

    @property
    def finished(self) -> bool:
        return "report" in self.done

    @property
    def resumable(self) -> bool:
        return not self.finished and self.abandoned is None


class Paths(BaseModel):
    """Where a refresh reads and writes; not stored with a run (a resumed run may move hosts)."""

    model_config = ConfigDict(extra="forbid")

    store_url: str
    registry_dir: Path
    registry_storage: Literal["auto", "file", "store"] = Field(
        "auto", description="Where the registry lives: `registry.storage` of the settings.")
    runs_dir: Path = Path("var/rl/refresh")
    models_dir: Path = DEFAULT_MODELS_DIR
    server_url: str | None = Field(
        None, description="A running clinicloop server: the swap goes through its admin API "
        "(which loads the version first and refuses one that fails). Without it the registry "
        "is changed and the servers following it serve the new version.")
    admin_key: str | None = None
    judge_api_key: str | None = None
    window: WindowOptions | None = Field(
        None, description="Train inside a maintenance window on `server_url`'s gateway (its "
        "engine released, clients queued, sent to a fallback or refused), for retraining on the "
        "GPU that serves.")
    engine: EngineSettings = Field(
        default_factory=EngineSettings, description="How versions are opened to evaluate them: "
        "for a `vllm` or `openai` version the upstream's `upstream_url` (and key), where the "
        "candidate adapter is loaded under its version id; `llamacpp` versions run in-process.")

    def open_registry(self) -> Registry:
        return open_registry(RegistrySettings(dir=self.registry_dir,
                                              storage=self.registry_storage), self.store_url)


@contextmanager
def refresh_lock(runs_dir: Path, store_url: str | None = None) -> Iterator[None]:
    """One refresh at a time: a lock file in `runs_dir` (one machine, or pods sharing the
    volume), and with a Postgres `store_url` also the store's advisory lock, held until the job
    ends (refresh pods anywhere). Either one held elsewhere raises `RefreshBusy`."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    with (runs_dir / "refresh.lock").open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise RefreshBusy(f"another refresh is running (pid {lock.read().strip() or '?'})"
                              ) from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        try:
            with _store_lock(store_url):
                yield
        finally:
            lock.truncate(0)
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextmanager
def _store_lock(store_url: str | None) -> Iterator[None]:
    store = None if store_url is None else Store(store_url)
    if store is None or store.dialect != "postgresql":
        yield  # SQLite: one machine, where the lock file is enough
        return
    try:
        with try_advisory_lock(store, REFRESH_LOCK_KEY) as taken:
            if not taken:
                raise RefreshBusy("another refresh is running (it holds the store's advisory "
                                  "lock)")
            yield
    finally:
        store.dispose()


def _row(prompt: LoggedPrompt, rubric: list[RubricItem]) -> Row:
    return {"prompt_id": prompt.key, "prompt": prompt.messages,
            "rubrics": [i.model_dump(mode="json") for i in rubric]}


class Refresh:
    def __init__(self, state: RunState, run_dir: Path, paths: Paths,
                 progress: bool = True) -> None:
        self.state = state
        self.run_dir = run_dir
        self.paths = paths
        self.options = state.options
        self.progress = progress

    # -- runs ----------------------------------------------------------------------------------

    @classmethod
    def open(cls, paths: Paths, options: RefreshOptions, *, run_id: str | None = None,
             policy_hf: Path | None = None, fresh: bool = False,
             progress: bool = True) -> Refresh:
        """The run `run_id`, else the latest run if it is resumable, else a new run with
        `options`. `fresh`: abandon the latest run if it is resumable and begin a new one."""
        if run_id is not None:
            job = cls(_read_state(paths.runs_dir, run_id), paths.runs_dir / run_id, paths,
                      progress)
            if job.state.abandoned is not None:
                raise ValueError(f"refresh run {run_id} was abandoned ({job.state.abandoned})")
            job._resumed()
            return job
        latest = latest_run(paths.runs_dir)
        if latest is not None and latest.resumable and not fresh:
            job = cls(latest, paths.runs_dir / latest.run_id, paths, progress)
            job._resumed()
            return job
        registry = paths.open_registry().read()
        serving = _serving(registry)
        hf = policy_hf or serving.hf_dir
        if hf is None:
            raise ValueError(f"the serving version {serving.id!r} records no HF weights to train; "
                             "pass the policy's HF directory")
        now = datetime.now(UTC)
        new_id = f"{now:%Y%m%dT%H%M%S}-{os.urandom(2).hex()}"
        if latest is not None and latest.resumable:
            abandon(paths.runs_dir, latest.run_id, f"superseded by run {new_id} (--fresh)")
        state = RunState(run_id=new_id, created_at=now, options=options,
                         serving_version=serving.id, policy_hf=hf.resolve())
        run_dir = paths.runs_dir / new_id
        run_dir.mkdir(parents=True)
        refresh = cls(state, run_dir, paths, progress)
        refresh._save()
        return refresh

    def _resumed(self) -> None:
        failed = self.state.failed
        self._say(f"resuming at {self.next_step()} (with the options it began with"
                  + ("" if failed is None else f"; it failed at {failed.step}: {failed.error}")
                  + ")")

    def _save(self) -> None:
        write_atomic(self.run_dir / "state.json", self.state.model_dump_json(indent=2))

    def next_step(self) -> str | None:
        skipped = SKIPPED_WHEN_REFUSED if self.state.refused else ()
        return next((s for s in STEPS if s not in self.state.done and s not in skipped), None)

    def run(self, until: str | None = None) -> RunState:
        """Run the steps not done yet, stopping after `until` if given (e.g. "gate": train and
        evaluate without publishing; a later run without it publishes). The caller holds
        `refresh_lock`."""
        if until is not None and until not in STEPS:
            raise ValueError(f"until must be one of {', '.join(STEPS)}, not {until!r}")
        if self.paths.window is not None and self.paths.server_url is None:
            raise ValueError("a maintenance window is opened on a running server: give its URL "
                             "(--server-url)")
        window: MaintenanceWindow | None = None
        try:
            while (step := self.next_step()) is not None:
                if step in WINDOW_STEPS and self.paths.window is not None and window is None:
                    window = self._open_window(step)
                if step == "candidate" and window is not None:
                    window.resume()
                self._run_step(step)
                if window is not None:
                    window.check()
                    if step == "swap":
                        window, closing = None, window
                        self._close_window(closing)
                if step == until:
                    break
            if window is not None:  # stopped by `until` inside the window
                window, closing = None, window
                self._close_window(closing)
        except WindowError as exc:
            if window is not None:
                self._close_window(window, failing=True)
            raise RefreshFailed(f"run {self.state.run_id}: {exc}; run again to go on from "
                                f"{self.next_step()}") from exc
        except BaseException:
            if window is not None:
                self._close_window(window, failing=True)
            raise
        return self.state

    def _run_step(self, step: str) -> None:
        self._say(f"{step} ...")
        started = time.perf_counter()
        try:
            getattr(self, f"_step_{step}")()
        except Exception as exc:
            cause = f"{type(exc).__name__}: {exc}"
            self.state.failed = StepFailure(step=step, error=cause)
            self._save()
            raise RefreshFailed(
                f"run {self.state.run_id} failed at step {step}: {cause}; run again to "
                "retry the step, with --fresh to start a new run, or with --abandon to give "
                "this one up") from exc
        self.state.done[step] = round(time.perf_counter() - started, 3)
        self.state.failed = None
        self._save()

    def _open_window(self, step: str) -> MaintenanceWindow:
        assert self.paths.window is not None and self.paths.server_url is not None
        window = MaintenanceWindow(
            self.paths.server_url, self.paths.admin_key, self.paths.window,
            f"rl refresh {self.state.run_id}: {step}",
            release_engine=step in ("train", "publish"))
        window.open()
        self._say(f"maintenance window open ({window.status and window.status['treatment']}, "
                  f"engine {window.status and window.status['engine']})")
        return window

    def _close_window(self, window: MaintenanceWindow, failing: bool = False) -> None:
        window.close(failing)
        if window.summary is not None:
            self.state.windows.append(window.summary)
            self._save()
        self._say("maintenance window closed" + ("" if window.summary is None else (
            ": " + ", ".join(f"{k} {v}" for k, v in window.summary["counts"].items()))))

    def _say(self, text: str) -> None:
        if self.progress:
            print(f"refresh {self.state.run_id}: {text}", flush=True)

    # -- steps ---------------------------------------------------------------------------------

    def _step_prompts(self) -> None:
        o = self.options
        store = Store(self.paths.store_url)
        try:
            split = logged_prompts(store, heldout_fraction=o.heldout_fraction, since=o.since,
                                   max_score=o.max_score, include_unscored=o.include_unscored)
            train = split.train
            if o.feedback is not None:
                rated = turns_with_feedback(store, o.feedback)
                train = [p for p in train if p.turn_id in rated]
            feedback_filtered = len(split.train) - len(train)
            train = train[: o.max_train_prompts]
            rubrics = asyncio.run(self._rubrics(train + split.heldout, store))
        finally:
            store.dispose()
        counts = {"seen": split.seen, "duplicates": split.duplicates, "filtered": split.filtered}
        if o.feedback is not None:
            counts[f"without_feedback_{o.feedback}"] = feedback_filtered
        for name, prompts, items in (("train", train, rubrics[: len(train)]),
                                     ("heldout", split.heldout, rubrics[len(train):])):
            rows = [_row(p, i) for p, i in zip(prompts, items, strict=True)
                    if any(item.points > 0 for item in i)]
            counts[name] = len(rows)
            counts[f"{name}_without_rubric"] = len(prompts) - len(rows)
            write_atomic(self.run_dir / f"{name}.jsonl", "".join(
                json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        write_atomic(self.run_dir / "prompts.json", json.dumps(counts, indent=2))
        self._say(", ".join(f"{k} {v}" for k, v in counts.items()))
        if not counts["train"] or not counts["heldout"]:
            raise ValueError(f"not enough logged prompts with a rubric to train and evaluate "
                             f"({counts['train']} train, {counts['heldout']} held out)")

    async def _rubrics(self, prompts: list[LoggedPrompt], store: Store) -> list[list[RubricItem]]:
        if self.options.stage == "rule":
            return [rule_items(p.messages) for p in prompts]
        async with self._judge_endpoint().open(self.paths.models_dir) as client:
            generator = RubricGenerator(client, store=store, seed=self.options.grpo.seed)
            return [(await generator.for_conversation(p.messages)).items for p in prompts]

    def _step_calibrate(self) -> None:
        store = Store(self.paths.store_url)
        try:
            # Without labels there is nothing to measure, nor any judge to open.
            found = asyncio.run(self._calibrate(store)) if latest_labels(store) else None
        finally:
            store.dispose()
        calibration, labels = found or (None, {})
        write_atomic(self.run_dir / "labels.json", json.dumps(labels))
        if calibration is not None:
            write_atomic(self.run_dir / "calibration.json", calibration.model_dump_json(indent=2))
        check = self._judge_check(calibration)
        self._say("; ".join(check.refusals + check.notes) or "no labelled items")
        if check.refusals:
            # Refused before hours of training that no gate could let through.
            decision = GateDecision(publish=False, reasons=check.refusals + check.notes,
                                    candidate_score=None, serving_score=None,
                                    margin=self.options.margin)
            write_atomic(self.run_dir / "decision.json", decision.model_dump_json(indent=2))
            self.state.refused = "; ".join(check.refusals)
            self._say("refused before training: " + self.state.refused)

    async def _calibrate(self, store: Store) -> tuple[Calibration, dict[str, bool]]:
        async with self._judge_endpoint().open(self.paths.models_dir) as client:
            judge = Judge(client)
            calibration = await calibrate_labelled(store, judge, seed=self.options.grpo.seed)
            labels = await asyncio.to_thread(label_verdicts, store, client.model, judge.template)
        return calibration, labels

    def _judge_check(self, calibration: Calibration | None) -> JudgeCheck:
        o = self.options
        return judge_check(calibration, floor=o.judge_floor, min_labels=o.judge_min_labels,
                           too_few=o.judge_too_few_labels)

    def calibration(self) -> Calibration | None:
        """The judge's calibration on the labelled items; None when there were none."""
        found = self.run_dir / "calibration.json"
        return Calibration.model_validate_json(found.read_text()) if found.exists() else None

    def labels(self) -> dict[str, bool]:
        """Reviewers' labels keyed by the verdict keys of this run's judge."""
        return json.loads((self.run_dir / "labels.json").read_text())

    def _step_baseline(self) -> None:
        self._evaluate("baseline.json", self.serving)

    def _step_train(self) -> None:
        o = self.options

        def build(out: Path) -> None:
            # A version is its base plus at most one adapter: go on training the serving one.
            train(TrainSpec(stage=o.stage, policy_hf=self.state.policy_hf, output_dir=out,
                            grpo=o.grpo, rows=self.run_dir / "train.jsonl",
                            init_adapter=self.serving.adapter_dir, judge=self._judge_endpoint(),
                            models_dir=self.paths.models_dir, labels=self.labels()),
                  o.train_processes)

        build_dir(self.run_dir / "train", build)

    def _step_publish(self) -> None:
        # Every file publishing writes appears under its final name only when complete.
        adapter = self.run_dir / "train" / "adapter"
        if self.options.publish == "merged":
            if not self.serving.base_is_file:
                raise ValueError(f"publish=merged writes a GGUF; version "
                                 f"{self.serving.id!r} is served by {self.serving.backend}, "
                                 "which loads adapters: use publish=lora")
            publishable_gguf(self.state.policy_hf, adapter, self.run_dir / "candidate",
                             self.options.quant)
        else:
            publishable_adapter(self._backend(self.serving), self.state.policy_hf, adapter,
                                self.run_dir / "candidate")

    def _step_candidate(self) -> None:
        self._evaluate("candidate.json", self._candidate())

    def _step_gate(self) -> None:
        decision = decide(self.evaluation("candidate"), self.evaluation("baseline"),
                          margin=self.options.margin,
                          judge=self._judge_check(self.calibration()))
        write_atomic(self.run_dir / "decision.json", decision.model_dump_json(indent=2))
        self._say(("publish: " if decision.publish else "refused: ") + "; ".join(decision.reasons))

    def _step_swap(self) -> None:
        decision = self.decision()
        if not decision.publish:
            return
        metrics = {"heldout_score": decision.candidate_score,
                   "parent_heldout_score": decision.serving_score,
                   "refresh_run": self.state.run_id, "stage": self.options.stage}
        candidate = self._candidate()
        version = VersionSpec(
            id=candidate.id, parent=candidate.parent, backend=candidate.backend,
            model_path=candidate.model_path, lora_path=candidate.lora_path,
            adapter_dir=candidate.adapter_dir, hf_dir=candidate.hf_dir, metrics=metrics)
        share = self.options.canary_share
        if self.paths.server_url:
            active = self._swap_through_server(version, share)
        else:
            active = self._swap_in_registry(version, share)
        self.state.version_id = version.id
        self.state.swapped = "canary" if share is not None else "activated"
        self._say(f"{self.state.swapped} {version.id} (active: {active})")

    def _step_report(self) -> None:
        state = self.state.model_dump(mode="json")
        if self.state.refused:
            write_refusal_report(self.run_dir, state, self.decision())
        else:
            write_report(self.run_dir, state, self.evaluation("baseline"),
                         self.evaluation("candidate"), self.decision())

    # -- helpers -------------------------------------------------------------------------------

    def decision(self) -> GateDecision:
        return GateDecision.model_validate_json((self.run_dir / "decision.json").read_text())

    def evaluation(self, name: str) -> Evaluation:
        """`baseline` or `candidate`."""
        return Evaluation.model_validate_json((self.run_dir / f"{name}.json").read_text())

    def _candidate(self) -> Version:
        """The published candidate as the version it would be registered as: the serving
        version's base with the new adapter (files resolved), or a merged GGUF of its own."""
        serving, out = self.serving, (self.run_dir / "candidate").resolve()
        if self.options.publish == "merged":
            return Version(id=self._version_id(), parent=serving.id, backend=serving.backend,
                           model_path=out / f"model-{self.options.quant}.gguf",
                           hf_dir=out / "hf")
        return Version(id=self._version_id(), parent=serving.id, backend=serving.backend,
                       model_path=serving.model_path,
                       lora_path=self._backend(serving).published_adapter(out),
                       adapter_dir=out / "adapter", hf_dir=self.state.policy_hf)

    def _version_id(self) -> str:
        return f"rl-{self.state.run_id}"

    @cached_property
    def serving(self) -> Version:
        """The version this run trains from and compares against (registered versions never
        change, so one read serves the whole run)."""
        return self.paths.open_registry().get(self.state.serving_version)

    def _backend(self, version: Version) -> Backend:
        """What opens `version` for evaluation: its backend kind, reached through the paths'
        engine settings (an upstream's URL); never a launch."""
        return open_backend(self.paths.engine.model_copy(update={
            "kind": version.backend, "upstream_command": None}), self.paths.models_dir)

    def _judge_endpoint(self) -> Endpoint:
        return Endpoint(url=self.options.judge_url, model=self.options.judge_model,
                        api_key=self.paths.judge_api_key)

    def _evaluate(self, out: str, version: Version) -> None:
        """Grade the held-out prompts answered by `version`, opened by its backend (in-process
        on llama.cpp, through the upstream otherwise; an adapter loaded there stays loaded, as
        it may be serving under the same name)."""
        examples = [HeldoutExample(prompt_id=r["prompt_id"], messages=r["prompt"],
                                   rubrics=r["rubrics"])
                    for r in read_rows(self.run_dir / "heldout.jsonl")]

        async def run() -> Evaluation:
            async with AsyncExitStack() as stack:
                backend = self._backend(version)
                await backend.start()
                stack.push_async_callback(backend.close)
                engine = await backend.open_version(version, version.id, own_adapter=False)
                stack.push_async_callback(engine.close)
                policy = EngineChatClient(engine)
                # Reviewers' labels stand in for the judge's verdicts where they apply.
                judge = Judge(await stack.enter_async_context(
                    self._judge_endpoint().open(self.paths.models_dir)), labels=self.labels())
                return await evaluate(policy, judge, examples,
                                      max_tokens=self.options.eval_max_tokens,
                                      seed=self.options.grpo.seed)

        evaluation = asyncio.run(run())
        write_atomic(self.run_dir / out, evaluation.model_dump_json(indent=2))
        self._say(f"{out.removesuffix('.json')} score {evaluation.score}")

    def _swap_in_registry(self, version: VersionSpec, share: float | None) -> str:
        registry = self.paths.open_registry()
        assert version.id is not None
        _check_serving(registry.read().active, self.state.serving_version, version.id)
        version.register_in(registry, self.serving.backend)
        if share is None:
            registry.activate(version.id)
        else:
            registry.set_canary(version.id, share)
        return str(registry.read().active)

    def _swap_through_server(self, version: VersionSpec, share: float | None) -> str:
        base = self.paths.server_url.rstrip("/").removesuffix("/v1")  # type: ignore[union-attr]
        headers = {"Authorization": f"Bearer {self.paths.admin_key}"} \
            if self.paths.admin_key else {}
        with httpx.Client(base_url=f"{base}/admin/v1", headers=headers, timeout=600) as http:
            _check_serving(_ok(http.get("/versions"))["active"], self.state.serving_version,
                           version.id)
            _ok(http.post("/versions", json=version.model_dump(mode="json")))
            listing = _ok(http.post(f"/versions/{version.id}/activate") if share is None else
                          http.post("/canary", json={"version": version.id, "share": share}))
        self.state.server_memory = listing.get("memory")
        return str(listing["active"])


def _read_state(runs_dir: Path, run_id: str) -> RunState:
    found = runs_dir / run_id / "state.json"
    if not found.exists():
        raise FileNotFoundError(f"no refresh run {run_id!r} in {runs_dir}")
    return RunState.model_validate_json(found.read_text())


def latest_run(runs_dir: Path) -> RunState | None:
    """The run begun last (the only one a re-run may resume), if any."""
    states = [RunState.model_validate_json(f.read_text()) for f in runs_dir.glob("*/state.json")]
    return max(states, key=lambda s: (s.created_at, s.run_id), default=None)


def abandon(runs_dir: Path, run_id: str | None = None, reason: str = "abandoned (--abandon)"
            ) -> RunState:
    """Mark `run_id` (default: the latest run) abandoned: it is never resumed. Its files stay in
    its directory for inspection. The caller holds `refresh_lock`."""
    state = _read_state(runs_dir, run_id) if run_id is not None else latest_run(runs_dir)
    if state is None or not state.resumable:
        what = "no refresh run" if state is None else f"run {state.run_id} is " + (
            "finished" if state.finished else "already abandoned")
        raise ValueError(f"nothing to abandon in {runs_dir}: {what}")
    state.abandoned = f"{reason} at {datetime.now(UTC).isoformat(timespec='seconds')}"
    write_atomic(runs_dir / state.run_id / "state.json", state.model_dump_json(indent=2))
    return state


def _serving(state: RegistryState) -> Version:
    if state.active is None:
        raise ValueError("the registry has no active version: start the server once first")
    return state.version(state.active)


def _check_serving(active: str | None, expected: str, ours: str | None) -> None:
    """Swap only onto the version the candidate was trained from and compared against."""
    if active not in (expected, ours):
        raise RuntimeError(f"the serving version changed from {expected!r} to {active!r} "
                           "since this run began; start a new refresh")


def _ok(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise RuntimeError(f"admin API {response.request.method} {response.request.url.path}: "
                           f"{response.status_code} {response.text}")
    return response.json()


def refresh(paths: Paths, options: RefreshOptions | None = None, *, run_id: str | None = None,
            policy_hf: Path | None = None, until: str | None = None, fresh: bool = False,
            progress: bool = True) -> Refresh:
    """Run (or resume) a refresh to its end, or to the step `until`; the `Refresh` holds its
    state and outputs. `fresh`: start a new run, abandoning an unfinished latest one."""
    with refresh_lock(paths.runs_dir, paths.store_url):
        job = Refresh.open(paths, options or RefreshOptions(), run_id=run_id,
                           policy_hf=policy_hf, fresh=fresh, progress=progress)
        job.run(until)
    return job
