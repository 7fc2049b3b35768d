"""The refresh job on the real tiny model: logged prompts -> GRPO -> gate -> swap, in the registry
and through a running server's admin API; the gate's refusal leaving serving untouched; a kill
mid-training resumed without redoing finished steps; a SIGKILL at every step boundary, each
re-run completing with serving untouched until the swap; a failed run that names its way out
(--fresh, --abandon); the lock, and on a Postgres store the advisory lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx
import pytest
from sqlalchemy import text as sql_text
from typer.testing import CliRunner

from clinicloop.backends.registry import BASE_ID, Registry
from clinicloop.cli import app
from clinicloop.rl.config import PaperGRPOConfig
from clinicloop.rl.refresh import (
    STEPS,
    Paths,
    Refresh,
    RefreshBusy,
    RefreshFailed,
    RefreshOptions,
    latest_run,
    refresh,
    refresh_lock,
)
from clinicloop.rl.stages import corpus_prompts
from clinicloop.store.claims import REFRESH_LOCK_KEY
from clinicloop.store.db import Store
from clinicloop.store.records import LoggedChoice, TurnRecord
from clinicloop.verifier.generator import rule_items
from tests.conftest import ROOT, wait_until
from tests.postgres import pg_server, pg_url  # noqa: F401  (fixtures)
from tests.rl.killed import run_killed_after

CLIENT_KEY, ADMIN_KEY = "sk-refresh-client", "sk-refresh-admin"
FAST = PaperGRPOConfig(max_steps=6, max_completion_length=32, per_device_train_batch_size=8)


def log_turns(store_url: str, n: int = 40) -> None:
    """Logged consultations as the server stores them: red-flag prompts of the corpus (which the
    rule stage trains on) and others (which have no rule item and are skipped)."""
    prompts = corpus_prompts("red_flag", n, seed=3) + corpus_prompts("symptom", 8, seed=3)
    store = Store(store_url)
    store.migrate()
    store.insert_many([TurnRecord(
        conversation_id=f"c{i}", endpoint="chat.completions", model="tiny", model_version="base",
        messages=p, choices=[LoggedChoice(index=0, content="Rest and drink fluids.",
                                          finish_reason="stop")]) for i, p in enumerate(prompts)])
    store.dispose()
    assert sum(bool(rule_items(p)) for p in prompts) >= n // 2


@pytest.fixture
def setup(tmp_path, tiny_model):
    store_url = f"sqlite:///{tmp_path / 'clinicloop.db'}"
    log_turns(store_url)
    Registry(tmp_path / "registry").bootstrap("llamacpp", tiny_model.gguf_q8_0, tiny_model.name,
                                              tiny_model.hf_dir)
    return Paths(store_url=store_url, registry_dir=tmp_path / "registry",
                 runs_dir=tmp_path / "runs", models_dir=ROOT / "var" / "models")


def test_a_passing_candidate_is_registered_and_activated_with_a_report(setup):
    job = refresh(setup, RefreshOptions(stage="rule", margin=1.0, eval_max_tokens=48, grpo=FAST),
                  progress=False)
    state = Registry(setup.registry_dir).read()
    version = state.version(f"rl-{job.state.run_id}")
    assert state.active == version.id and version.parent == BASE_ID
    assert version.model_path.is_file() and (version.hf_dir / "config.json").is_file()
    report = json.loads((job.run_dir / "report.json").read_text())
    assert report["swapped"] == "activated" and report["decision"]["publish"]
    assert version.metrics["heldout_score"] == report["after"]
    assert len(report["reward_curve"]) == FAST.max_steps
    assert report["prompts"]["train"] > 0 and report["prompts"]["heldout"] > 0
    assert report["prompts"]["train_without_rubric"] + report["prompts"][
        "heldout_without_rubric"] == 8  # the symptom prompts: no rule item applies
    # The held-out prompts never train.
    train = {json.loads(x)["prompt_id"] for x in (job.run_dir / "train.jsonl").open()}
    heldout = {json.loads(x)["prompt_id"] for x in (job.run_dir / "heldout.jsonl").open()}
    assert train and heldout and not train & heldout
    assert (job.run_dir / "reward_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "held-out rubric score" in (job.run_dir / "report.md").read_text()

    # The next refresh trains from the new version's weights and is its child.
    nxt = refresh(setup, RefreshOptions(stage="rule", margin=1.0, eval_max_tokens=48, grpo=FAST),
                  progress=False)
    assert nxt.state.run_id != job.state.run_id
    assert nxt.state.serving_version == version.id and nxt.state.policy_hf == version.hf_dir
    assert Registry(setup.registry_dir).get(f"rl-{nxt.state.run_id}").parent == version.id


def test_a_refused_candidate_leaves_serving_untouched(setup):
    before = Registry(setup.registry_dir).read()
    # A negative margin demands an improvement; more than the whole score range is impossible.
    job = refresh(setup, RefreshOptions(stage="rule", margin=-2.0, eval_max_tokens=48, grpo=FAST),
                  progress=False)
    assert not job.decision().publish and "below serving" in job.decision().reasons[0]
    assert Registry(setup.registry_dir).read() == before
    assert json.loads((job.run_dir / "report.json").read_text())["swapped"] is None


def test_a_second_job_is_refused_while_one_holds_the_lock(setup):
    with refresh_lock(setup.runs_dir), pytest.raises(RefreshBusy, match=f"pid {os.getpid()}"):
        refresh(setup, RefreshOptions(stage="rule", grpo=FAST), progress=False)


def test_on_postgres_a_job_is_refused_while_another_host_holds_the_advisory_lock(
        pg_url, tmp_path):  # noqa: F811
    store = Store(pg_url)

    def lock(function: str) -> bool:
        return connection.execute(sql_text(f"SELECT {function}(:key)"),
                                  {"key": REFRESH_LOCK_KEY}).scalar_one()

    paths = Paths(store_url=pg_url, registry_dir=tmp_path / "registry", runs_dir=tmp_path / "a")
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        assert lock("pg_try_advisory_lock")  # another refresh pod, its runs on another volume
        with pytest.raises(RefreshBusy, match="another refresh is running"):
            refresh(paths, progress=False)
        assert lock("pg_advisory_unlock")
        # Free: the job takes it and holds it to its end, which a failing step is too.
        with pytest.raises(RuntimeError, match="step failed"), refresh_lock(paths.runs_dir,
                                                                             pg_url):
            assert not lock("pg_try_advisory_lock")
            raise RuntimeError("step failed")
        assert lock("pg_try_advisory_lock") and lock("pg_advisory_unlock")
    store.dispose()


def _env(paths: Paths) -> dict[str, str]:
    return {"CLINICLOOP_STORE__URL": paths.store_url,
            "CLINICLOOP_REGISTRY__DIR": str(paths.registry_dir),
            "CLINICLOOP_MODELS_DIR": str(paths.models_dir)}


def test_killed_mid_training_resumes_without_redoing_finished_steps(setup, tmp_path):
    env = {**os.environ, **_env(setup)}
    command = [sys.executable, "-m", "clinicloop.cli", "rl", "refresh", "--stage", "rule",
               "--steps", "30", "--margin", "1", "--runs-dir", str(setup.runs_dir)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: any(setup.runs_dir.glob("*/train.part")), 120, "training", proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    (run_dir,) = [p.parent for p in setup.runs_dir.glob("*/state.json")]
    state = json.loads((run_dir / "state.json").read_text())
    assert list(state["done"]) == ["prompts", "calibrate", "baseline"]
    assert Registry(setup.registry_dir).read().active == BASE_ID  # serving untouched
    baseline = (run_dir / "baseline.json").stat().st_mtime_ns

    # No options given: the run continues with those it began with.
    job = refresh(setup, progress=False)
    assert job.run_dir == run_dir and job.state.finished
    assert (run_dir / "baseline.json").stat().st_mtime_ns == baseline  # not redone
    assert not (run_dir / "train.part").exists()
    assert len(json.loads((run_dir / "report.json").read_text())["reward_curve"]) == 30
    assert Registry(setup.registry_dir).read().active == f"rl-{job.state.run_id}"


def test_the_swap_goes_through_the_servers_admin_api(server_factory, tiny_model, tmp_path):
    server = server_factory({"CLINICLOOP_SERVER__API_KEYS": f'["{CLIENT_KEY}"]',
                             "CLINICLOOP_SERVER__ADMIN_KEYS": f'["{ADMIN_KEY}"]',
                             "CLINICLOOP_ENGINE__HF_DIR": str(tiny_model.hf_dir)})
    home = server.db_path.parent
    store_url = f"sqlite:///{server.db_path}"
    log_turns(store_url)
    paths = Paths(store_url=store_url, registry_dir=home / "var" / "registry",
                  runs_dir=tmp_path / "runs", models_dir=ROOT / "var" / "models",
                  server_url=server.base_url, admin_key=ADMIN_KEY)
    job = refresh(paths, RefreshOptions(stage="rule", margin=1.0, eval_max_tokens=48,
                                        grpo=FAST), progress=False)
    version = f"rl-{job.state.run_id}"
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    listing = httpx.get(server.base_url + "/admin/v1/versions", headers=headers).json()
    assert listing["active"] == version and version in {v["id"] for v in listing["loaded"]}
    reply = httpx.post(server.v1 + "/chat/completions", timeout=60, headers={
        "authorization": f"Bearer {CLIENT_KEY}"}, json={
        "model": tiny_model.name, "messages": [{"role": "user", "content": "I have a headache."}],
        "max_tokens": 8})
    assert reply.status_code == 200, reply.text
    reply = reply.json()
    store = Store(store_url)
    try:
        wait_until(lambda: store.get(reply["id"]) is not None, 15, "the reply's log row")
        assert store.get(reply["id"]).model_version == version
    finally:
        store.dispose()


def test_no_swap_onto_a_version_that_changed_since_the_run_began(setup, tiny_model):
    options = RefreshOptions(stage="rule", margin=1.0, eval_max_tokens=48, grpo=FAST)
    job = refresh(setup, options, until="gate", progress=False)
    assert job.decision().publish and job.next_step() == "swap"
    registry = Registry(setup.registry_dir)
    other = registry.register(parent=BASE_ID, backend="llamacpp", model_path=tiny_model.gguf_f16)
    registry.activate(other.id)  # someone else swapped while the candidate waited
    with pytest.raises(RefreshFailed, match="serving version changed"):
        refresh(setup, progress=False)
    state = registry.read()
    assert state.active == other.id and f"rl-{job.state.run_id}" not in state.versions


def test_killed_at_every_step_leaves_serving_untouched_and_a_rerun_completes(setup):
    options = RefreshOptions(stage="rule", margin=1.0, eval_max_tokens=48, grpo=FAST)
    with refresh_lock(setup.runs_dir):  # the run, with options the CLI has no flags for
        job = Refresh.open(setup, options, progress=False)
    before = Registry(setup.registry_dir).read()
    cli = ("from clinicloop.cli import app; "
           f"app(['rl', 'refresh', '--runs-dir', {str(setup.runs_dir)!r}])")
    for i, step in enumerate(STEPS):
        killed = run_killed_after(f"clinicloop.rl.refresh:Refresh._step_{step}", cli, _env(setup))
        assert killed.returncode == -signal.SIGKILL, (step, killed.stdout, killed.stderr)
        state = latest_run(setup.runs_dir)
        assert state is not None and state.run_id == job.state.run_id
        assert list(state.done) == list(STEPS[:i]), step  # the killed step is redone
        if STEPS.index(step) < STEPS.index("swap"):
            assert Registry(setup.registry_dir).read() == before, step
    # The last re-run completes, each step's outputs whole; the swap, killed once after it
    # landed, was not done twice.
    done = refresh(setup, progress=False)
    assert done.run_dir == job.run_dir and done.state.finished and done.state.failed is None
    state = Registry(setup.registry_dir).read()
    version = f"rl-{job.state.run_id}"
    assert state.active == version and state.version(version).model_path.is_file()
    assert [a.version for a in state.history] == [BASE_ID, version]
    assert json.loads((job.run_dir / "report.json").read_text())["swapped"] == "activated"
    assert not list(setup.runs_dir.glob("**/*.part")) and not list(setup.runs_dir.glob("**/.*"))


def test_a_failed_run_names_the_way_out_and_fresh_or_abandon_take_it(setup, tiny_model):
    options = RefreshOptions(stage="rule", margin=1.0, eval_max_tokens=48, grpo=FAST)
    job = refresh(setup, options, until="gate", progress=False)
    registry = Registry(setup.registry_dir)
    other = registry.register(parent=BASE_ID, backend="llamacpp", model_path=tiny_model.gguf_f16,
                              hf_dir=tiny_model.hf_dir)
    registry.activate(other.id)  # the swap can never land now
    runner = CliRunner()
    args = ["rl", "refresh", "--runs-dir", str(setup.runs_dir)]
    for _ in range(2):  # every re-run resumes the run and fails the same way
        result = runner.invoke(app, args, env=_env(setup))
        assert result.exit_code == 1, result.output
        assert result.stderr.strip() == (
            f"rl refresh: run {job.state.run_id} failed at step swap: RuntimeError: the serving "
            f"version changed from 'base' to {other.id!r} since this run began; start a new "
            "refresh; run again to retry the step, with --fresh to start a new run, or with "
            "--abandon to give this one up")
    state = latest_run(setup.runs_dir)
    assert state is not None and state.failed is not None and state.failed.step == "swap"

    result = runner.invoke(app, [*args, "--abandon"], env=_env(setup))
    assert result.exit_code == 0, result.output
    assert f"run {job.state.run_id} abandoned" in result.stdout
    result = runner.invoke(app, [*args, "--abandon"], env=_env(setup))
    assert result.exit_code == 1 and "already abandoned" in result.stderr
    with pytest.raises(ValueError, match="was abandoned"):
        refresh(setup, run_id=job.state.run_id, progress=False)

    # A new run trains from the version now serving; --fresh supersedes it while unfinished.
    second = refresh(setup, options, until="prompts", progress=False)
    assert second.state.run_id != job.state.run_id and second.state.serving_version == other.id
    third = refresh(setup, options, until="prompts", fresh=True, progress=False)
    assert third.state.run_id not in (job.state.run_id, second.state.run_id)
    abandoned = json.loads((second.run_dir / "state.json").read_text())["abandoned"]
    assert abandoned.startswith(f"superseded by run {third.state.run_id}")
    assert refresh(setup, progress=False).run_dir == third.run_dir  # the latest run resumes
    assert registry.read().active == f"rl-{third.state.run_id}"
