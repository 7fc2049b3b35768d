"""PHI in every field a client sends reaches no byte of the store: the `X-Conversation-Id`
header, `stop`, `chat_template_kwargs` (keys and values), message fields; and conversation ids are
namespaced by the caller's key, so one key cannot write into another key's conversation."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx

from clinicloop.serving.auth import KeyRing
from clinicloop.serving.generation import conversation_id
from tests.conftest import wait_until

KEY_A, KEY_B = "sk-phi-a", "sk-phi-b"
KEYS = {"CLINICLOOP_SERVER__API_KEYS": f'["{KEY_A}", "{KEY_B}"]'}
# No cue in it that a rule could find: only hashing keeps it out of the store.
HEADER = "Zebulon Quartermaine 078-05-1120"
PHI = ["Zebulon", "Quartermaine", "078-05-1120", "078.05.1120", "Xiomara", "Wójcikowska",
       "xiomara@bücher.de", "00917733", "Ignatius"]


def _chat(server, key: str, header: str, text: str) -> httpx.Response:
    return httpx.post(server.v1 + "/chat/completions", timeout=60, headers={
        "authorization": f"Bearer {key}", "x-conversation-id": header}, json={
        "messages": [{"role": "user", "name": "Ignatius", "content": text}],
        "metadata": {"Xiomara Wójcikowska": "SSN 078.05.1120"},
        "safety_identifier": "Zebulon Quartermaine", "user": "MRN 00917733",
        "max_tokens": 4,
        "stop": ["Regards,\nXiomara Wójcikowska", "xiomara@bücher.de"],
        "chat_template_kwargs": {"thinking_mode": "off", "note": {
            "MRN 00917733": ["My name is Zebulon Quartermaine, SSN 078-05-1120"]}},
    })


def _rows(db: Path) -> list[tuple[str, str | None]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("select conversation_id, api_key_id from turns").fetchall()


def _store_bytes(db: Path) -> bytes:
    # The database and its write-ahead log: a committed turn may still be only in the log.
    return b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))


def test_phi_in_header_and_parameters_never_reaches_the_store(server_factory):
    server = server_factory(KEYS)
    texts = ["My name is Xiomara Wójcikowska, email xiomara@bücher.de.", "Second turn."]
    for text in texts:
        assert _chat(server, KEY_A, HEADER, text).status_code == 200
    assert _chat(server, KEY_B, HEADER, "I'm Zebulon.").status_code == 200
    wait_until(lambda: len(_rows(server.db_path)) >= 3, 15, "3 logged turns")

    stored = _store_bytes(server.db_path)
    for phi in PHI:
        assert phi.encode() not in stored, phi
    # Both keys sent the same header: each has its own conversation, the same for every turn.
    rows = _rows(server.db_path)
    by_key: dict[str | None, set[str]] = {}
    for conversation, key_id in rows:
        by_key.setdefault(key_id, set()).add(conversation)
    assert len(by_key) == 2 and all(len(ids) == 1 for ids in by_key.values()), rows
    keys = KeyRing([KEY_A, KEY_B], [])
    assert by_key[keys.identify(KEY_A).key_id] == {
        conversation_id([], keys.identify(KEY_A), HEADER)}


def test_conversation_id_is_a_hash_of_key_and_header():
    keys = KeyRing([KEY_A, KEY_B], [])
    a, b = keys.identify(KEY_A), keys.identify(KEY_B)
    ours = conversation_id([], a, HEADER)
    assert ours.startswith("conv-") and len(ours) == 29 and "Zebulon" not in ours
    assert ours == conversation_id([{"role": "user", "content": "other"}], a, HEADER)
    assert ours != conversation_id([], b, HEADER) != conversation_id([], a, HEADER + "x")
    # Without a header, the opening messages name the conversation: never the same as a header.
    opening = [{"role": "user", "content": HEADER}]
    assert conversation_id(opening, a, None) == conversation_id(opening, a, "")
    assert conversation_id(opening, a, None) != ours


def test_phi_in_tool_calls_and_results_never_reaches_the_store(server_factory):
    """A call's arguments, a tool's result and the tools' own text are redacted like any message."""
    server = server_factory()
    tool = {"type": "function", "function": {
        "name": "lookup_record", "description": "Records of patient: Zebulon Quartermaine",
        "parameters": {"type": "object", "properties": {"patient": {"type": "string"}}}}}
    response = httpx.post(server.v1 + "/chat/completions", timeout=60, json={
        "max_tokens": 8, "tools": [tool], "messages": [
            {"role": "user", "content": "Pull up my record please."},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call-1", "type": "function", "function": {
                    "name": "lookup_record",
                    "arguments": '{"patient": "Xiomara Wójcikowska", "ssn": "078-05-1120"}'}}]},
            {"role": "tool", "tool_call_id": "call-1",
             "content": '{"email": "xiomara@bücher.de", "mrn": "MRN 00917733"}'}]})
    assert response.status_code == 200, response.text
    wait_until(lambda: len(_rows(server.db_path)) >= 1, 15, "the logged turn")
    stored = _store_bytes(server.db_path)
    for phi in PHI[:-1]:  # all but the participant name, which this turn does not send
        assert phi.encode() not in stored, phi
    assert b"lookup_record" in stored  # the call itself is kept
