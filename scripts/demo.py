"""`make demo`: the whole loop on the tiny model, from nothing, in a few minutes on 2 cores.

1. build the tiny model (cached after the first time) and start the server (llama.cpp engine,
   SQLite store, model registry) with a client key and an admin key;
2. drive simulated consultations through the API (the patient simulator talks to the server's
   `/v1/chat/completions`), so the server logs them, redacted, as it logs any traffic;
3. score the logged conversations with the verifier (generated rubrics + judge);
4. run one refresh: GRPO on the logged prompts for a target behaviour a rubric rewards -- advising
   emergency care when the patient describes red-flag symptoms (the generator's `kind:rule` item,
   checked mechanically, so the score is not a tiny judge's guess) -- then gate the candidate on
   the held-out prompts against the serving version and hot-swap it through the admin API;
5. show that the server now serves the new version and logs traffic under it.

Everything lives under var/demo (wiped at the start). The last line is
`demo: before=<held-out score> after=<held-out score> report=<report.md>`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from openai import OpenAI

from clinicloop.config import Settings
from clinicloop.model.tiny_train import build_tiny
from clinicloop.rl.config import PaperGRPOConfig
from clinicloop.rl.refresh import Paths, RefreshOptions, refresh
from clinicloop.store.db import Store
from clinicloop.verifier.patients import load_scripts
from clinicloop.verifier.score_logs import format_summary, score_store
from clinicloop.verifier.simulation import simulate, summary
from clinicloop.verifier.simulator import SimulatorOptions


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check, timeout_s: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{what} not ready within {timeout_s:.0f} s")


def start_server(home: Path, port: int, api_key: str, admin_key: str,
                 models_dir: Path) -> subprocess.Popen:
    env = {**os.environ,
           "CLINICLOOP_STORE__URL": f"sqlite:///{home / 'clinicloop.db'}",
           "CLINICLOOP_STORE__SPOOL_PATH": str(home / "spool.jsonl"),
           "CLINICLOOP_REGISTRY__DIR": str(home / "registry"),
           "CLINICLOOP_MODELS_DIR": str(models_dir),
           "CLINICLOOP_SERVER__API_KEYS": json.dumps([api_key]),
           "CLINICLOOP_SERVER__ADMIN_KEYS": json.dumps([admin_key])}
    log = (home / "server.log").open("w")
    return subprocess.Popen([sys.executable, "-m", "clinicloop.cli", "serve", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def logged_turns(admin: httpx.Client) -> int:
    """Turns the server has written to its store, once its log queue is empty."""
    stats = admin.get("/admin/v1/stats").json()["log"]
    return -1 if stats["queue_depth"] else stats["inserted"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=Path("var/demo"))
    parser.add_argument("--seeds", type=int, default=6, help="Simulation rounds over the scripts.")
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60, help="GRPO steps of the refresh.")
    args = parser.parse_args()

    home = args.home.resolve()
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    models_dir = Settings().models_dir.resolve()
    store_url = f"sqlite:///{home / 'clinicloop.db'}"
    started = time.monotonic()

    say("1/5 the tiny model and the server")
    tiny = build_tiny("tiny", out_root=models_dir)
    api_key, admin_key = f"sk-{secrets.token_urlsafe(16)}", f"sk-admin-{secrets.token_urlsafe(16)}"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(home, port, api_key, admin_key, models_dir)
    admin = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {admin_key}"},
                         timeout=60)
    try:
        wait_for(lambda: httpx.get(f"{base}/health").status_code == 200, 180, "server", server)
        print(f"serving {tiny.name} on {base} (log: {home / 'server.log'})")

        say("2/5 simulated consultations through the API")
        scripts = load_scripts()
        for seed in range(args.seeds):
            report = asyncio.run(simulate(
                f"{base}/v1", None, scripts, SimulatorOptions(max_turns=args.max_turns), None,
                seed, api_key=api_key, models_dir=models_dir))
            print(summary(report))
        wait_for(lambda: logged_turns(admin) > 0, 60, "the server's log queue")
        print(f"the server logged {logged_turns(admin)} turns into {store_url}")

        say("3/5 score the logged conversations (rubric generator + judge, tiny model)")
        print(format_summary(score_store(store_url, None, models_dir=models_dir,
                                         out=home / "score.json")))

        say("4/5 refresh: GRPO for the target behaviour, gate, hot-swap")
        print("target: advise emergency care when the patient describes red-flag symptoms "
              "(rule item of the generated rubric)")
        job = refresh(
            Paths(store_url=store_url, registry_dir=home / "registry", runs_dir=home / "rl",
                  models_dir=models_dir, server_url=base, admin_key=admin_key),
            RefreshOptions(stage="rule", eval_max_tokens=64,
                           grpo=PaperGRPOConfig(max_steps=args.steps, max_completion_length=48,
                                                per_device_train_batch_size=8)))
        report = json.loads((job.run_dir / "report.json").read_text())

        say("5/5 the server after the swap")
        versions = admin.get("/admin/v1/versions").json()
        print(f"active version: {versions['active']} (history: "
              f"{' -> '.join(a['version'] for a in versions['history'])})")
        print(memory_summary(versions))
        client = OpenAI(base_url=f"{base}/v1", api_key=api_key)
        reply = client.chat.completions.create(
            model=client.models.list().data[0].id, temperature=0, max_tokens=48,
            messages=[{"role": "user", "content": "I suddenly got the worst headache of my life "
                                                  "an hour ago."}])
        print(f"new version answers: {reply.choices[0].message.content!r}")
        store = Store(store_url)
        try:
            wait_for(lambda: store.get(reply.id) is not None, 30, "the reply's log row")
            print(f"logged as {reply.id} with model_version="
                  f"{store.get(reply.id).model_version}")
        finally:
            store.dispose()
    finally:
        admin.close()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    print(f"\n{report['decision']['reasons'][0]}; {time.monotonic() - started:.0f} s in all")
    print(f"demo: before={report['before']:.3f} after={report['after']:.3f} "
          f"report={report['files']['report_md']}")
    if not report["swapped"]:
        sys.exit(1)


def memory_summary(versions: dict) -> str:
    """The active version's files and what the server's memory holds: one shared base, and per
    loaded version its own KV cache and adapter."""
    active = next(v for v in versions["data"] if v["id"] == versions["active"])
    memory, mib = versions["memory"], 1 << 20
    lines = [f"version {active['id']}: base {active['model_path']} + adapter "
             f"{active['lora_path']}",
             f"memory: process RSS {memory['rss_bytes'] / mib:.1f} MiB; "
             f"{len(memory['bases'])} base(s) loaded, "
             + ", ".join(f"{n / mib:.1f} MiB" for n in memory["bases"].values())]
    lines += [f"  {vid}: KV cache {m['kv_cache_bytes'] / mib:.1f} MiB, adapter "
              f"{m['adapter_bytes'] / mib:.2f} MiB"
              for vid, m in sorted(memory["versions"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
