"""The refresh's training step in two processes through the real `accelerate launch` (two CPU
ranks over gloo, the tiny model, the rule stage): the adapter, train.json and the rows land where
the publish step reads them, written once, with both ranks in the run; a failing rank's error
reaches the refresh."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from clinicloop.backends.registry import Registry
from clinicloop.cli import app
from clinicloop.rl.config import PaperGRPOConfig
from clinicloop.rl.refresh import latest_run
from clinicloop.rl.stages import Endpoint
from clinicloop.rl.train_job import TrainJobFailed, TrainSpec, train
from tests.conftest import ROOT
from tests.rl.test_refresh import log_turns


def test_refresh_trains_in_two_processes_through_accelerate_launch(tiny_model, tmp_path):
    store_url = f"sqlite:///{tmp_path / 'clinicloop.db'}"
    log_turns(store_url, n=12)
    Registry(tmp_path / "registry").bootstrap("llamacpp", tiny_model.gguf_q8_0, tiny_model.name,
                                              tiny_model.hf_dir)
    env = {"CLINICLOOP_STORE__URL": store_url,
           "CLINICLOOP_REGISTRY__DIR": str(tmp_path / "registry"),
           "CLINICLOOP_MODELS_DIR": str(ROOT / "var" / "models")}
    result = CliRunner().invoke(app, [
        "rl", "refresh", "--stage", "rule", "--steps", "2", "--train-processes", "2",
        "--until", "train", "--runs-dir", str(tmp_path / "runs")], env=env)
    assert result.exit_code == 0, result.output
    state = latest_run(tmp_path / "runs")
    assert state is not None and "train" in state.done and state.options.train_processes == 2
    out = tmp_path / "runs" / state.run_id / "train"
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    summary = json.loads((out / "train.json").read_text())
    # Both ranks took part: the trainer's world was two processes, and the steps completed
    # (every step's gradients are all-reduced across the ranks, so one alone would hang).
    assert summary["world_size"] == 2 and len(summary["reward_curve"]) == 2
    # Written by the main rank alone: the rows once each, as the refresh picked them.
    trained = (tmp_path / "runs" / state.run_id / "train.jsonl").read_text().splitlines()
    assert (out / "dataset.jsonl").read_text().splitlines() == trained
    assert not (out.parent / "train.part").exists()


def test_a_failing_rank_raises_with_its_error(tiny_model, tmp_path):
    spec = TrainSpec(stage="rule", policy_hf=tiny_model.hf_dir, output_dir=tmp_path / "out",
                     grpo=PaperGRPOConfig(max_steps=1), rows=tmp_path / "no-such-rows.jsonl",
                     judge=Endpoint(), models_dir=tmp_path)
    with pytest.raises(TrainJobFailed, match=r"(?s)exited with 1.*no-such-rows\.jsonl"):
        train(spec, 2)
