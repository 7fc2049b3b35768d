"""`benchmarks/harden.py` (`make harden`) small: its fuzz (two examples per operation and mode) and
security parts against a real keyed server on the tiny model. The JSON counts every fuzzed case
by status, the markdown and the printed table agree, the last line printed is the summary in its
fixed format, and every check passes."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "harden.py"
SUMMARY = re.compile(r"harden: requests=(\d+) shed=(\d+) fuzz_cases=(\d+) fuzz_5xx=(\d+) "
                     r"faults=(\d+)/(\d+) rows_lost=(\d+)")


def test_fuzz_and_security_on_a_real_server(tiny_model, tmp_path):
    out = tmp_path / "harden"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--parts", "fuzz,security", "--fuzz-examples", "2",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    lines = done.stdout.strip().splitlines()
    assert lines and SUMMARY.fullmatch(lines[-1]), done.stdout + done.stderr
    report = json.loads((out / "harden.json").read_text())
    fuzz = report["fuzz"]
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models",
            "POST /admin/v1/versions"} <= set(fuzz["operations"])
    assert fuzz["cases"] == sum(fuzz["by_status"].values()) >= 2 * len(fuzz["operations"])
    requests, shed, cases, fuzz_5xx, passed, tried, lost = map(
        int, SUMMARY.fullmatch(lines[-1]).groups())
    assert (cases, fuzz_5xx) == (fuzz["cases"], fuzz["server_errors"])
    assert (requests, shed, passed, tried, lost) == (0, 0, 0, 0, 0)  # parts not run
    assert [p["who"] for p in report["security"]["refusals"]] == [
        "no key", "wrong key", "client key on admin"]
    # Every check is a row of the printed table and of the markdown summary.
    markdown = (out / "harden.md").read_text()
    for check in report["checks"]:
        row = f"| {check['part']} | {check['name']} |"
        assert row in done.stdout and row in markdown
    assert report["summary"] == lines[-1]
    # And what they measured holds: no 5xx, OpenAI-shaped 4xx, keys checked before the body,
    # CORS closed, no key or PHI in the server's log.
    assert not [c for c in report["checks"] if not c["ok"]] and done.returncode == 0, done.stdout


def test_every_test_file_harden_runs_exists(monkeypatch):
    """The property files and fault tests are named by path: a moved test file must not turn
    into a fault that can only fail."""
    import importlib.util

    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # as the script runs: beside `peers.py`
    spec = importlib.util.spec_from_file_location("harden", SCRIPT)
    assert spec is not None and spec.loader is not None
    harden = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harden)
    named = [*harden.PROPERTY_FILES, *(f for fault in harden.FAULTS for f in fault.files)]
    assert named and [f for f in named if not (ROOT / f).is_file()] == []
