"""POST /v1/feedback against a real server on the tiny model: rating a chat completion, a
completion and a Responses object by id, the comment redacted on disk, another key's response
indistinguishable from a missing one, hostile bodies refused; and a store that does not answer
is a 503 to retry."""

from __future__ import annotations

import asyncio
import sqlite3

import httpx
import openai
import pytest

from clinicloop.serving.auth import Caller
from clinicloop.serving.errors import OpenAIError
from clinicloop.serving.feedback.protocol import FeedbackRequest
from clinicloop.serving.feedback.serving import FeedbackHandler
from clinicloop.store.db import Store
from tests.conftest import free_port

KEY, OTHER_KEY = "sk-test-feedback", "sk-test-feedback-other"
MAX_BODY = 65536
ENV = {"CLINICLOOP_SERVER__API_KEYS": f'["{KEY}", "{OTHER_KEY}"]',
       "CLINICLOOP_SERVER__MAX_BODY_BYTES": str(MAX_BODY)}
PHI_COMMENT = ("Wrong dose for my mother Maria Lopez, DOB 03/14/1962, MRN 00482913; call me at "
               "555-201-4477 or maria.lg@example.com")
PHI = ["Maria", "Lopez", "03/14/1962", "00482913", "555-201-4477", "maria.lg@example.com"]


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory(ENV)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def chat_id(client, tiny_model) -> str:
    reply = client.chat.completions.create(
        model=tiny_model.name, max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": "I have had a headache for two days."}])
    return reply.id


def post(server, body, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.v1}/feedback", json=body, headers=headers, timeout=30, **kwargs)


def feedback_rows(server) -> list[sqlite3.Row]:
    with sqlite3.connect(server.db_path) as db:
        db.row_factory = sqlite3.Row
        return db.execute("select * from feedback order by id").fetchall()


def test_rating_a_chat_completion_stores_it_with_the_comment_redacted(server, chat_id):
    reply = post(server, {"response_id": chat_id, "rating": "down", "comment": PHI_COMMENT})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body == {"id": body["id"], "object": "feedback", "response_id": chat_id,
                    "rating": "down"}
    row = next(r for r in feedback_rows(server) if r["id"] == body["id"])
    with sqlite3.connect(server.db_path) as db:
        key_id = db.execute("select api_key_id from turns where id = ?", (chat_id,)).fetchone()[0]
    assert (row["turn_id"], row["rating"], row["api_key_id"]) == (chat_id, "down", key_id)
    assert "Wrong dose" in row["comment"] and "[PHONE]" in row["comment"]
    assert not [p for p in PHI if p in row["comment"]], row["comment"]
    # Rated again without a comment: a second row, the newest one counts.
    again = post(server, {"response_id": chat_id, "rating": "up", "comment": None})
    assert again.status_code == 200 and again.json()["id"] > body["id"]
    assert feedback_rows(server)[-1]["comment"] is None


def test_completion_and_responses_ids_are_rated_too(server, client, tiny_model):
    completion = client.completions.create(model=tiny_model.name, prompt="Fever is",
                                           max_tokens=4, temperature=0)
    response = client.responses.create(model=tiny_model.name, input="Hello",
                                       max_output_tokens=8, temperature=0)
    for response_id in (completion.id, response.id):
        reply = post(server, {"response_id": response_id, "rating": "up"})
        assert reply.status_code == 200, reply.text
        assert reply.json()["response_id"] == response_id
    assert {r["turn_id"] for r in feedback_rows(server)} >= {completion.id, response.id}


def test_another_keys_response_is_not_found_like_a_missing_one(server, chat_id):
    before = len(feedback_rows(server))
    other = post(server, {"response_id": chat_id, "rating": "down"}, key=OTHER_KEY)
    missing_id = "chatcmpl-" + "0" * 32
    missing = post(server, {"response_id": missing_id, "rating": "down"})
    assert other.status_code == missing.status_code == 404
    assert other.json()["error"] == {
        "message": f"Response with id '{chat_id}' not found.", "type": "not_found_error",
        "param": "response_id", "code": "response_not_found"}
    assert missing.json()["error"] == {
        **other.json()["error"], "message": f"Response with id '{missing_id}' not found."}
    assert len(feedback_rows(server)) == before


@pytest.mark.parametrize("body", [
    {"response_id": "x", "rating": "meh"},
    {"response_id": "x", "rating": 1},
    {"response_id": "x", "rating": True},
    {"response_id": 123, "rating": "up"},
    {"response_id": "", "rating": "up"},
    {"response_id": ["x"], "rating": "up"},
    {"response_id": "x", "rating": "up", "comment": 5},
    {"response_id": "x", "rating": "up", "comment": {"text": "hi"}},
    {"response_id": "x", "rating": "up", "user": "someone"},  # extra fields are refused
    {"rating": "up"},
    {"response_id": "x"},
    {"response_id": "x", "rating": "up", "comment": "long " * 2000},  # over 8000 characters
    ["response_id", "x"],
])
def test_hostile_bodies_are_400s(server, body):
    before = len(feedback_rows(server))
    reply = post(server, body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["type"] == "invalid_request_error"
    assert len(feedback_rows(server)) == before


def test_a_body_over_the_limit_is_413_and_no_key_is_401(server, chat_id):
    huge = post(server, {"response_id": chat_id, "rating": "down",
                         "comment": "x" * (MAX_BODY + 1)})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    cut_short = post(server, None, content=b'{"response_id": "x", "rating": "up"')
    assert cut_short.status_code == 400
    assert post(server, {"response_id": chat_id, "rating": "up"}, key=None).status_code == 401
    assert post(server, {"response_id": chat_id, "rating": "up"},
                key="sk-wrong").status_code == 401


def test_a_store_that_does_not_answer_is_a_503_to_retry():
    # Nothing listens on this port: every connection is refused at once.
    store = Store(f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/clinicloop")
    handler = FeedbackHandler(store, redact=True)
    request = FeedbackRequest(response_id="chatcmpl-1", rating="up")
    with pytest.raises(OpenAIError) as caught:
        asyncio.run(handler.rate(request, Caller("client", "abc")))
    assert caught.value.status == 503 and caught.value.code == "store_unavailable"
    assert caught.value.headers == {"retry-after": "5"}
    store.dispose()
