"""`make harden`: the evidence that no request takes the server down or loses a conversation.

One command, about 7 minutes on 2 idle cores (at most 20), against real `clinicloop serve`
processes on the tiny model on 127.0.0.1. Parts (`--parts` picks some):

- fuzz: schemathesis generates positive and negative requests from the server's own
  `/openapi.json` (`--fuzz-examples` per operation and mode; the client key on the OpenAI routes,
  the admin key on /admin). Checks: no 5xx and no dropped connection (`fuzz_5xx`), every 4xx in
  OpenAI's error shape `{"error": {"message", "type", "param", "code"}}`, every event stream ends
  with `data: [DONE]` (a Responses API stream with its final typed event). The fuzzed server
  has `engine.n_ctx` 256, so no generated request is
  expensive.
- properties: the hypothesis tests of PROPERTY_FILES (`pytest -m hypothesis`: the marker
  hypothesis' pytest plugin puts on every `@given` test).
- overload: locust's LLM user (benchmarks/locustfile.py) against a server with max_running 2 and
  max_waiting 2: first one user (the unloaded p99), then max_running users (the sustainable
  rate, nothing shed), then for `--storm-s` seconds STORM_USERS users offering OVERLOAD times
  the sustainable rate.
  Checks: load is shed with 429/503 and `retry-after`, nothing else fails, admitted requests' p99
  within P99_FACTOR of the unloaded p99, the server's RSS grows by at most RSS_GROWTH_MIB (peak
  from /proc), and a request right after the storm is answered within P99_FACTOR of the unloaded
  p99.
- faults: FAULTS, each a set of pytest tests run as a subprocess; a fault passes when all its
  tests ran and passed. Durability tests append `{"fault": ..., "rows_lost": n}` lines to the file
  named by `$CLINICLOOP_HARDEN_OUT`; `rows_lost` is their sum.
- security (on the fuzzed server, after the fuzz): no key, a wrong key, and a client key on an
  admin route are refused while a declared 1 MiB body has not been sent; CORS preflights get no
  `access-control-allow-origin`; the server's log never holds a key or the PHI marker that was
  sent in every field.

Writes `<out>/harden.json` and `<out>/harden.md` (the table), server and test logs under `<out>`,
and prints the table, then as its last line
`harden: requests=<n> shed=<n> fuzz_cases=<n> fuzz_5xx=<n> faults=<passed>/<tried> rows_lost=<n>`.
Exit status 0 when every check passed.

`python benchmarks/harden.py storm ...` is the locust worker the overload part starts (gevent
stays out of this process).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from peers import Peer, clinicloop_spec, start, stop
from pydantic import BaseModel, Field

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("fuzz", "security", "properties", "overload", "faults")
PROPERTY_FILES = ("tests/store/test_redact.py", "tests/store/test_writer.py",
                  "tests/backends/test_grammar.py")


class Fault(BaseModel):
    slug: str
    title: str
    files: tuple[str, ...]
    select: tuple[str, ...] = ()  # pytest options choosing among the files' tests, e.g. `-k`


FAULTS = (
    Fault(slug="kill9", title="kill -9 under load (ack)",
          files=("tests/serving/test_crash_durability.py",)),
    Fault(slug="store_down", title="store down during traffic",
          files=("tests/serving/test_log_durability.py",)),
    Fault(slug="spool_full", title="spool disk full", files=("tests/serving/test_spool_full.py",)),
    Fault(slug="hangups", title="20 clients hang up mid-stream",
          files=("tests/serving/test_disconnects.py",)),
    Fault(slug="refresh_killed", title="refresh killed at each step",
          files=("tests/rl/test_refresh.py",), select=("-k", "killed")),
    Fault(slug="corrupt_version", title="corrupt adapter or GGUF registered",
          files=("tests/serving/test_hot_swap.py", "tests/backends/test_registry.py"),
          select=("-k", "corrupt")),
    Fault(slug="upstream_killed", title="upstream killed mid-stream",
          files=("tests/backends/test_upstream_faults.py",)),
)
HARDEN_OUT_ENV = "CLINICLOOP_HARDEN_OUT"
PYTEST_TIMEOUT_S = 420
MAX_RUNNING, MAX_WAITING = 2, 2
STORM_USERS = 24
OVERLOAD = 4.0
# An admitted request waits behind at most max_waiting others, about one more round at capacity:
# 2x the unloaded latency, plus batching; the rest of 8x is the load generator and the shedding
# sharing 2 cores with the server. An unbounded queue would grow by 3x the capacity per second.
P99_FACTOR = 8.0
RSS_GROWTH_MIB = 64.0
PHI = "Zebulon Quartermaine-{tag}, SSN 078-05-1120"


# ---------------------------------------------------------------------------------------------
# Results


class Check(BaseModel):
    part: str
    name: str
    value: str
    ok: bool


class FuzzFailure(BaseModel):
    operation: str
    mode: str
    status: int | None
    problem: str
    request: str
    response: str
    server_log: list[str]


class FuzzResult(BaseModel):
    operations: list[str]
    cases: int
    by_status: dict[str, int]
    by_operation: dict[str, dict[str, int]]  # "<operation> <mode>" -> status -> cases
    server_errors: int
    failures: list[FuzzFailure]
    notes: list[str]
    wall_s: float


class TestRun(BaseModel):
    name: str
    selection: list[str]
    passed: int
    failed: int
    skipped: int
    tried: int
    failing: list[str]
    log: str
    wall_s: float
    # What the durability tests reported through $CLINICLOOP_HARDEN_OUT; None: nothing reported.
    rows_lost: int | None = None

    @property
    def ok(self) -> bool:
        return self.tried > 0 and self.passed == self.tried


class LoadPhase(BaseModel):
    users: int
    offered_rps: float | None
    seconds: float
    requests: int
    ok: int
    shed: int
    shed_without_retry_after: int
    other_failures: dict[str, int]
    ok_p50_ms: float | None
    ok_p99_ms: float | None
    ok_mean_ms: float | None
    ok_rps: float


class OverloadResult(BaseModel):
    max_running: int
    max_waiting: int
    unloaded: LoadPhase  # one user: the unloaded latency
    capacity: LoadPhase  # max_running users: the sustainable rate, nothing shed
    storm: LoadPhase
    rss_before_mib: float
    rss_after_mib: float
    rss_peak_mib: float
    recovery_s: float
    recovery_status: int
    wall_s: float


class RefusalProbe(BaseModel):
    who: str
    route: str
    status: int | None
    before_body: bool
    seconds: float


class SecurityResult(BaseModel):
    refusals: list[RefusalProbe]
    cors_allow_origin: list[str]
    phi_requests: dict[str, int]  # what each PHI-carrying request got (status; 0: no answer)
    leaks: list[str]


class Report(BaseModel):
    started: str
    wall_s: float
    args: dict[str, Any]
    fuzz: FuzzResult | None = None
    security: SecurityResult | None = None
    properties: TestRun | None = None
    overload: OverloadResult | None = None
    faults: list[TestRun] = Field(default_factory=list)
    checks: list[Check] = Field(default_factory=list)
    summary: str = ""


#: How a Responses API stream ends (OpenAI's final events).
RESPONSE_ENDS = ("response.completed", "response.incomplete", "response.failed")

def summary_line(report: Report) -> str:
    storm = report.overload.storm if report.overload else None
    fuzz = report.fuzz
    passed = sum(run.ok for run in report.faults)
    return (f"harden: requests={storm.requests if storm else 0} shed={storm.shed if storm else 0} "
            f"fuzz_cases={fuzz.cases if fuzz else 0} "
            f"fuzz_5xx={fuzz.server_errors if fuzz else 0} "
            f"faults={passed}/{len(report.faults)} "
            f"rows_lost={sum(run.rows_lost or 0 for run in report.faults)}")


def table(checks: Sequence[Check]) -> str:
    lines = ["| part | check | measured | |", "| --- | --- | --- | --- |"]
    lines += [f"| {c.part} | {c.name} | {c.value} | {'ok' if c.ok else 'FAILED'} |"
              for c in checks]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Servers


@contextmanager
def serving(out: Path, name: str, env: dict[str, str]) -> Iterator[Peer]:
    """`clinicloop serve` on the tiny model with `env`, its store and log under `out/name`."""
    from clinicloop.model.tiny_train import build_tiny

    model = build_tiny("tiny", out_root=ROOT / "var" / "models", progress=False)
    workdir = out / name
    workdir.mkdir(parents=True, exist_ok=True)
    spec = clinicloop_spec(model.gguf_q8_0, workdir, n_ctx=2048, slots=4, extra_env={
        "CLINICLOOP_ENGINE__SERVED_MODEL_NAME": model.name, **env})
    peer = start(spec, workdir, workdir)
    try:
        yield peer
    finally:
        stop(peer)


def keyed_env(client: str, admin: str) -> dict[str, str]:
    return {"CLINICLOOP_SERVER__API_KEYS": json.dumps([client]),
            "CLINICLOOP_SERVER__ADMIN_KEYS": json.dumps([admin])}


def base_url(peer: Peer) -> str:
    return f"http://127.0.0.1:{peer.port}"


# ---------------------------------------------------------------------------------------------
# Fuzz


def _error_shape_problem(body: Any) -> str | None:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "no `error` object"
    missing = {"message", "type", "param", "code"} - set(error)
    if missing:
        return f"`error` lacks {sorted(missing)}"
    if not isinstance(error["message"], str) or not isinstance(error["type"], str):
        return "`error.message` and `error.type` must be strings"
    if any(error[k] is not None and not isinstance(error[k], str) for k in ("param", "code")):
        return "`error.param` and `error.code` must be strings or null"
    return None


def _register_checks() -> list[Callable[..., Any]]:
    """The fuzz's schemathesis checks: no 5xx, OpenAI-shaped 4xx, streams ending in [DONE]."""
    import schemathesis
    from schemathesis.checks import not_a_server_error

    @schemathesis.check
    def openai_error_shape(ctx: Any, response: Any, case: Any) -> bool | None:
        if not 400 <= response.status_code < 500:
            return None
        try:
            body = json.loads(response.content)
        except ValueError:
            raise AssertionError(f"{response.status_code} body is not JSON") from None
        problem = _error_shape_problem(body)
        if problem:
            raise AssertionError(f"{response.status_code} not in OpenAI's error shape: {problem}")
        return True

    @schemathesis.check
    def stream_ends_with_done(ctx: Any, response: Any, case: Any) -> bool | None:
        content_type = (response.headers.get("content-type") or [""])[0]
        if "text/event-stream" not in content_type or response.stream_cut_short:
            return None
        data = [line[5:].strip() for line in response.content.decode(errors="replace")
                .splitlines() if line.startswith("data:")]
        if case.path == "/v1/responses":  # typed events, ending as OpenAI ends them: no [DONE]
            last = json.loads(data[-1]).get("type") if data else None
            if last not in RESPONSE_ENDS:
                raise AssertionError(f"a Responses stream ends with {last!r}, not one of "
                                     f"{', '.join(RESPONSE_ENDS)}")
            return True
        if not data or data[-1] != "[DONE]":
            raise AssertionError("event stream does not end with `data: [DONE]`")
        for item in data[:-1]:
            chunk = json.loads(item)
            if "error" in chunk and (problem := _error_shape_problem(chunk)):
                raise AssertionError(f"error event not in OpenAI's error shape: {problem}")
        return True

    return [not_a_server_error, openai_error_shape, stream_ends_with_done]


def _log_lines_since(log_path: Path, offset: int) -> list[str]:
    with log_path.open("rb") as f:
        f.seek(offset)
        return [line for line in f.read().decode(errors="replace").splitlines()
                if line.strip()][-10:]


def _failure_messages(exc: BaseException) -> list[str]:
    group = getattr(exc, "exceptions", None)
    if group:
        return [m for e in group for m in _failure_messages(e)]
    title = getattr(exc, "title", None)
    message = getattr(exc, "message", None) or str(exc)
    return [f"{title}: {message}" if title else message.splitlines()[0] if message else
            type(exc).__name__]


def fuzz(url: str, client_key: str, admin_key: str, log_path: Path, examples: int,
         seed: int) -> FuzzResult:
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as fixed_seed
    from schemathesis import GenerationMode
    from schemathesis.core.failures import FailureGroup

    started = time.monotonic()
    checks = _register_checks()
    config = schemathesis.Config.from_dict({"max-stream-events": 1_000_000})
    schema = schemathesis.openapi.from_url(
        url + "/openapi.json", config=config, headers={"Authorization": f"Bearer {client_key}"})
    by_status: dict[str, int] = {}
    by_operation: dict[str, dict[str, int]] = {}
    failures: list[FuzzFailure] = []
    notes: list[str] = []
    operations: list[str] = []
    cases = server_errors = 0

    def exercise(operation: Any, mode: Any, case: Any) -> None:
        nonlocal cases, server_errors
        key = admin_key if operation.path.startswith("/admin") else client_key
        headers = {"Authorization": f"Bearer {key}"}
        offset = log_path.stat().st_size
        cases += 1
        problems: list[str] = []
        status: int | None = None
        response_text = ""
        try:
            response = case.call(base_url=url, headers=headers, timeout=120)
        except requests.RequestException as exc:
            problems.append(f"no response ({type(exc).__name__})")
        else:
            status = response.status_code
            response_text = response.text[:300]
            try:
                case.validate_response(response, checks=checks, headers=headers)
            except (AssertionError, FailureGroup) as exc:  # one entry per failed check
                problems += _failure_messages(exc)
        by_status[str(status)] = by_status.get(str(status), 0) + 1
        tally = by_operation.setdefault(f"{operation.label} {mode.value}", {})
        tally[str(status)] = tally.get(str(status), 0) + 1
        if status is None or status >= 500:
            server_errors += 1
        if problems:
            failures.append(FuzzFailure(
                operation=operation.label, mode=mode.value, status=status,
                problem="; ".join(problems), request=_describe(case)[:600],
                response=response_text, server_log=_log_lines_since(log_path, offset)))

    for result in schema.get_all_operations():
        if not hasattr(result, "ok"):
            notes.append(f"schema error: {result.err()}")
            continue
        operation = result.ok()
        operations.append(operation.label)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            # Failures are recorded, not raised, so hypothesis runs every example unshrunk.
            run = given(case=operation.as_strategy(generation_mode=mode))(
                _bind(exercise, operation, mode))
            run = settings(max_examples=examples, deadline=None, database=None,
                           phases=[Phase.explicit, Phase.generate], print_blob=False,
                           suppress_health_check=list(HealthCheck))(run)
            try:
                fixed_seed(seed)(run)()
            except Exception as exc:  # e.g. no negative case exists for a parameterless route
                notes.append(f"{operation.label} {mode.value}: {type(exc).__name__}: "
                             f"{str(exc).split('. ')[0][:120]}")
    return FuzzResult(operations=operations, cases=cases, by_status=by_status,
                      by_operation=by_operation,
                      server_errors=server_errors, failures=failures, notes=notes,
                      wall_s=round(time.monotonic() - started, 1))


def _bind(exercise: Callable[[Any, Any, Any], None], operation: Any,
          mode: Any) -> Callable[[Any], None]:
    def run(case: Any) -> None:  # hypothesis' @given takes no function with defaults
        exercise(operation, mode, case)
    return run


def _describe(case: Any) -> str:
    body = case.body if not _is_not_set(case.body) else None
    parts = [f"{case.method} {case.formatted_path}"]
    if case.query:
        parts.append(f"query={json.dumps(case.query, default=str)}")
    if case.headers:
        parts.append(f"headers={json.dumps(dict(case.headers), default=str)}")
    if body is not None:
        parts.append(f"body={json.dumps(body, default=str, ensure_ascii=True)}")
    return " ".join(parts)


def _is_not_set(value: Any) -> bool:
    return type(value).__name__ == "NotSet"


# ---------------------------------------------------------------------------------------------
# Security


def refused_before_body(url: str, path: str, auth: str | None, who: str) -> RefusalProbe:
    """Declare a 1 MiB body, send 1 KiB of it, and see whether the answer comes anyway."""
    host, port = url.removeprefix("http://").split(":")
    declared = 1 << 20
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
            f"Content-Length: {declared}", "Connection: close"]
    if auth:
        head.append(f"Authorization: Bearer {auth}")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + b'{"messages": "' + b"a" * 1024)
        try:
            first = sock.recv(4096).decode(errors="replace")
        except TimeoutError:
            first = ""
    status = int(first.split()[1]) if first.startswith("HTTP/") else None
    return RefusalProbe(who=who, route=path, status=status, before_body=status is not None,
                        seconds=round(time.monotonic() - started, 3))


def security(url: str, client_key: str, admin_key: str, log_path: Path) -> SecurityResult:
    wrong = "sk-harden-wrong-" + secrets.token_hex(8)
    refusals = [
        refused_before_body(url, "/v1/chat/completions", None, "no key"),
        refused_before_body(url, "/v1/chat/completions", wrong, "wrong key"),
        refused_before_body(url, "/admin/v1/versions", client_key, "client key on admin"),
    ]
    cors: list[str] = []
    for path in ("/v1/chat/completions", "/v1/models", "/admin/v1/versions"):
        preflight = httpx.options(url + path, headers={
            "Origin": "https://attacker.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        cors += [f"{path}: {v}" for k, v in preflight.headers.items()
                 if k.lower() == "access-control-allow-origin"]

    marker = PHI.format(tag=secrets.token_hex(4))
    auth = {"Authorization": f"Bearer {client_key}", "X-Conversation-Id": marker}
    chat = url + "/v1/chat/completions"
    bodies: list[dict[str, Any]] = [
        {"messages": [{"role": "user", "content": marker, "name": "patient"}], "max_tokens": 4,
         "stop": [marker], "user": marker, "chat_template_kwargs": {"note": marker}},
        {"messages": [{"role": "user", "content": marker}], "max_tokens": 4, "stream": True},
        {"messages": [{"role": "user", "content": marker}], "temperature": marker},
        {"messages": [{"role": marker, "content": marker}]},
        {"messages": [{"role": "user", "content": marker}], "model": marker},
        {"messages": [{"role": "user", "content": marker}], "max_tokens": 4,
         "response_format": {"type": "json_schema",
                             "json_schema": {"schema": {"enum": [marker, '"' + marker]}}}},
    ]
    admin = {"Authorization": f"Bearer {admin_key}"}
    requests = [(chat, auth, body) for body in bodies] + [
        (url + "/v1/completions", auth, {"prompt": marker, "max_tokens": 4, "stop": marker}),
        (url + "/admin/v1/versions", admin,
         {"id": marker, "parent": "base", "model_path": marker}),
    ]
    answers: dict[str, int] = {}
    for i, (target, headers, body) in enumerate(requests):
        try:
            status = httpx.post(target, headers=headers, json=body, timeout=60).status_code
        except httpx.HTTPError:
            status = 0  # no answer: the server died (a log line may explain)
        answers[f"{i}: {target.removeprefix(url)} {sorted(body)}"] = status
    # Every handler's log lines are written (and flushed) before its response is sent.
    text = log_path.read_text(errors="replace")
    secret_words = {"client key": client_key, "admin key": admin_key, "wrong key": wrong,
                    "PHI marker": marker, "PHI surname": marker.split()[1].rstrip(","),
                    "PHI SSN": marker.split()[-1]}
    leaks = [name for name, word in secret_words.items() if word in text]
    return SecurityResult(refusals=refusals, cors_allow_origin=cors, phi_requests=answers,
                          leaks=leaks)


# ---------------------------------------------------------------------------------------------
# pytest runs (properties, faults)


def run_pytest(name: str, files: Sequence[str], select: Sequence[str], out: Path,
               timeout_s: float) -> TestRun:
    """Run the tests in a pytest subprocess; durability tests report lost rows to a file of
    their own, named by $CLINICLOOP_HARDEN_OUT."""
    slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    junit = out / f"{slug}.xml"
    log = out / f"{slug}.log"
    rows_file = out / f"{slug}.rows_lost.jsonl"
    for stale in (junit, rows_file):
        stale.unlink(missing_ok=True)
    present = [f for f in files if (ROOT / f).is_file()]
    missing = [f for f in files if f not in present]
    started = time.monotonic()
    selection = [*present, *select]
    if present:
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   f"--junitxml={junit}", *selection]
        with log.open("w") as f:
            try:
                subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                               env={**os.environ, HARDEN_OUT_ENV: str(rows_file)},
                               timeout=timeout_s)
            except subprocess.TimeoutExpired:
                f.write(f"\nharden: timed out after {timeout_s:.0f}s\n")
    passed, failed, skipped, failing = _junit_counts(junit)
    failing += [f"{f}: missing" for f in missing]
    return TestRun(name=name, selection=selection + [f"{f} (missing)" for f in missing],
                   passed=passed, failed=failed + len(missing), skipped=skipped,
                   tried=passed + failed + skipped + len(missing), failing=failing,
                   log=str(log), wall_s=round(time.monotonic() - started, 1),
                   rows_lost=read_rows_lost(rows_file))


def _junit_counts(junit: Path) -> tuple[int, int, int, list[str]]:
    if not junit.is_file():
        return 0, 1, 0, ["no pytest report (crashed or timed out)"]
    passed = failed = skipped = 0
    failing: list[str] = []
    for case in ET.parse(junit).iter("testcase"):
        outcome = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        name = f"{case.get('classname')}::{case.get('name')}"
        if not outcome:
            passed += 1
        elif outcome[0] == "skipped":
            skipped += 1
            failing.append(f"{name} (skipped)")
        else:
            failed += 1
            failing.append(name)
    return passed, failed, skipped, failing


def read_rows_lost(path: Path) -> int | None:
    """The sum of `rows_lost` over the JSON lines the tests appended; None if none did."""
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sum(int(row["rows_lost"]) for row in rows) if rows else None


# ---------------------------------------------------------------------------------------------
# Overload


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def load_phase(url: str, key: str, users: int, rate: float | None, seconds: float,
               out: Path, name: str) -> LoadPhase:
    result = out / f"{name}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "storm", "--host", url,
               "--users", str(users), "--seconds", str(seconds), "--out", str(result)]
    if rate is not None:
        command += ["--rate-per-user", f"{rate / users:.4f}"]
    with (out / f"{name}.log").open("w") as log:
        subprocess.run(command, env={**os.environ, "OPENAI_API_KEY": key}, stdout=log,
                       stderr=subprocess.STDOUT, check=True, timeout=seconds + 120)
    samples = json.loads(result.read_text())
    ok_ms = sorted(s["ms"] for s in samples if s["ok"])
    shed = [s for s in samples if s["status"] in (429, 503)]
    others: dict[str, int] = {}
    for s in samples:
        if not s["ok"] and s["status"] not in (429, 503):
            others[str(s["status"] or s["error"])] = others.get(str(s["status"] or s["error"]),
                                                                 0) + 1
    return LoadPhase(
        users=users, offered_rps=rate, seconds=seconds, requests=len(samples), ok=len(ok_ms),
        shed=len(shed), shed_without_retry_after=sum(not s["retry_after"] for s in shed),
        other_failures=others,
        ok_p50_ms=_quantile(ok_ms, 0.5), ok_p99_ms=_quantile(ok_ms, 0.99),
        ok_mean_ms=round(statistics.fmean(ok_ms), 1) if ok_ms else None,
        ok_rps=round(len(ok_ms) / seconds, 2),
    )


def _quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def overload(out: Path, storm_s: float) -> OverloadResult:
    started = time.monotonic()
    key = "sk-harden-load-" + secrets.token_hex(8)
    env = {**keyed_env(key, "sk-harden-unused-" + secrets.token_hex(8)),
           "CLINICLOOP_ENGINE__N_PARALLEL": str(MAX_RUNNING),
           "CLINICLOOP_SERVER__MAX_RUNNING": str(MAX_RUNNING),
           "CLINICLOOP_SERVER__MAX_WAITING": str(MAX_WAITING)}
    with serving(out, "overload", env) as peer:
        url = base_url(peer)
        unloaded = load_phase(url, key, 1, None, 10, out / "overload", "unloaded")
        capacity = load_phase(url, key, MAX_RUNNING, None, 10, out / "overload", "capacity")
        if not capacity.ok:
            raise RuntimeError(f"no request succeeded at capacity: {capacity}")
        pid = peer.proc.pid
        before = rss_mib(pid)
        peak = [before]
        stop_sampling = threading.Event()

        def sample() -> None:
            while not stop_sampling.wait(0.5):
                peak[0] = max(peak[0], rss_mib(pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            storm = load_phase(url, key, STORM_USERS, OVERLOAD * capacity.ok_rps, storm_s,
                               out / "overload", "storm")
        finally:
            stop_sampling.set()
            sampler.join()
        recovery_started = time.monotonic()
        answer = httpx.post(url + "/v1/chat/completions", timeout=60,
                            headers={"Authorization": f"Bearer {key}"},
                            json={"messages": [{"role": "user", "content": "I have a cough."}],
                                  "max_tokens": 64, "ignore_eos": True, "temperature": 0.0})
        recovery_s = time.monotonic() - recovery_started
        after = rss_mib(pid)
        peak_hwm = max(peak[0], rss_mib(pid, "VmHWM"))
    return OverloadResult(
        max_running=MAX_RUNNING, max_waiting=MAX_WAITING, unloaded=unloaded, capacity=capacity,
        storm=storm, rss_before_mib=round(before, 1),
        rss_after_mib=round(after, 1), rss_peak_mib=round(peak_hwm, 1),
        recovery_s=round(recovery_s, 3), recovery_status=answer.status_code,
        wall_s=round(time.monotonic() - started, 1))


def storm_main(argv: Sequence[str]) -> int:
    """Locust's LLM user, headless in this process, recording every request's status and
    `retry-after` (locust's own CSV keeps neither per request)."""
    parser = argparse.ArgumentParser(prog="harden.py storm")
    parser.add_argument("--host", required=True)
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--rate-per-user", type=float, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    import gevent
    import locustfile
    from locust import constant, constant_throughput
    from locust.env import Environment

    class StormUser(locustfile.LLMUser):
        wait_time = (constant_throughput(args.rate_per_user) if args.rate_per_user
                     else constant(0))

    samples: list[dict[str, Any]] = []

    def on_request(request_type: str, response_time: float, response: Any = None,
                   exception: Any = None, **_: Any) -> None:
        if request_type != "POST":
            return
        status = getattr(response, "status_code", None) or None
        samples.append({
            "ok": exception is None, "status": status, "ms": response_time,
            "retry_after": response.headers.get("retry-after") if status else None,
            "error": None if exception is None else type(exception).__name__,
        })

    env = Environment(user_classes=[StormUser], host=args.host)
    env.events.request.add_listener(on_request)
    runner = env.create_local_runner()
    runner.start(args.users, spawn_rate=args.users)
    gevent.sleep(args.seconds)
    runner.quit()
    args.out.write_text(json.dumps(samples))
    return 0


# ---------------------------------------------------------------------------------------------
# Checks and the report


def checks_for(report: Report) -> list[Check]:
    checks: list[Check] = []
    add = checks.append
    if (f := report.fuzz) is not None:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(f.by_status.items()))
        add(Check(part="fuzz", name=f"cases over {len(f.operations)} operations",
                  value=f"{f.cases} ({statuses})", ok=f.cases > 0))
        add(Check(part="fuzz", name="5xx or no response", value=str(f.server_errors),
                  ok=f.server_errors == 0))
        other = [x for x in f.failures if x.status is not None and x.status < 500]
        add(Check(part="fuzz", name="4xx not OpenAI-shaped, streams without [DONE]",
                  value=str(len(other)), ok=not other))
    if (s := report.security) is not None:
        for probe in s.refusals:
            add(Check(part="security", name=f"{probe.who}, 1 MiB declared, 1 KiB sent",
                      value=f"{probe.status} in {probe.seconds:.3f}s"
                      + ("" if probe.before_body else " (waited for the body)"),
                      ok=probe.before_body and probe.status in (401, 403)))
        add(Check(part="security", name="CORS preflight allow-origin",
                  value=", ".join(s.cors_allow_origin) or "none", ok=not s.cors_allow_origin))
        add(Check(part="security", name="keys or PHI in the server log",
                  value=", ".join(s.leaks) or "none", ok=not s.leaks))
        dead = [k for k, v in s.phi_requests.items() if v == 0 or v >= 500]
        add(Check(part="security", name="PHI in every field: answered, no 5xx",
                  value=", ".join(dead) or f"{len(s.phi_requests)} answered", ok=not dead))
    if (p := report.properties) is not None:
        add(Check(part="properties", name="hypothesis property tests",
                  value=f"{p.passed}/{p.tried} passed", ok=p.ok))
    if (o := report.overload) is not None:
        st, un = o.storm, o.unloaded
        add(Check(part="overload", name=f"offered {OVERLOAD:g}x sustainable "
                  f"({st.offered_rps or 0:.1f} vs {o.capacity.ok_rps:.1f} req/s), {st.seconds:g}s",
                  value=f"{st.requests} requests, {st.ok} served, {st.shed} shed",
                  ok=st.shed > 0 and st.ok > 0))
        add(Check(part="overload", name="shed with 429/503 and retry-after",
                  value=f"{st.shed - st.shed_without_retry_after}/{st.shed} with retry-after; "
                  f"other failures {st.other_failures or 'none'}",
                  ok=st.shed_without_retry_after == 0 and not st.other_failures))
        bound = P99_FACTOR * (un.ok_p99_ms or 0)
        add(Check(part="overload", name=f"admitted p99 <= {P99_FACTOR:g}x unloaded p99",
                  value=f"{st.ok_p99_ms} vs {un.ok_p99_ms} ms", ok=(st.ok_p99_ms or 0) <= bound))
        add(Check(part="overload", name=f"RSS growth <= {RSS_GROWTH_MIB:g} MiB",
                  value=f"{o.rss_before_mib} -> {o.rss_after_mib} MiB, peak {o.rss_peak_mib}",
                  ok=o.rss_peak_mib - o.rss_before_mib <= RSS_GROWTH_MIB))
        add(Check(part="overload", name="first request after the storm",
                  value=f"{o.recovery_status} in {o.recovery_s * 1000:.0f} ms",
                  ok=o.recovery_status == 200 and o.recovery_s * 1000 <= bound))
    for run in report.faults:
        value = f"{run.passed}/{run.tried} tests"
        if run.rows_lost is not None:
            value += f", {run.rows_lost} rows lost"
        if run.failing:
            value += f" ({'; '.join(run.failing)[:200]})"
        add(Check(part="faults", name=run.name, value=value, ok=run.ok and not run.rows_lost))
    return checks


def write_report(report: Report, out: Path) -> None:
    (out / "harden.json").write_text(report.model_dump_json(indent=2))
    lines = [f"# make harden, {report.started}", "", table(report.checks), ""]
    if report.fuzz and report.fuzz.failures:
        lines += ["## Fuzz failures", ""]
        for x in report.fuzz.failures:
            lines += [f"- {x.operation} ({x.mode}) -> {x.status}: {x.problem}",
                      f"  - request: `{x.request}`",
                      f"  - server log: {' | '.join(x.server_log)[:400] or '(nothing)'}"]
        lines.append("")
    lines += [f"Wall time {report.wall_s:.0f} s.", "", report.summary, ""]
    (out / "harden.md").write_text("\n".join(lines))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "harden")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--fuzz-examples", type=int, default=200,
                        help="hypothesis examples per operation and mode (positive, negative)")
    parser.add_argument("--storm-s", type=float, default=60.0, help="overload duration")
    parser.add_argument("--seed", type=int, default=0, help="the fuzz's hypothesis seed")
    slugs = [f.slug for f in FAULTS]
    parser.add_argument("--faults", default=",".join(slugs),
                        help=f"comma-separated subset of {','.join(slugs)}")
    args = parser.parse_args(argv)
    args.parts = [p for p in args.parts.split(",") if p]
    args.faults = [f for f in args.faults.split(",") if f]
    for given, known, what in ((args.parts, PARTS, "parts"), (args.faults, slugs, "faults")):
        if unknown := set(given) - set(known):
            parser.error(f"unknown {what} {sorted(unknown)}; choose from {', '.join(known)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["storm"]:
        return storm_main(argv[1:])
    args = parse_args(argv)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report = Report(started=datetime.now(UTC).isoformat(timespec="seconds"), wall_s=0,
                    args={k: str(v) for k, v in vars(args).items()})

    def progress(message: str) -> None:
        print(f"[harden {time.monotonic() - started:6.0f}s] {message}", flush=True)

    if {"fuzz", "security"} & set(args.parts):
        client = "sk-harden-client-" + secrets.token_hex(8)
        admin = "sk-harden-admin-" + secrets.token_hex(8)
        env = {**keyed_env(client, admin), "CLINICLOOP_ENGINE__N_CTX": "256",
               "CLINICLOOP_SERVER__REQUEST_TIMEOUT_S": "60"}
        with serving(out, "fuzz", env) as peer:
            if "fuzz" in args.parts:
                progress(f"fuzz: schemathesis, {args.fuzz_examples} examples per operation "
                         "and mode")
                report.fuzz = fuzz(base_url(peer), client, admin, peer.log_path,
                                   args.fuzz_examples, args.seed)
            if "security" in args.parts:
                progress("security: keys before bodies, CORS, the server log")
                report.security = security(base_url(peer), client, admin, peer.log_path)
    if "properties" in args.parts:
        progress("properties: hypothesis property tests")
        report.properties = run_pytest("property tests", PROPERTY_FILES, ("-m", "hypothesis"),
                                       out, PYTEST_TIMEOUT_S)
    if "overload" in args.parts:
        progress(f"overload: locust, {args.storm_s:g}s storm")
        (out / "overload").mkdir(exist_ok=True)
        report.overload = overload(out, args.storm_s)
    if "faults" in args.parts:
        faults_dir = out / "faults"
        faults_dir.mkdir(exist_ok=True)
        for fault in FAULTS:
            if fault.slug in args.faults:
                progress(f"fault: {fault.title}")
                report.faults.append(run_pytest(fault.title, fault.files, fault.select,
                                                faults_dir, PYTEST_TIMEOUT_S))
    report.wall_s = round(time.monotonic() - started, 1)
    report.checks = checks_for(report)
    report.summary = summary_line(report)
    write_report(report, out)
    print(table(report.checks))
    print(f"wall time {report.wall_s:.0f} s; {out / 'harden.json'}, {out / 'harden.md'}")
    print(report.summary)
    return 0 if all(c.ok for c in report.checks) else 1


if __name__ == "__main__":
    sys.exit(main())
