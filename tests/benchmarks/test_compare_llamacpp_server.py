"""`benchmarks/compare_llamacpp_server.py` end to end, small: real clinicloop (with and without
drafting), `python -m llama_cpp.server` and, where `make llama-server` has built it, llama.cpp's
`llama-server` (with extra flags), all on the tiny model, every workload at c=1 and c=2. The JSON
has a row per server x workload x concurrency, the targets table is printed, and the servers
answered every request; the chat workload's replies end on their own (no `ignore_eos`)."""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks.peers import llama_server_bin
from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "compare_llamacpp_server.py"
WORKLOADS = ("random", "chat", "multiturn", "quote")
PROMPTS, OUTPUT_LEN, TURNS = 2, 8, 2


def test_compare_runs_every_server_and_workload_and_prints_the_targets(tiny_model, tmp_path):
    binary, why_missing = llama_server_bin()
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--gguf", str(tiny_model.gguf_q8_0),
         "--num-prompts", str(PROMPTS), "--output-len", str(OUTPUT_LEN), "--turns", str(TURNS),
         "--input-len", "64", "--concurrency", "1,2", "--slots", "2", "--no-progress",
         "--chat-max-tokens", str(OUTPUT_LEN),
         "--draft-env", "CLINICLOOP_ENGINE__SPECULATIVE__MODE=ngram",
         "--llama-server-args", "-fa off", "--out", str(out)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "compare.json").read_text())

    peers = {"clinicloop", "llama_cpp.server"} | ({"llama-server"} if binary else set())
    rows = {(r["server"], r["workload"], r["concurrency"]): r for r in report["rows"]}
    expected = {(s, w, c) for s in peers for w in WORKLOADS for c in (1, 2)}
    expected |= {("clinicloop+draft", "quote", c) for c in (1, 2)}
    assert set(rows) == expected
    for (server, workload, _), row in rows.items():
        requests = PROMPTS * (TURNS if workload == "multiturn" else 1)
        assert (row["completed"], row["failed"]) == (requests, 0), (server, row)
        if workload == "chat":  # never ignore_eos: replies stop at end of turn
            assert not row["ignore_eos"] and 0 < row["output_tokens_per_request"] <= OUTPUT_LEN
        elif server != "llama_cpp.server":  # the one that drops ignore_eos may stop early
            assert row["ignore_eos"] and row["output_tokens_per_request"] == OUTPUT_LEN, row
        assert row["output_throughput"] > 0 and row["ttft_p99_ms"] >= row["ttft_median_ms"] > 0
        assert (row["ttft_last_turn_ms"] is not None) == (workload == "multiturn")
    if binary is None:
        assert report["skipped"] == {"llama-server": why_missing}
        assert "make llama-server" in why_missing and "make llama-server" in done.stdout

    targets = {t["target"]: t for t in report["targets"]}
    # Below c=8 there is no "≥ 1.0× llama-server" target; every run has the monotone ones.
    monotone = [f"{w}: throughput c=1→2" for w in ("random", "chat", "multiturn")]
    assert list(targets) == ["random c=1: output tok/s", *monotone, "random c=2: p99 TTFT",
                             "multiturn c=1: turn-2 TTFT", "quote c=1: drafting on vs off"]
    for name in ("random c=1: output tok/s", "random c=2: p99 TTFT"):  # against llama-server
        assert (targets[name]["status"] in ("PASS", "MISS")) == (binary is not None), name
    for name in [*monotone, "multiturn c=1: turn-2 TTFT", "quote c=1: drafting on vs off"]:
        assert targets[name]["status"] in ("PASS", "MISS") and targets[name]["ratio"] > 0, name
    for name in monotone:
        w = name.split(":")[0]
        tps = [rows["clinicloop", w, c]["output_throughput"] for c in (1, 2)]
        assert targets[name]["measured"] == " → ".join(f"{t:.0f}" for t in tps)
        assert (targets[name]["status"] == "PASS") == (tps[1] >= 0.97 * tps[0])
    assert "texts identical" in targets["quote c=1: drafting on vs off"]["note"] or \
        "texts differ" in targets["quote c=1: drafting on vs off"]["note"]

    printed = done.stdout
    assert "## Targets" in printed and "## All runs" in printed
    for name, t in targets.items():
        assert f"| {name} | {t['rule']} |" in printed and t["status"] in printed
    assert (out / "compare.md").read_text() in printed
    if binary is not None:  # extra flags go on llama-server's command line as given
        assert "--cont-batching -fa off --host 127.0.0.1" in printed


def test_a_llama_server_that_cannot_start_is_skipped_with_a_note(tiny_model, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setenv("LLAMA_SERVER_BIN", str(tmp_path / "nowhere"))
    assert "make llama-server" in llama_server_bin()[1]

    # An executable that exits at once: the run goes on without it, and says why.
    monkeypatch.setenv("LLAMA_SERVER_BIN", "/bin/false")
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--gguf", str(tiny_model.gguf_q8_0), "--num-prompts", "1",
         "--output-len", "4", "--concurrency", "1", "--workload", "random",
         "--servers", "clinicloop,llama-server", "--no-progress", "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "compare.json").read_text())
    assert report["skipped"]["llama-server"].startswith("llama-server exited with 1 while starting")
    assert [r["server"] for r in report["rows"]] == ["clinicloop"]
    assert report["targets"][0]["status"] == "not run"
    assert "llama-server: skipped (see Servers)" in done.stdout
