"""The verifier end to end on the tiny model: simulated consultations land in the store, then
scoring grades every one of them and writes verdicts and scores back."""

from __future__ import annotations

from clinicloop.store.db import Store
from clinicloop.verifier.patients import load_scripts
from clinicloop.verifier.score_logs import score_store
from clinicloop.verifier.simulation import run_simulation, select_scripts
from clinicloop.verifier.simulator import SimulatorOptions
from tests.conftest import ROOT

MODELS_DIR = ROOT / "var" / "models"


def test_simulate_then_score(tiny_model, tmp_path):
    url = f"sqlite:///{tmp_path / 'loop.db'}"
    report = run_simulation(url, tmp_path / "sim", None, None,
                            select_scripts(load_scripts(), 2, 3), SimulatorOptions(max_turns=3),
                            3, models_dir=MODELS_DIR, model_path=tiny_model.gguf_q8_0,
                            progress=False)
    store = Store(url)
    turns = store.list_turns(limit=100)
    assert len(turns) == report.metrics.doctor_turns > 0
    assert (tmp_path / "sim" / "simulate.json").exists()

    summary = score_store(url, None, models_dir=MODELS_DIR, out=tmp_path / "score.json")
    assert summary.n_turns == len(turns) and summary.n_unparseable == 0
    assert summary.n_verdicts > 0 and (tmp_path / "score.json").exists()
    assert all(store.get_turn_score(t.id) is not None for t in turns)
    assert store.count_verdicts() > 0
    again = score_store(url, None, models_dir=MODELS_DIR)
    assert again.n_turns == 0  # everything was scored: nothing is redone
