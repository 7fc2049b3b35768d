"""`benchmarks/lora_memory.py` at a small size: two adapter versions on a shared base add their
adapters, KV caches and a bounded overhead, less than one more base; loaded whole they add more."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = str(ROOT / "benchmarks" / "lora_memory.py")
MiB = 2**20


def test_lora_memory_small(bench, bench_lora, tmp_path):
    out = tmp_path / "lora_memory.json"
    done = subprocess.run(
        [sys.executable, SCRIPT, "--model", str(bench.gguf_f16), "--adapter", str(bench_lora.gguf),
         "--adapter", str(bench_lora.gguf), "--n-ctx", "256", "--n-parallel", "2",
         "--prefix-cache-slots", "0", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    shared = result["shared"]["steps"]
    assert [s["engines"] for s in shared] == [
        "base", "base + 1 adapter version", "base + 2 adapter versions"]
    # bench: 4 layers x 2 KV heads x head dim 64, K and V in f16: 2048 bytes per cell.
    assert shared[1]["kv_cache_bytes"] == 256 * 2 * 2048
    assert result["expected_added_bytes"] == 2 * (bench_lora.gguf.stat().st_size + 256 * 2 * 2048)
    # Beyond adapters and KV: each context's compute buffers and decode thread (measured ~4.5
    # MiB each at n_batch 512), never a copy of the weights.
    assert 0 <= result["overhead_bytes"] < 2 * 8 * MiB
    assert result["shared_added_bytes"] < result["model_bytes"] < result["whole_added_bytes"]
    assert "adapter versions add" in done.stdout.splitlines()[-1]
