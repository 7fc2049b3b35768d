"""`benchmarks/redact_bench.py` at a small size: every rule is timed on its hostile shapes, the
JSON and the table are written, and the exit status follows the limit."""

from __future__ import annotations

import json
import subprocess
import sys

from clinicloop.store.redact import RULES
from tests.conftest import ROOT

SCRIPT = str(ROOT / "benchmarks" / "redact_bench.py")


def _run(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = tmp_path / "redact.json"
    done = subprocess.run([sys.executable, SCRIPT, "--size", "20000", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=300)
    return done, json.loads(out.read_text())


def test_redact_bench_small(tmp_path):
    done, result = _run(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [t["rule"] for t in result["rules"]] == [*range(len(RULES)), None]
    for timing in result["rules"]:
        assert timing["seconds"] and timing["worst_s"] == max(timing["seconds"].values())
    assert result["size_chars"] == 20000 and result["ok"] and result["worst_s"] < 1.0
    assert "limit 1.000s: ok" in done.stdout.splitlines()[-1]


def test_redact_bench_fails_past_its_limit(tmp_path):
    done, result = _run(tmp_path, "--limit-s", "0")
    assert done.returncode == 1 and not result["ok"]
    assert done.stdout.splitlines()[-1].endswith("TOO SLOW")
