"""`clinicloop quant gguf`: HF directory -> GGUF f16 -> quantized GGUFs, with an importance matrix.

The f16 file comes from `model.gguf_export.write_gguf_f16`. Quantization runs llama.cpp's own
`llama-imatrix` and `llama-quantize` (built by `make llama-tools`): llama-cpp-python's
`llama_model_quantize` binding cannot take an importance matrix (its `imatrix` field points to a
C++ `std::unordered_map`). The importance matrix is computed on the shipped training corpus, each
dialogue rendered exactly as the model was trained on it, and used for every type below 8 bits.

llama.cpp picks each tensor's type itself: a K-quant "mix" (`_M`) keeps some tensors at a higher
type on purpose, and a tensor whose row width is not a multiple of the type's block (256 for
K-quants) falls back to a compatible type. Both are reported per file: the type mix read back from
the output GGUF, and each fallback with its reason parsed from llama-quantize's log.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

from gguf import GGUFReader
from pydantic import BaseModel
from tqdm import tqdm

from clinicloop.model.gguf_export import ftype_from_name, write_gguf_f16

DEFAULT_TYPES = ("q8_0", "q6_k", "q5_k_m", "q4_k_m")
# At 8 bits and above an importance matrix changes nothing worth its cost.
NO_IMATRIX_TYPES = frozenset({"f32", "f16", "bf16", "q8_0"})
BUILD_HINT = "build them once with `make llama-tools`"

_FALLBACK = re.compile(
    r"warning: (?P<tensor>\S+)\s+- ncols\s+(?P<ncols>\d+) not divisible by\s+(?P<block>\d+) "
    r"\(required for type\s+(?P<wanted>\S+)\) (?P<f16>\(WARNING: must use F16[^)]*\) )?"
    r"-> falling back to\s+(?P<used>\S+)")
_NO_IMATRIX_DATA = re.compile(r"did not find weights for (\S+)")


class Fallback(BaseModel):
    """A tensor llama-quantize could not give the wanted type because of its shape."""

    tensor: str
    wanted: str
    used: str
    reason: str


class ImatrixUse(BaseModel):
    path: Path
    entries: int  # tensors the importance matrix has data for
    chunks: int
    tensors_without_data: list[str]  # quantized without it (token_embd: a lookup, not a matmul)


class GgufFile(BaseModel):
    type: str
    path: Path
    file_bytes: int
    n_weights: int
    bits_per_weight: float  # over every tensor, as llama.cpp's "BPW"
    tensor_types: dict[str, int]  # ggml type -> number of tensors
    fallbacks: list[Fallback] = []
    imatrix: ImatrixUse | None = None
    wall_s: float = 0.0

    @property
    def mib(self) -> float:
        return self.file_bytes / 2**20


class Imatrix(BaseModel):
    path: Path
    calibration: Path
    calibration_chars: int
    chunks: int
    chunk_tokens: int
    entries: int
    wall_s: float


class GgufResult(BaseModel):
    hf_dir: Path
    name: str
    machine: str
    tools: dict[str, str]
    f16: GgufFile
    imatrix: Imatrix | None
    files: list[GgufFile]


def machine() -> str:
    """The CPU and core count, for the figures' provenance."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def tool(name: str) -> Path:
    """A llama.cpp tool (`llama-imatrix`, `llama-quantize`) from `$LLAMA_TOOLS_DIR` or the cache
    `make llama-tools` fills, built from the llama.cpp of the installed llama-cpp-python."""
    version = importlib.metadata.version("llama_cpp_python")
    folder = Path(os.environ.get("LLAMA_TOOLS_DIR", Path.home() / ".cache/clinicloop/bin"))
    for path in (folder / f"{name}-{version}", folder / name):
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(f"{name} not found in {folder}: {BUILD_HINT}")


def _run(cmd: list[str], log_path: Path) -> str:
    """Run a tool with its output in `log_path`; its log is returned, and its tail raised on
    failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w", encoding="utf-8") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    text = log_path.read_text(encoding="utf-8", errors="replace")
    if rc != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({rc}); log {log_path}:\n{text[-2000:]}")
    return text


def calibration_text() -> str:
    """Every corpus dialogue as the model was trained on it: each thinking mode's prompt and
    target, special tokens included (llama-imatrix parses them with --parse-special)."""
    from clinicloop.model.corpus import load_corpus
    from clinicloop.model.tiny import training_targets

    return "".join(prompt + target for i, row in enumerate(load_corpus())
                   for prompt, target in training_targets(row, i))


def inspect_gguf(path: Path, type_name: str) -> GgufFile:
    """Size, bits per weight and tensor-type mix of a GGUF file."""
    reader = GGUFReader(path)
    n_weights = sum(int(t.n_elements) for t in reader.tensors)
    n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    types = Counter(t.tensor_type.name.lower() for t in reader.tensors)
    return GgufFile(type=type_name, path=path, file_bytes=path.stat().st_size,
                    n_weights=n_weights, bits_per_weight=8 * n_bytes / n_weights,
                    tensor_types=dict(sorted(types.items())))


def compute_imatrix(f16: Path, out_dir: Path, chunks: int, chunk_tokens: int) -> Imatrix:
    """llama-imatrix over the calibration text: `chunks` chunks (0: all) of `chunk_tokens`."""
    started = time.perf_counter()
    calibration = out_dir / "calibration.txt"
    text = calibration_text()
    calibration.write_text(text, encoding="utf-8")
    path = out_dir / "imatrix.gguf"
    cmd = [str(tool("llama-imatrix")), "-m", str(f16), "-f", str(calibration), "-o", str(path),
           "-t", "1", "-c", str(chunk_tokens), "--parse-special"]
    if chunks:
        cmd += ["--chunks", str(chunks)]
    _run(cmd, out_dir / "logs" / "imatrix.log")
    reader = GGUFReader(path)
    done = int(reader.fields["imatrix.chunk_count"].contents())
    entries = sum(t.name.endswith(".in_sum2") for t in reader.tensors)
    return Imatrix(path=path, calibration=calibration, calibration_chars=len(text), chunks=done,
                   chunk_tokens=chunk_tokens, entries=entries,
                   wall_s=round(time.perf_counter() - started, 2))


def parse_fallbacks(log: str) -> list[Fallback]:
    fallbacks = []
    for m in _FALLBACK.finditer(log):
        reason = (f"row width {m['ncols']} is not a multiple of {m['wanted']}'s block of "
                  f"{m['block']}")
        if m["f16"]:
            reason += ", nor of its fallback's"
        fallbacks.append(Fallback(tensor=m["tensor"], wanted=m["wanted"], used=m["used"],
                                  reason=reason))
    return fallbacks


def unlogged_fallbacks(path: Path, type_name: str, logged: list[Fallback]) -> list[Fallback]:
    """K-quant tensors too narrow for a 256 block that llama-quantize demoted without a warning:
    its rule for the output matrix (and a tied embedding) picks q8_0 for them directly."""
    if "_k" not in type_name:
        return []
    seen = {fb.tensor for fb in logged}
    quantized = [t for t in GGUFReader(path).tensors
                 if t.tensor_type.name not in ("F32", "F16", "BF16") and t.name not in seen]
    return [Fallback(tensor=t.name, wanted=type_name, used=t.tensor_type.name.lower(),
                     reason=f"row width {int(t.shape[0])} is not a multiple of 256; llama.cpp's "
                            "rule for the output matrix (or a tied embedding) picks "
                            f"{t.tensor_type.name.lower()} without a warning")
            for t in quantized if int(t.shape[0]) % 256]


def quantize(f16: Path, dst: Path, type_name: str, imatrix: Path | None,
             log_path: Path) -> GgufFile:
    """llama-quantize `f16` to `type_name` (one thread), with the importance matrix if given."""
    ftype_from_name(type_name)  # an unknown type fails here, with the list of known ones
    started = time.perf_counter()
    cmd = [str(tool("llama-quantize"))]
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    part = dst.with_name(dst.name + ".part")
    log = _run([*cmd, str(f16), str(part), type_name.upper(), "1"], log_path)
    os.replace(part, dst)
    result = inspect_gguf(dst, type_name)
    logged = parse_fallbacks(log)
    result.fallbacks = logged + unlogged_fallbacks(dst, type_name, logged)
    result.wall_s = round(time.perf_counter() - started, 2)
    if imatrix is not None:
        fields = GGUFReader(dst).fields
        result.imatrix = ImatrixUse(
            path=imatrix, entries=int(fields["quantize.imatrix.entries_count"].contents()),
            chunks=int(fields["quantize.imatrix.chunks_count"].contents()),
            tensors_without_data=_NO_IMATRIX_DATA.findall(log))
    return result


def run(hf_dir: Path, out_dir: Path, types: list[str], *, name: str | None = None,
        use_imatrix: bool = True, imatrix_chunks: int = 64, chunk_tokens: int = 512,
        ablate_imatrix: bool = False, progress: bool = True) -> GgufResult:
    """Convert `hf_dir` to f16 GGUF in `out_dir`, then quantize it to each of `types`.

    `ablate_imatrix` adds the last type that used the importance matrix once more without it,
    to show what the matrix is worth."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = name or hf_dir.name
    types = [t.lower() for t in types]
    wants_imatrix = use_imatrix and any(t not in NO_IMATRIX_TYPES for t in types)
    # (type, file stem, with the importance matrix)
    plan = [(t, t, wants_imatrix and t not in NO_IMATRIX_TYPES) for t in types]
    ablated = [t for t, _, with_matrix in plan if with_matrix][-1:]
    if ablate_imatrix:
        plan += [(t, f"{t}-no-imatrix", False) for t in ablated]
    bar = tqdm(total=1 + wants_imatrix + len(plan), desc="quant gguf", unit="step",
               disable=not progress)
    bar.set_postfix_str("f16")
    started = time.perf_counter()
    path = write_gguf_f16(hf_dir, out_dir / f"{name}-f16.gguf", name=name)
    f16 = inspect_gguf(path, "f16")
    f16.wall_s = round(time.perf_counter() - started, 2)
    bar.update()
    imatrix = None
    if wants_imatrix:
        bar.set_postfix_str("imatrix")
        imatrix = compute_imatrix(f16.path, out_dir, imatrix_chunks, chunk_tokens)
        bar.update()
    files = []
    for type_name, stem, with_matrix in plan:
        bar.set_postfix_str(stem)
        matrix = imatrix.path if with_matrix and imatrix is not None else None
        files.append(quantize(f16.path, out_dir / f"{name}-{stem}.gguf", type_name, matrix,
                              out_dir / "logs" / f"quantize-{stem}.log"))
        bar.update()
    bar.close()
    tools = {t: str(tool(t)) for t in ("llama-quantize", "llama-imatrix")}
    return GgufResult(hf_dir=hf_dir, name=name, machine=machine(), tools=tools, f16=f16,
                      imatrix=imatrix, files=files)


def _mix(tensor_types: dict[str, int]) -> str:
    return ", ".join(f"{n}× {t}" for t, n in sorted(tensor_types.items(), key=lambda kv: -kv[1]))


def summary(result: GgufResult) -> str:
    """The human summary written beside `gguf.json`."""
    lines = [f"# GGUF quantization of {result.name}", "",
             f"- source: `{result.hf_dir}`", f"- machine: {result.machine}"]
    if result.imatrix is not None:
        im = result.imatrix
        lines.append(f"- importance matrix: `{im.path.name}`, {im.entries} tensors, {im.chunks} "
                     f"chunks of {im.chunk_tokens} tokens of the training corpus "
                     f"({im.wall_s:.1f} s)")
    lines += ["", "| type | size MiB | bits/weight | tensor types | fallbacks | imatrix | s |",
              "|---|---|---|---|---|---|---|"]
    for f in [result.f16, *result.files]:
        imat = "—" if f.imatrix is None else f"{f.imatrix.entries} tensors"
        lines.append(f"| {f.type} | {f.mib:.2f} | {f.bits_per_weight:.2f} | {_mix(f.tensor_types)} "
                     f"| {len(f.fallbacks)} | {imat} | {f.wall_s:.1f} |")
    lines += ["", "## Fallbacks", ""]
    groups: dict[tuple[str, str, str, str], list[str]] = {}
    for f in result.files:
        for fb in f.fallbacks:
            groups.setdefault((f.path.stem, fb.wanted, fb.used, fb.reason), []).append(fb.tensor)
    if not groups:
        lines.append("None: every tensor got the type llama.cpp chose for it.")
    lines += [f"- {stem}: {len(tensors)} tensor(s) {wanted} -> {used}, {reason}: "
              + ", ".join(f"`{t}`" for t in tensors)
              for (stem, wanted, used, reason), tensors in groups.items()]
    missing = sorted({n for f in result.files if f.imatrix for n in f.imatrix.tensors_without_data})
    if missing:
        lines += ["", f"Quantized without importance data: {', '.join(missing)} (llama-imatrix "
                  "records the inputs of matrix products; the token embedding is a row lookup)."]
    return "\n".join(lines) + "\n"


def write(result: GgufResult, out_dir: Path) -> tuple[Path, Path]:
    json_path, md_path = out_dir / "gguf.json", out_dir / "gguf.md"
    json_path.write_text(result.model_dump_json(indent=2) + "\n", encoding="utf-8")
    md_path.write_text(summary(result), encoding="utf-8")
    return json_path, md_path
