"""`benchmarks/healthbench.py` end to end: a real clinicloop server on the tiny model answers and
judges the three HealthBench rows, and the script writes metrics, verdicts and a report; a judge
request the server refuses is reported with its cause, never retried."""

from __future__ import annotations

import json
import subprocess
import sys

from clinicloop.store.db import Store
from clinicloop.verifier.rubrics import read_jsonl
from tests.conftest import ROOT, wait_until

DATA = ROOT / "tests" / "verifier" / "data" / "healthbench_format.jsonl"


def test_healthbench_benchmark_on_a_tiny_model_server(server_factory, tmp_path):
    # HealthBench cluster criteria run to ~3,000 characters: past the default 2,048-token context.
    server = server_factory({"CLINICLOOP_ENGINE__N_CTX": "4096"})
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "healthbench.py"), "--data", str(DATA),
         "--model-url", server.v1, "--judge-url", server.v1, "--out", str(out),
         "--examples", "3", "--seed", "1", "--max-tokens", "128", "--template", "healthbench"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr + server.log()
    assert {p.name for p in out.iterdir()} == {"metrics.json", "verdicts.jsonl", "report.md"}

    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["overall_score"] <= 1
    assert metrics["overall_score:n_samples"] == 3 and metrics["n_unparseable"] == 0
    assert "theme:emergency_referrals" in metrics and "axis:completeness:bootstrap_std" in metrics

    examples = {e.prompt_id: e for e in read_jsonl(DATA)}
    lines = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]
    assert len(lines) == sum(len(e.rubrics) for e in examples.values())
    for line in lines:
        item = next(i for i in examples[line["prompt_id"]].rubrics
                    if i.criterion == line["criterion"])
        assert (line["points"], line["tags"]) == (item.points, item.tags)
        assert isinstance(line["criteria_met"], bool)  # the schema-constrained judge always parses

    report = (out / "report.md").read_text()
    assert f"Overall score: **{metrics['overall_score']:.3f}**" in report
    assert "| axis:completeness |" in report and report.count("\n## ") == 3
    assert "Overall score" in done.stdout


def test_a_judge_context_too_short_is_reported_not_retried(server_factory, tmp_path):
    # At the default 2,048-token context, the judge prompts of HealthBench's long cluster
    # criteria do not fit: the server answers 400, which no retry can mend.
    server = server_factory()
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "healthbench.py"), "--data", str(DATA),
         "--model-url", server.v1, "--judge-url", server.v1, "--out", str(out),
         "--examples", "3", "--max-tokens", "32", "--template", "healthbench"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr + server.log()
    assert "X-Clinicloop-Origin: service" in done.stderr  # where its traffic goes

    lines = [json.loads(line) for line in (out / "verdicts.jsonl").read_text().splitlines()]
    failed = [line for line in lines if line["error"] is not None]
    assert failed and all(line["criteria_met"] is None for line in failed)
    assert all(line["error"].startswith("400: This model's maximum context length is 2048 "
                                        "tokens. However, you requested") for line in failed)
    report = (out / "report.md").read_text()
    assert "judge call failed ×" in report and "maximum context length is 2048" in report

    # Asked once each: the server logged one failed request per failed verdict, all of them
    # (and every answer) as service traffic.
    store = Store(f"sqlite:///{server.db_path}")
    calls = 3 + len(lines)
    wait_until(lambda: store.count() >= calls, 30, "the server's log")
    turns = store.list_turns(limit=1000)
    assert len(turns) == calls and {t.origin for t in turns} == {"service"}
    assert sum(t.status == "error" for t in turns) == len(failed)
    assert store.count_turns_to_score() == 0
    store.dispose()
