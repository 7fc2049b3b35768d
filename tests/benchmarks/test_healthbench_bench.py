"""`benchmarks/healthbench.py` end to end: a real clinicloop server on the tiny model answers and
judges the three HealthBench rows, and the script writes metrics, verdicts and a report."""

from __future__ import annotations

import json
import subprocess
import sys

from clinicloop.verifier.rubrics import read_jsonl
from tests.conftest import ROOT

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
