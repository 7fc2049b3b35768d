"""Several scorers on one store: two `clinicloop verify score` processes on one real Postgres,
released at the same moment, grade every turn exactly once between them; `--shard` takes one
slice and says so; a bad `--shard` is a usage error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta

from sqlalchemy import func, select, text
from typer.testing import CliRunner

from clinicloop.cli import app
from clinicloop.store.claims import Shard
from clinicloop.store.db import ScoreClaimRow, Store, TurnScoreRow
from clinicloop.verifier.score_logs import ScoreSummary
from tests.conftest import ROOT, wait_until
from tests.postgres import pg_server, pg_url  # noqa: F401  (fixtures)
from tests.verifier.test_score_logs import T0, TURNS, turn

MODELS_DIR = ROOT / "var" / "models"
QUESTIONS = [t.messages[-1]["content"] for t in TURNS if t.response is not None]


def log_turns(store: Store, n: int) -> list[str]:
    """`n` answered client turns with distinct text (no two share a verdict)."""
    turns = [turn(i, f"{QUESTIONS[i % len(QUESTIONS)]} (visit {i})", f"Answer number {i}.")
             .model_copy(update={"created_at": T0 + timedelta(seconds=i)}) for i in range(n)]
    store.insert_many(turns)
    return [t.id for t in turns]


def count(store: Store, table: type) -> int:
    with store.engine.connect() as connection:
        return connection.execute(select(func.count()).select_from(table)).scalar_one()


def test_two_scorers_grade_every_turn_once_between_them(tiny_model, pg_url, tmp_path):  # noqa: F811
    store = Store(pg_url)
    store.migrate()
    turn_ids = log_turns(store, 12)
    env = {**os.environ, "CLINICLOOP_MODELS_DIR": str(MODELS_DIR)}
    # Both scorers load their judge, then wait on the claims table the test holds locked, so
    # neither starts before the other is ready; pages of 2 keep either from taking everything.
    gate = store.engine.connect()
    gate.execute(text("LOCK TABLE score_claims IN ACCESS EXCLUSIVE MODE"))
    scorers = [subprocess.Popen(
        [sys.executable, "-m", "clinicloop.cli", "verify", "score", "--store-url", pg_url,
         "--worker", f"w{i}", "--page", "2", "--out", str(tmp_path / f"w{i}.json")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        def both_waiting() -> bool:
            with store.engine.connect() as connection:
                return connection.execute(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE '%score_claims%'")).scalar_one() == 2

        for scorer in scorers:
            wait_until(both_waiting, 120, "both scorers waiting on the claims", scorer)
        gate.rollback()
        outputs = [scorer.communicate(timeout=300) for scorer in scorers]
    finally:
        gate.close()
        for scorer in scorers:
            scorer.kill()
    for scorer, (_, stderr) in zip(scorers, outputs, strict=True):
        assert scorer.returncode == 0, stderr
    summaries = [ScoreSummary.model_validate(json.loads((tmp_path / f"w{i}.json").read_text()))
                 for i in range(2)]
    assert [s.worker for s in summaries] == ["w0", "w1"]
    assert "worker w0" in outputs[0][0]
    # Every turn has a score; the two runs graded 12 turns in all: so none twice.
    assert count(store, TurnScoreRow) == len(turn_ids)
    assert sum(s.n_turns for s in summaries) == len(turn_ids)
    assert all(s.n_turns > 0 for s in summaries), [s.n_turns for s in summaries]
    # Nor was any verdict made twice (every stored one counted by one run, none from the
    # other's cache), and no claim is left behind.
    assert sum(s.n_verdicts for s in summaries) == store.count_verdicts()
    assert sum(s.n_cached for s in summaries) == 0
    assert count(store, ScoreClaimRow) == 0
    store.dispose()


def test_a_shard_scores_its_slice_and_a_bad_shard_is_a_usage_error(tiny_model, tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    store.migrate()
    turn_ids = log_turns(store, 6)
    env = {"CLINICLOOP_MODELS_DIR": str(MODELS_DIR)}
    runner = CliRunner()
    out = tmp_path / "shard.json"
    result = runner.invoke(app, ["verify", "score", "--store-url", url, "--shard", "1/2",
                                 "--out", str(out)], env=env)
    assert result.exit_code == 0, result.output
    summary = ScoreSummary.model_validate(json.loads(out.read_text()))
    mine = [t for t in turn_ids if Shard(1, 2).holds(t)]
    assert summary.shard == "1/2" and summary.n_turns == len(mine) > 0
    assert ", shard 1/2" in result.stdout
    assert {t for t in turn_ids if store.get_turn_score(t)} == set(mine)
    store.dispose()

    for bad in ("2/2", "half"):
        result = runner.invoke(app, ["verify", "score", "--store-url", url, "--shard", bad],
                               env=env)
        assert result.exit_code == 2 and "--shard" in result.output, result.output
