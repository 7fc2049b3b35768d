"""`model` is read, with the official `openai` client against a real server on two tiny GGUFs
(q8_0 as `base`, f16 as `v1`): the served name routes (canary, sticky conversations), a version's
card pins it (loaded for the request if it is not, logged under it), any other name is a 404
`model_not_found`; multi-part text content is joined with a newline, other parts refused."""

from __future__ import annotations

import asyncio
import sqlite3

import httpx
import openai
import pytest

from clinicloop.backends.base import ModelNotFound
from clinicloop.backends.llamacpp import LlamaCppEngine
from clinicloop.config import EngineSettings
from clinicloop.serving.versions import canary_bucket
from tests.conftest import stored_conversation_id, wait_until

CLIENT_KEY, ADMIN_KEY = "sk-pin-client", "sk-pin-admin"
KEYS = {"CLINICLOOP_SERVER__API_KEYS": f'["{CLIENT_KEY}"]',
        "CLINICLOOP_SERVER__ADMIN_KEYS": f'["{ADMIN_KEY}"]'}
MESSAGES = [{"role": "user", "content": "I have a headache."}]


def _admin(server, method: str, path: str, **kwargs) -> httpx.Response:
    r = httpx.request(method, server.base_url + "/admin/v1" + path, timeout=60,
                      headers={"authorization": f"Bearer {ADMIN_KEY}"}, **kwargs)
    assert r.status_code < 300, r.text
    return r


def _loaded(server) -> list[str]:
    return [v["id"] for v in _admin(server, "GET", "/versions").json()["loaded"]]


def _logged(server, response_id: str) -> tuple[str, str, list]:
    """(model, model_version, messages) of the stored turn `response_id`."""
    import json

    def row():
        with sqlite3.connect(server.db_path) as db:
            return db.execute("select model, model_version, messages from turns where id = ?",
                              (response_id,)).fetchone()

    wait_until(lambda: row() is not None, 15, f"log row {response_id}")
    model, version, messages = row()
    return model, version, json.loads(messages)


@pytest.fixture
def server(server_factory, tiny_model):
    server = server_factory(KEYS)
    _admin(server, "POST", "/versions", json={"id": "v1", "parent": "base",
                                              "model_path": str(tiny_model.gguf_f16)})
    return server


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key=CLIENT_KEY, max_retries=0)


def _chat(client, model: str | None, conversation: str, **kwargs):
    """One turn of `conversation`; `model` None sends none."""
    return client.chat.completions.create(
        model=openai.NOT_GIVEN if model is None else model, messages=MESSAGES, max_tokens=4,
        temperature=0,
        extra_headers={"x-conversation-id": conversation}, **kwargs)


def test_the_served_name_routes_and_a_version_card_pins(server, client, tiny_model):
    served = tiny_model.name
    assert [m.id for m in client.models.list().data] == [served, f"{served}@v1"]
    _admin(server, "POST", "/canary", json={"version": "v1", "share": 0.5})
    names = [f"conv-{i}" for i in range(40)]
    on_v1 = next(n for n in names if canary_bucket(stored_conversation_id(CLIENT_KEY, n)) < 0.5)
    on_base = next(n for n in names
                   if canary_bucket(stored_conversation_id(CLIENT_KEY, n)) >= 0.5)

    # The served name (or none) routes as before: the canary share still applies.
    for model in (served, None):
        for conversation, version in ((on_v1, "v1"), (on_base, "base")):
            reply = _chat(client, model, conversation)
            assert reply.model == served
            assert _logged(server, reply.id)[:2] == (served, version)

    # A version's card pins it, whatever the conversation's bucket, and says so in the reply;
    # the bare version id too; `<served>@base` pins the root, which the served name routes.
    for model, conversation, card, version in (
            (f"{served}@v1", on_base, f"{served}@v1", "v1"),
            ("v1", on_base, f"{served}@v1", "v1"),
            (f"{served}@base", on_v1, f"{served}@base", "base"),
            ("base", on_v1, f"{served}@base", "base")):
        reply = _chat(client, model, conversation)
        assert reply.model == card
        assert _logged(server, reply.id)[:2] == (served, version)
        chunks = list(_chat(client, model, conversation, stream=True))
        assert {c.model for c in chunks} == {card}
        assert _logged(server, chunks[0].id)[1] == version

    completion = client.completions.create(model=f"{served}@v1", prompt="Patient: I have a",
                                           max_tokens=4, temperature=0)
    assert completion.model == f"{served}@v1"
    assert _logged(server, completion.id)[1] == "v1"

    # Pinned requests left each conversation where it was.
    for conversation, version in ((on_v1, "v1"), (on_base, "base")):
        assert _logged(server, _chat(client, served, conversation).id)[1] == version


def test_a_pinned_version_is_loaded_for_the_request_and_unloaded_after(server, client,
                                                                       tiny_model, tmp_path):
    assert _loaded(server) == ["base"]
    reply = _chat(client, f"{tiny_model.name}@v1", "loaded-on-demand")
    assert _logged(server, reply.id)[1] == "v1"
    wait_until(lambda: _loaded(server) == ["base"], 15, "v1 unloaded once idle")
    state = _admin(server, "GET", "/versions").json()
    assert state["active"] == "base" and state["canary"] is None

    # A version whose files went away after registration is refused with the load error; the
    # active version keeps serving.
    gone = tmp_path / "gone.gguf"
    gone.write_bytes(tiny_model.gguf_q8_0.read_bytes())
    _admin(server, "POST", "/versions", json={"id": "gone", "parent": "base",
                                              "model_path": str(gone)})
    gone.unlink()
    with pytest.raises(openai.UnprocessableEntityError) as err:
        _chat(client, f"{tiny_model.name}@gone", "refused")
    body = err.value.body
    assert body["code"] == "version_load_failed" and body["param"] == "model"
    assert "version 'gone' failed to load" in body["message"]
    assert _loaded(server) == ["base"]
    assert _logged(server, _chat(client, tiny_model.name, "after").id)[1] == "base"

    # A removed version is no model any more.
    _admin(server, "DELETE", "/versions/gone")
    with pytest.raises(openai.NotFoundError):
        _chat(client, "gone", "removed")


def test_any_other_model_is_a_404_model_not_found(server, client, tiny_model):
    served = tiny_model.name
    for model in ("gpt-4o", f"{served}@nope", f"{served}@", "other@v1", "", " " + served,
                  served.upper(), "x" * 10_000):
        for call in (lambda m: _chat(client, m, "c"),
                     lambda m: _chat(client, m, "c", stream=True),
                     lambda m: client.completions.create(model=m, prompt="x", max_tokens=2)):
            with pytest.raises(openai.NotFoundError) as err:
                call(model)
            assert err.value.status_code == 404 and err.value.code == "model_not_found"
            assert err.value.body["param"] == "model"
            assert set(err.value.body) == {"message", "type", "param", "code"}
            assert len(err.value.body["message"]) < 300  # a huge name is not echoed whole
    r = httpx.post(server.base_url + "/tokenize", json={"model": "gpt-4o", "prompt": "x"},
                   headers={"authorization": f"Bearer {CLIENT_KEY}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    with sqlite3.connect(server.db_path) as db:  # refused before admission: nothing logged
        assert db.execute("select count(*) from turns").fetchone() == (0,)


def test_an_engine_without_versions_serves_its_own_name_only(tmp_path):
    engine = LlamaCppEngine(EngineSettings(served_model_name="plain"), tmp_path)
    assert asyncio.run(engine.resolve(None)) is None
    assert asyncio.run(engine.resolve("plain")) is None
    with pytest.raises(ModelNotFound):
        asyncio.run(engine.resolve("plain@v1"))


def test_text_parts_are_joined_with_a_newline_and_other_parts_refused(server, client,
                                                                      tiny_model):
    reply = client.chat.completions.create(model=tiny_model.name, max_tokens=2, messages=[
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "I have a fever."},
                                     {"type": "text", "text": "And a cough."}]},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot say."}]},
        {"role": "user", "content": "Why?"}])
    messages = _logged(server, reply.id)[2]
    assert [m["content"] for m in messages] == [
        "Be brief.", "I have a fever.\nAnd a cough.", "I cannot say.", "Why?"]
    for part in ({"type": "image_url", "image_url": {"url": "https://example.com/x.png"}},
                 {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                 {"type": "file", "file": {"file_id": "file-1"}},
                 {"type": "x" * 5000}):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=tiny_model.name, max_tokens=2, messages=[
                {"role": "user", "content": [{"type": "text", "text": "Look:"}, part]}])
        message = err.value.body["message"]
        assert err.value.body["param"] == "messages.0.content" and len(message) < 300
        assert f"content part 1 is of type '{part['type'][:40]}" in message
        assert "takes text only" in message
