"""`benchmarks/qlora_step.py` in its CPU smoke mode: one real QLoRA-path GRPO step of a small
Qwen2-shaped model, with no 4 bits and no GPU figures, and the plan for the same shape."""

from __future__ import annotations

import json
import subprocess
import sys

from clinicloop.model.tiny import SIZES
from tests.conftest import ROOT

SCRIPT = str(ROOT / "benchmarks" / "qlora_step.py")


def test_qlora_step_cpu_smoke(tmp_path):
    out = tmp_path / "qlora_step.json"
    done = subprocess.run(
        [sys.executable, SCRIPT, "--device", "cpu", "--layers", "2", "--hidden", "64",
         "--intermediate", "128", "--heads", "4", "--kv-heads", "2",
         "--vocab", str(SIZES["tiny"].vocab_size), "--completion-tokens", "16",
         "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["steps"] == 1 and len(result["reward_curve"]) == 1 and result["step_s"] > 0
    assert result["load"]["quantization"] == "none" and "no CUDA" in result["load"]["reason"]
    assert result["load"]["gradient_checkpointing"] is True
    assert result["peak_gpu_bytes"] is None and result["ratio"] is None
    shape = result["shape"]
    assert (shape["num_layers"], shape["hidden_size"], shape["num_kv_heads"]) == (2, 64, 2)
    # Planned for what ran: the same shape unquantised, at the run's tokens and group.
    plan = result["plan"]
    assert result["planned_allocated_bytes"] == plan["allocated_peak_bytes"] > 0
    assert not plan["quantized"] and plan["num_generations"] == 4
    assert plan["seq_len"] == result["prompt_tokens"] + 16 == result["seq_len"]
    assert done.stdout.splitlines()[-1] == result["markdown"].strip()
    assert result["markdown"].startswith("| 2 x 64/128 | none |")
