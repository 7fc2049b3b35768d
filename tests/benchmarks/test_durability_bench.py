"""`benchmarks/durability_bench.py` at a small size: both servers (`ack`, `async`) serve every
request of every workload, every request is logged, and the JSON and the table are written."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = str(ROOT / "benchmarks" / "durability_bench.py")


def test_durability_bench_small(tmp_path, bench):
    out = tmp_path / "durability"
    done = subprocess.run(
        [sys.executable, SCRIPT, "--gguf", str(bench.gguf_q8_0), "--repeats", "1",
         "--concurrency", "2", "--num-prompts", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "durability.json").read_text())
    assert set(result["ratios"]) == {"chat", "long"}
    assert {(r["workload"], r["mode"]) for r in result["rows"]} == {
        (w, m) for w in ("chat", "long") for m in ("ack", "async")}
    assert all(r["failed"] == 0 and r["median_output_tok_s"] > 0 for r in result["rows"])
    # Warm-up (2) plus 2 workloads x 1 repeat x 2 prompts: every request logged, none lost.
    for counters in result["log"].values():
        assert counters["inserted"] == 6 and counters["dropped"] == 0
    assert result["log"]["ack"]["ack_timeouts"] == 0
    assert "ack / async output tok/s" in (out / "durability.md").read_text()
