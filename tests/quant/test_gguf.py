"""`clinicloop quant gguf` for real: llama.cpp's llama-imatrix and llama-quantize (`make
llama-tools`) on the bench tiny model, whose widths suit K-quants, and the quality table against
f16. The quantization and the table are computed once per module and shared by the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import llama_cpp
import pytest
from gguf import GGUFReader

from clinicloop.quant import gguf, quality

ROOT = Path(__file__).resolve().parents[2]
TYPES = list(gguf.DEFAULT_TYPES)
# Bits per weight over every tensor (the f32 norms and biases included) for this model's shapes.
BPW = {"f16": (15.9, 16.1), "q8_0": (8.4, 8.7), "q6_k": (6.4, 6.8), "q5_k_m": (5.5, 6.0),
       "q4_k_m": (4.8, 5.3)}
MATRICES = 4 * 7  # per layer: q, k, v, output, gate, up, down
CHUNKS = 6


@pytest.fixture(scope="module")
def quantized(bench, tmp_path_factory) -> tuple[gguf.GgufResult, Path]:
    out = tmp_path_factory.mktemp("gguf")
    result = gguf.run(bench.hf_dir, out, TYPES, name=bench.name, imatrix_chunks=CHUNKS,
                      ablate_imatrix=True, progress=False)
    gguf.write(result, out)
    return result, out


@pytest.fixture(scope="module")
def table(quantized) -> quality.QualityTable:
    result, out = quantized
    options = quality.QualityOptions(corpus_examples=8, held_out_examples=8, corpus_ppl_rows=16)
    table = quality.quality_table(result.f16, result.files, out, options, progress=False)
    quality.write(table, out)
    return table


def by_type(result: gguf.GgufResult) -> dict[str, gguf.GgufFile]:
    """The files with an importance matrix where there is one (the ablation is left out)."""
    return {f.type: f for f in [result.f16, *result.files]
            if f.imatrix is not None or f.type in gguf.NO_IMATRIX_TYPES}


def test_sizes_shrink_in_order_and_bits_per_weight_are_sane(quantized):
    result, out = quantized
    files = by_type(result)
    assert list(files) == ["f16", *TYPES]
    sizes = [f.file_bytes for f in files.values()]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    for name, f in files.items():
        low, high = BPW[name]
        assert low <= f.bits_per_weight <= high, (name, f.bits_per_weight)
        assert f.file_bytes == f.path.stat().st_size
    # Every width of this model is a multiple of 256, so no tensor needs a fallback, and each
    # file holds the types its name promises (the _M mixes keep some tensors at q6_k).
    assert all(not f.fallbacks for f in files.values())
    assert set(files["q6_k"].tensor_types) == {"q6_k", "f32"}
    assert set(files["q4_k_m"].tensor_types) == {"q4_k", "q6_k", "f32"}
    assert files["q4_k_m"].tensor_types["q4_k"] > files["q4_k_m"].tensor_types["q6_k"]
    written = json.loads((out / "gguf.json").read_text())
    assert [f["type"] for f in written["files"]] == [*TYPES, "q4_k_m"]
    assert "| q4_k_m |" in (out / "gguf.md").read_text()


def test_every_type_loads_and_generates(quantized):
    result, _ = quantized
    prompt = [{"role": "user", "content": "I have crushing chest pain. What should I do?"}]
    for f in [result.f16, *result.files]:
        llm = llama_cpp.Llama(model_path=str(f.path), n_ctx=256, n_threads=1,
                              n_threads_batch=1, verbose=False)
        try:
            reply = llm.create_chat_completion(prompt, max_tokens=16, temperature=0.0, seed=0)
        finally:
            llm.close()
        text = reply["choices"][0]["message"]["content"]
        assert reply["usage"]["completion_tokens"] > 0 and text.strip(), f.type


def test_imatrix_is_computed_on_the_corpus_and_used_for_k_quants(quantized):
    result, out = quantized
    imatrix = result.imatrix
    assert imatrix is not None and imatrix.path.is_file()
    assert (imatrix.entries, imatrix.chunks) == (MATRICES, CHUNKS)
    assert "<|im_start|>assistant" in imatrix.calibration.read_text()
    files = by_type(result)
    assert files["q8_0"].imatrix is None
    for name in ("q6_k", "q5_k_m", "q4_k_m"):
        use = files[name].imatrix
        assert use is not None and (use.entries, use.chunks) == (MATRICES, CHUNKS), name
        # The embedding is a lookup, so the matrix has no data for it; llama-quantize says so.
        assert use.tensors_without_data == ["token_embd.weight"]
        fields = GGUFReader(files[name].path).fields
        assert fields["quantize.imatrix.entries_count"].contents() == MATRICES
    # The matrix changes the quantized weights: same types and tensor sizes, different bytes.
    ablated = result.files[-1]
    assert ablated.imatrix is None and ablated.type == "q4_k_m"
    assert ablated.tensor_types == files["q4_k_m"].tensor_types
    assert ablated.bits_per_weight == files["q4_k_m"].bits_per_weight

    def tensor(path: Path) -> bytes:
        t = next(t for t in GGUFReader(path).tensors if t.name == "blk.0.ffn_up.weight")
        return bytes(t.data)

    assert tensor(ablated.path) != tensor(files["q4_k_m"].path)


def test_quality_table_compares_every_type_with_f16(quantized, table):
    _, out = quantized
    rows = {(r.type, r.imatrix): r for r in table.rows}
    assert list(rows)[0] == ("f16", False) and len(rows) == len(TYPES) + 2
    f16 = rows[("f16", False)]
    assert f16.ppl_held_out_ratio == 1.0 and f16.same_answers_as_f16 == 1.0
    assert table.held_out_tokens > 300 and table.corpus_tokens > 100
    for row in table.rows:
        assert row.rubric_score is not None and 0.0 <= row.rubric_score <= 1.0
        assert set(row.theme_scores) == {"theme:corpus", "theme:held_out"}
    # 8-bit is close to f16; even 4-bit stays within a small factor on both texts.
    q8 = rows[("q8_0", False)]
    assert 0.95 < q8.ppl_held_out_ratio < 1.05 and 0.98 < q8.ppl_corpus_ratio < 1.02
    for row in table.rows:
        assert 0.8 < row.ppl_held_out_ratio < 1.25 and 0.9 < row.ppl_corpus_ratio < 1.1, row.type
    # Fewer bits, further from f16's next-token distribution (imatrix files, in size order).
    assert f16.kl_vs_f16 == 0.0 and f16.top1_vs_f16 == 1.0
    kls = [rows[(t, t != "q8_0")].kl_vs_f16 for t in TYPES]
    assert kls == sorted(kls) and 0 < kls[0] < 0.01 and kls[-1] < 0.2
    assert rows[("q8_0", False)].top1_vs_f16 > 0.97
    # The model knows its training answers far better than text it never saw (28 vs 2,532 on
    # the corpus with tool dialogues; 300 steps see it about 0.7 times).
    assert f16.ppl_corpus * 20 < f16.ppl_held_out
    written = quality.QualityTable.model_validate_json((out / "quality.json").read_text())
    assert written == table
    md = (out / "quality.md").read_text()
    assert all(f"| {t} |" in md for t in ["f16", *TYPES])
    answers = [json.loads(line) for line in (out / "quality_answers.jsonl").open()]
    assert len(answers) == len(table.rows) * table.n_examples
    assert all(a["answer"].strip() for a in answers)


def test_cli_reports_k_quant_fallbacks_on_the_hidden_64_model(tmp_path):
    """On the tiny model every matrix is 64 or 256 wide: llama-quantize demotes the 64-wide
    K-quant tensors, and the command says which and why."""
    env = {**os.environ, "CLINICLOOP_MODELS_DIR": str(ROOT / "var" / "models")}
    cmd = [sys.executable, "-m", "clinicloop.cli", "quant", "gguf", "--tiny", "tiny",
           "--out", str(tmp_path), "--types", "q8_0,q4_k_m", "--imatrix-chunks", "2",
           "--chunk-tokens", "128", "--no-ablate-imatrix", "--no-quality"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = gguf.GgufResult.model_validate_json((tmp_path / "gguf.json").read_text())
    q8, q4 = result.files
    assert not q8.fallbacks
    # Logged by llama-quantize: the 64-wide layer matrices; not logged: the tied embedding,
    # which its output-matrix rule sends straight to q8_0.
    assert {(fb.wanted, fb.used) for fb in q4.fallbacks} == {
        ("q4_K", "q5_0"), ("q6_K", "q8_0"), ("q4_k_m", "q8_0")}
    assert all("row width 64 is not a multiple of" in fb.reason for fb in q4.fallbacks)
    assert "token_embd.weight" in {fb.tensor for fb in q4.fallbacks}
    # Only the 256-wide ffn_down matrices keep a K-quant.
    assert sum(q4.tensor_types.get(t, 0) for t in ("q5_0", "q8_0")) == len(q4.fallbacks)
    assert q4.tensor_types.get("q4_k", 0) + q4.tensor_types.get("q6_k", 0) == 2
    assert "## Fallbacks" in proc.stdout and "-> q5_0" in proc.stdout
