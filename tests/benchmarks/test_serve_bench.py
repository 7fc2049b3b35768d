"""`benchmarks/serve_bench.py` against a real clinicloop server on the tiny model: each workload at
concurrency 1 and 2, its metrics recomputed from the recorded per-request timestamps with vLLM's
definitions, the concurrency limit seen in the timings, failures counted, and the CLI's outputs."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest

from benchmarks.serve_bench import RunResult, build_conversations, main, run_workload

SMALL = {"num_prompts": 4, "input_len": 32, "output_len": 8, "turns": 2, "progress": False}


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory({})


def run(server, workload: str, concurrency: int, **kw) -> RunResult:
    return asyncio.run(run_workload(server.v1, workload, concurrency, **{**SMALL, **kw}))


def approx(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


def assert_metric_definitions(result: RunResult) -> None:
    reqs = [r for r in result.requests if r.success]
    for r in reqs:
        assert r.tokens_from_usage and r.prompt_tokens
        assert r.chunk_times_s == sorted(r.chunk_times_s) and r.ttft_s == r.chunk_times_s[0]
        assert r.e2e_s >= r.chunk_times_s[-1] > 0
        assert r.itl_s == pytest.approx(np.diff(r.chunk_times_s).tolist())
        assert r.tpot_s is not None and approx(
            r.tpot_s, (r.e2e_s - r.ttft_s) / (r.output_tokens - 1))

    def stats(values: list[float]) -> dict[str, float]:
        # No values (every reply in one chunk: no gaps between chunks) report zeros.
        ms = np.asarray(values or [0.0]) * 1000
        return {"mean": ms.mean(), "median": np.median(ms), "p99": np.percentile(ms, 99)}

    for got, want in (
        (result.ttft_ms, stats([r.ttft_s for r in reqs])),
        (result.tpot_ms, stats([r.tpot_s for r in reqs])),
        (result.itl_ms, stats([g for r in reqs for g in r.itl_s])),
        (result.e2e_ms, stats([r.e2e_s for r in reqs])),
    ):
        assert got == pytest.approx(want)
    assert result.total_output_tokens == sum(r.output_tokens for r in reqs)
    assert approx(result.request_throughput, len(reqs) / result.duration_s)
    assert approx(result.output_throughput, result.total_output_tokens / result.duration_s)
    assert result.duration_s >= max(r.start_s + r.e2e_s for r in reqs)
    # Never more than `concurrency` requests in flight when any request starts.
    for r in result.requests:
        in_flight = [q for q in result.requests if q.start_s <= r.start_s < q.start_s + q.e2e_s]
        assert len(in_flight) <= result.concurrency
    assert result.texts == [r.text for r in result.requests]
    assert [(r.index, r.turn) for r in result.requests] == sorted(
        (r.index, r.turn) for r in result.requests)


@pytest.mark.parametrize("concurrency", [1, 2])
def test_random_workload(server, concurrency):
    result = run(server, "random", concurrency)
    assert (result.completed, result.failed, result.concurrency) == (4, 0, concurrency)
    assert result.model == httpx.get(server.v1 + "/models").json()["data"][0]["id"]
    # ignore_eos is on by default and the server honours it: every answer is exactly max_tokens.
    assert [r.output_tokens for r in result.requests] == [8] * 4
    assert_metric_definitions(result)
    assert list(result.ttft_by_turn_ms) == [1]


@pytest.mark.parametrize("concurrency", [1, 2])
def test_multiturn_workload(server, concurrency):
    result = run(server, "multiturn", concurrency, ignore_eos=False)
    assert (result.completed, result.failed) == (8, 0)
    assert [(r.index, r.turn) for r in result.requests] == [
        (i, t) for i in range(4) for t in (1, 2)]
    assert_metric_definitions(result)
    for first, second in zip(result.requests[::2], result.requests[1::2], strict=True):
        # Turn 2 resends turn 1, its answer and a new question.
        assert second.prompt_tokens > first.prompt_tokens + first.output_tokens
    assert set(result.ttft_by_turn_ms) == {1, 2}
    for turn, ms in result.ttft_by_turn_ms.items():
        assert approx(ms, 1000 * np.mean([r.ttft_s for r in result.requests if r.turn == turn]))


def test_chat_workload_sends_short_turns_that_end_on_their_own(server):
    """Short chat turns: one corpus question, no system prompt; replies stop at end of turn (no
    ignore_eos, even when asked for it), within `chat_max_tokens`."""
    result = run(server, "chat", 2, ignore_eos=True, chat_max_tokens=48)
    assert (result.completed, result.failed) == (4, 0)
    assert not result.ignore_eos and result.output_len == 48
    assert_metric_definitions(result)
    # 10-40 tokens with the bench model's tokenizer; the tiny model's is denser.
    assert all(10 <= r.prompt_tokens <= 64 for r in result.requests), result.requests
    assert all(0 < r.output_tokens <= 48 for r in result.requests)
    assert any(r.output_tokens < 48 for r in result.requests)  # ended at end of turn
    for conv in build_conversations("chat", 8, 128, 5, seed=3):
        assert conv.system is None and len(conv.user_turns) == 1


def test_quote_workload_texts_are_greedy_and_stable_across_concurrency(server):
    one, two = (run(server, "quote", c, num_prompts=2, output_len=16) for c in (1, 2))
    for result in (one, two):
        assert (result.completed, result.failed) == (2, 0)
        assert_metric_definitions(result)
        assert all(r.prompt_tokens > 600 for r in result.requests)
    assert one.texts == two.texts and all(one.texts)


def test_prompts_are_deterministic_and_sized():
    for workload in ("random", "chat", "multiturn", "quote"):
        a = build_conversations(workload, 3, 128, 5, seed=7)
        assert a == build_conversations(workload, 3, 128, 5, seed=7)
        assert a != build_conversations(workload, 3, 128, 5, seed=8)
    (random_prompt,) = build_conversations("random", 1, 130, 1, seed=0)
    assert len(random_prompt.user_turns[0].split()) == 100
    convs = build_conversations("multiturn", 2, 128, 5, seed=0)
    assert all(len(c.user_turns) == 5 and c.system for c in convs)


def test_failed_requests_are_counted_not_raised(server):
    # A prompt past the tiny model's 2,048-token context: the server answers 400 to each request.
    result = run(server, "random", 2, num_prompts=3, input_len=4000)
    assert (result.completed, result.failed) == (0, 3)
    assert all(r.error.startswith("HTTP 400") and not r.success for r in result.requests)
    assert result.output_throughput == 0 and result.ttft_ms["p99"] == 0
    assert result.texts == ["", "", ""]


def test_api_key_is_sent(server_factory, tmp_path, monkeypatch):
    keyed = server_factory({"CLINICLOOP_SERVER__API_KEYS": '["bench-key"]'})
    ok = asyncio.run(run_workload(keyed.v1, "random", 1, api_key="bench-key", **SMALL))
    assert (ok.completed, ok.failed) == (4, 0)
    denied = asyncio.run(run_workload(keyed.v1, "random", 1, model=ok.model, **SMALL))
    assert denied.failed == 4 and all("HTTP 401" in r.error for r in denied.requests)
    # The command without a key: one line saying what to pass, not a traceback.
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(SystemExit, match=r"/v1/models refused the key \(401\): pass --api-key"):
        main(["--base-url", keyed.v1, "--num-prompts", "1", "--concurrency", "1",
              "--no-progress", "--out", str(tmp_path)])


def test_cli_writes_json_png_and_summary(server, tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["--base-url", server.v1, "--workload", "random,multiturn", "--concurrency", "1,2",
                 "--num-prompts", "2", "--input-len", "32", "--output-len", "4", "--turns", "2",
                 "--no-ignore-eos", "--no-progress", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "result.json").read_text())
    runs = [RunResult.model_validate(r) for r in report["runs"]]
    assert [(r.workload, r.concurrency) for r in runs] == [
        ("random", 1), ("random", 2), ("multiturn", 1), ("multiturn", 2)]
    assert not any(r.ignore_eos for r in runs) and report["machine"]["cpus"]
    assert "api_key" not in report["args"]
    for r in runs:
        assert_metric_definitions(r)
    assert (out / "result.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "TTFT ms mean/med/p99" in printed and "mean TTFT ms by turn: 1:" in printed
