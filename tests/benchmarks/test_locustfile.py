"""`benchmarks/locustfile.py` run headless by locust against a real clinicloop server on the tiny
model: the CSV summary has the whole request plus TTFT and TPOT entries, none failed; and the
shipped prompt file is what the corpus generates."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

from benchmarks.serve_bench import loadtest_prompts
from tests.conftest import ROOT

LOCUSTFILE = ROOT / "benchmarks" / "locustfile.py"
PROMPTS = ROOT / "benchmarks" / "data" / "loadtest_prompts.jsonl"


def test_shipped_prompts_regenerate_from_the_corpus():
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines()]
    assert rows == loadtest_prompts()
    assert all(row["messages"][-1]["role"] == "user" for row in rows)


def run_locust(server, tmp_path, env: dict[str, str]) -> dict[tuple[str, str], dict[str, str]]:
    done = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
         "-u", "2", "-r", "2", "-t", "5s", "--host", server.base_url,
         "--csv", str(tmp_path / "run")],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr + server.log()
    with (tmp_path / "run_stats.csv").open() as f:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}


def test_locust_reports_ttft_and_tpot(server_factory, tmp_path):
    server = server_factory({})
    stats = run_locust(server, tmp_path, {"MAX_TOKENS": "8"})
    chat, ttft, tpot = (stats[k] for k in (
        ("POST", "/v1/chat/completions"), ("METRIC", "ttft"), ("METRIC", "tpot")))
    assert int(chat["Request Count"]) > 0
    # Every completed request fires one TTFT and, with ignore_eos fixing 8 tokens, one TPOT.
    assert int(ttft["Request Count"]) == int(tpot["Request Count"]) == int(chat["Request Count"])
    assert stats[("", "Aggregated")]["Failure Count"] == "0"
    # The request entry is timed to its last token, not to the response headers.
    assert float(chat["Average Response Time"]) > float(ttft["Average Response Time"])
    assert float(tpot["Average Content Size"]) == 8  # tokens per answer, from the usage chunk


def test_locust_with_api_key_custom_prompts_and_no_ignore_eos(server_factory, tmp_path):
    server = server_factory({"CLINICLOOP_SERVER__API_KEYS": '["load-key"]'})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "I have a cough."}]}))
    env = {"OPENAI_API_KEY": "load-key", "PROMPTS_FILE": str(prompts), "IGNORE_EOS": "0",
           "MAX_TOKENS": "4"}
    stats = run_locust(server, tmp_path, env)
    assert int(stats[("METRIC", "ttft")]["Request Count"]) > 0
    assert stats[("", "Aggregated")]["Failure Count"] == "0"
