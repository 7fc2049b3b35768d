"""`make demo` end to end, as a newcomer runs it: the held-out score must really rise and the
server must end up serving and logging the new version."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_demo_closes_the_loop(tiny_model, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--home", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"demo: before=([\d.]+) after=([\d.]+) report=(\S+)", last)
    assert match, last
    before, after = float(match[1]), float(match[2])
    assert after > before
    assert (tmp_path / "demo" / "rl").is_dir() and match[3].endswith("report.md")
    swapped = re.search(r"logged as \S+ with model_version=(\S+)", result.stdout)
    assert swapped and swapped[1].startswith("rl-")
    # The new version is the served base plus an adapter, and the base is loaded once.
    version = re.search(r"version (rl-\S+): base (\S+) \+ adapter (\S+\.gguf)", result.stdout)
    assert version and version[1] == swapped[1], result.stdout[-3000:]
    assert re.search(r"memory: process RSS [\d.]+ MiB; 1 base\(s\) loaded", result.stdout)
    assert "## The server's memory after the swap" in Path(match[3]).read_text()
