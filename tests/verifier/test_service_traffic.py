"""The loop's own traffic through a real gateway: the judge, rubric generator and patient simulator
are logged as service turns, which never become training prompts nor get scored; a key role and
the origin header decide it; clients of a keyed server take their key by option or environment
and a refused key is one line."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from clinicloop.cli import app
from clinicloop.rl.prompts import logged_prompts
from clinicloop.store.db import Store
from clinicloop.verifier.client import KeyRefused, open_client
from clinicloop.verifier.generator import RubricGenerator
from clinicloop.verifier.judge import Judge
from clinicloop.verifier.judge_templates import HEALTHBENCH, SPLIT
from clinicloop.verifier.patients import load_scripts
from clinicloop.verifier.rubrics import RubricItem
from clinicloop.verifier.simulator import PatientSimulator, SimulatorOptions
from tests.conftest import Server, wait_until
from tests.verifier.clients import CountingClient

PATIENT = [{"role": "user", "content": "I have had a dry cough for three weeks."}]
ITEM = RubricItem(criterion="Asks how long the cough has lasted", points=4,
                  tags=["axis:context_awareness"])
CLIENT_KEY, SERVICE_KEY, ADMIN_KEY = "sk-client-test", "sk-service-test", "sk-admin-test"
KEY_ENV = ("CLINICLOOP_JUDGE_API_KEY", "CLINICLOOP_CLIENT_API_KEY", "OPENAI_API_KEY")


def chat(server: Server, messages: list[dict[str, Any]], key: str | None = None,
         headers: dict[str, str] | None = None) -> None:
    auth = {"authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(server.v1 + "/chat/completions", timeout=60, headers={**auth, **(headers or {})},
                   json={"messages": messages, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text


def logged(server: Server, n: int) -> list[tuple[str, str]]:
    """(origin, first user message) of every stored turn, once the server has stored `n`."""
    store = Store(f"sqlite:///{server.db_path}")
    try:
        wait_until(lambda: store.count() >= n, 30, f"{n} logged turns")
        return [(t.origin, next(m["content"] for m in t.messages if m["role"] == "user"))
                for t in store.list_turns(limit=1000)]
    finally:
        store.dispose()


async def loop_calls(url: str, api_key: str | None = None) -> int:
    """One judge verdict, one rubric and one simulated consultation's patient side through `url`:
    the chat requests sent (each is one logged turn)."""
    async with open_client(url, api_key=api_key, key_option="--judge-key") as http:
        client = CountingClient(http)  # type: ignore[arg-type]
        await Judge(client, max_tokens=64).grade(PATIENT, "How long has it lasted?", ITEM)
        await RubricGenerator(client, max_items=2, max_tokens=128).for_conversation(PATIENT)
        simulator = PatientSimulator(client, SimulatorOptions(max_turns=2, patient_max_tokens=32))
        await simulator.consult(load_scripts()[0], _Doctor(), "sim-test", 0)
    return client.calls


class _Doctor:
    """A doctor that asks one question, then gives a plan: no model, the patient is under test."""

    model = "doctor"

    async def chat(self, messages: list[dict[str, Any]], **_: Any) -> str:
        if not any(m["role"] == "assistant" for m in messages):
            return "How long has it lasted, and do you have a fever?"
        return "This is most likely viral: rest and fluids, and see your doctor if it lasts."


def test_the_loops_own_calls_never_become_prompts_nor_get_scored(server_factory):
    server = server_factory()
    chat(server, PATIENT)  # a patient
    calls = asyncio.run(loop_calls(server.v1))
    assert calls >= 3  # the judge, the rubric generator, the patient
    turns = logged(server, 1 + calls)
    assert len(turns) == 1 + calls and ("client", PATIENT[0]["content"]) in turns
    service = [text for origin, text in turns if origin == "service"]
    assert len(service) == calls
    assert any(text.startswith(HEALTHBENCH[:40]) or text.startswith(SPLIT[:40])
               for text in service)  # the judge's prompt

    store = Store(f"sqlite:///{server.db_path}")
    split = logged_prompts(store, heldout_fraction=0.5)
    prompts = [p.messages[-1]["content"] for p in split.train + split.heldout]
    assert prompts == [PATIENT[0]["content"]] and split.seen == 1
    assert store.count_turns_to_score() == 1  # `verify score` sees the patient's turn only
    store.dispose()


def test_key_roles_and_the_origin_header(server_factory, monkeypatch):
    for name in KEY_ENV:
        monkeypatch.delenv(name, raising=False)
    server = server_factory({"CLINICLOOP_SERVER__API_KEYS": json.dumps([CLIENT_KEY]),
                             "CLINICLOOP_SERVER__SERVICE_KEYS": json.dumps([SERVICE_KEY]),
                             "CLINICLOOP_SERVER__ADMIN_KEYS": json.dumps([ADMIN_KEY])})
    mark = {"X-Clinicloop-Origin": "service"}
    chat(server, [{"role": "user", "content": "service key"}], SERVICE_KEY)
    chat(server, [{"role": "user", "content": "admin key, marked"}], ADMIN_KEY, mark)
    chat(server, [{"role": "user", "content": "client key, marked"}], CLIENT_KEY, mark)
    chat(server, [{"role": "user", "content": "client key"}], CLIENT_KEY)
    assert sorted(logged(server, 4)) == [
        ("client", "client key"), ("client", "client key, marked"),
        ("service", "admin key, marked"), ("service", "service key")]

    # A client of the keyed server without a key: one line naming the URL and the option.
    with pytest.raises(KeyRefused) as refused:
        asyncio.run(loop_calls(server.v1))
    message = str(refused.value)
    assert "\n" not in message and server.v1 in message and "401" in message
    assert "--judge-key" in message and "CLINICLOOP_JUDGE_API_KEY" in message
    # The key from the option's variable; the loop's calls are service turns.
    monkeypatch.setenv("CLINICLOOP_JUDGE_API_KEY", SERVICE_KEY)
    calls = asyncio.run(loop_calls(server.v1))
    assert [o for o, _ in logged(server, 4 + calls)].count("service") == 2 + calls


def test_verify_score_with_a_refused_key_is_one_line(server_factory, monkeypatch, tmp_path):
    for name in KEY_ENV:
        monkeypatch.delenv(name, raising=False)
    server = server_factory({"CLINICLOOP_SERVER__API_KEYS": json.dumps([CLIENT_KEY])})
    store = f"sqlite:///{tmp_path / 'store.db'}"
    runner = CliRunner()
    args = ["verify", "score", "--judge-url", server.v1, "--store-url", store]
    refused = runner.invoke(app, [*args, "--judge-key", "sk-wrong"])
    assert refused.exit_code == 1 and refused.exception is None or \
        isinstance(refused.exception, SystemExit)
    (line,) = refused.output.strip().splitlines()
    assert line.startswith(f"error: {server.v1} refused the key (401")
    assert "--judge-key" in line

    monkeypatch.setenv("CLINICLOOP_CLIENT_API_KEY", CLIENT_KEY)  # the fallback variable
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "turns scored: 0" in done.output
