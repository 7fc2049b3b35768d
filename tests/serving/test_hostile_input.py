"""Hostile requests against a real keyed server on the tiny model, by class: wrong JSON types in
every field, numbers out of every range, non-standard JSON, deep nesting, bytes that are not
UTF-8, strings that are not text, wrong or missing bodies and content types, giant headers and
lists. Each is a 4xx in OpenAI's error shape, never a 5xx, and the server keeps serving."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from clinicloop.serving.chat_completion.protocol import ChatCompletionRequest
from clinicloop.serving.completion.protocol import CompletionRequest

KEY = "sk-hostile-client"
AUTH = {"authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "user", "content": "I have a cough."}]
CHAT = {"messages": MESSAGES, "max_tokens": 4}
COMPLETION = {"prompt": "Patient: I have a cough.\nDoctor:", "max_tokens": 4}


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory({"CLINICLOOP_SERVER__API_KEYS": f'["{KEY}"]'})


def _wrong(annotation: Any) -> Any:
    """A JSON value of the wrong type for a field: an object where a scalar or list belongs, a
    list where an object (dict) belongs."""
    return [1, "x"] if "dict" in str(annotation) else {"not": ["this type"]}


def _fields(model: type) -> list[str]:
    return sorted(name for name, f in model.model_fields.items() if f.alias is None)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _with(base: dict[str, Any], **fields: Any) -> bytes:
    return json.dumps({**base, **fields}).encode()


# (route, raw body, extra headers) per case; a class is several cases of one kind.
CASES: dict[str, tuple[str, bytes, dict[str, str]]] = {
    **{f"wrong type: chat {name}": ("/v1/chat/completions", _with(
        CHAT, **{name: _wrong(ChatCompletionRequest.model_fields[name].annotation)}), {})
       for name in _fields(ChatCompletionRequest)},
    **{f"wrong type: completion {name}": ("/v1/completions", _with(
        COMPLETION, **{name: _wrong(CompletionRequest.model_fields[name].annotation)}), {})
       for name in _fields(CompletionRequest)},
    **{f"wrong type: message {name}": ("/v1/chat/completions", _with(
        CHAT, messages=[{**MESSAGES[0], name: {"not": "this"}}]), {})
       for name in ("role", "content", "name")},
    "wrong type: content part": ("/v1/chat/completions", _with(
        CHAT, messages=[{"role": "user", "content": [{"type": "image_url", "text": 1}]}]), {}),
    "wrong type: json_schema": ("/v1/chat/completions", _with(CHAT, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}), {}),
    "huge: max_tokens": ("/v1/chat/completions", _with(CHAT, max_tokens=10**30), {}),
    "huge: max_completion_tokens": ("/v1/chat/completions",
                                    _with(CHAT, max_completion_tokens=10**30), {}),
    "huge: completion max_tokens": ("/v1/completions", _with(COMPLETION, max_tokens=10**30), {}),
    "huge: n": ("/v1/chat/completions", _with(CHAT, n=10**9), {}),
    "huge: temperature": ("/v1/chat/completions", _with(CHAT, temperature=1e308), {}),
    "huge: top_p": ("/v1/chat/completions", _with(CHAT, top_p=1e308), {}),
    "huge: seed": ("/v1/chat/completions", _with(CHAT, seed=10**30), {}),
    "huge: top_logprobs": ("/v1/chat/completions",
                           _with(CHAT, logprobs=True, top_logprobs=10**30), {}),
    "huge: completion logprobs": ("/v1/completions", _with(COMPLETION, logprobs=10**30), {}),
    "huge: integer of 5000 digits": ("/v1/chat/completions",
                                     b'{"messages": [], "max_tokens": ' + b"9" * 5000 + b"}", {}),
    "huge: 1e999": ("/v1/chat/completions", b'{"messages": [], "temperature": 1e999}', {}),
    "literal: NaN": ("/v1/chat/completions", b'{"messages": [], "temperature": NaN}', {}),
    "literal: Infinity": ("/v1/chat/completions", b'{"messages": [], "top_p": Infinity}', {}),
    "literal: -Infinity": ("/v1/completions", b'{"prompt": "x", "seed": -Infinity}', {}),
    "deep: 100 levels in chat_template_kwargs": ("/v1/chat/completions", _with(
        CHAT, chat_template_kwargs={"x": json.loads(_nested(100))}), {}),
    "deep: 100000 levels": ("/v1/chat/completions",
                            b'{"messages": ' + _nested(100_000).encode() + b"}", {}),
    "utf-8: invalid bytes in content": ("/v1/chat/completions",
                                        b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
                                        {}),
    "utf-8: encoded surrogate in content": (
        "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
        {}),
    **{f"surrogate: {where}": ("/v1/chat/completions", body.encode(), {}) for where, body in {
        "content": r'{"messages": [{"role": "user", "content": "fever \ud800"}]}',
        "low half alone": r'{"messages": [{"role": "user", "content": "\udc00 cough"}]}',
        "name": r'{"messages": [{"role": "user", "content": "x", "name": "\ud800"}]}',
        "content part": r'{"messages": [{"role": "user", "content": [{"type": "text", '
                        r'"text": "\ud83d"}]}]}',
        "stop": r'{"messages": [{"role": "user", "content": "x"}], "stop": ["\ud800"]}',
        "model": r'{"messages": [{"role": "user", "content": "x"}], "model": "\ud800"}',
        "user": r'{"messages": [{"role": "user", "content": "x"}], "user": "\ud800"}',
        "chat_template_kwargs key": r'{"messages": [{"role": "user", "content": "x"}], '
                                    r'"chat_template_kwargs": {"\ud800": 1}}',
        "json_schema enum": r'{"messages": [{"role": "user", "content": "x"}], "response_format":'
                            r' {"type": "json_schema", "json_schema": {"schema": {"enum": '
                            r'["\ud800"]}}}}',
    }.items()},
    "surrogate: completion prompt": ("/v1/completions", rb'{"prompt": "\ud800"}', {}),
    "body: empty": ("/v1/chat/completions", b"", {}),
    "body: whitespace": ("/v1/chat/completions", b"  \n", {}),
    "body: not JSON": ("/v1/chat/completions", b"messages=hello", {}),
    "body: truncated JSON": ("/v1/chat/completions", b'{"messages": [{"role": "us', {}),
    "body: two documents": ("/v1/chat/completions", _with(CHAT) + _with(CHAT), {}),
    "body: a list": ("/v1/chat/completions", b"[1, 2]", {}),
    "body: a string": ("/v1/chat/completions", b'"hello"', {}),
    "body: null": ("/v1/chat/completions", b"null", {}),
    "content-type: text/plain": ("/v1/chat/completions", _with(CHAT),
                                 {"content-type": "text/plain"}),
    "content-type: form": ("/v1/chat/completions", _with(CHAT),
                           {"content-type": "application/x-www-form-urlencoded"}),
    "content-type: multipart": ("/v1/chat/completions", _with(CHAT),
                                {"content-type": "multipart/form-data; boundary=x"}),
    "header: 12 KiB authorization": ("/v1/chat/completions", _with(CHAT),
                                     {"authorization": "Bearer " + "k" * 12_000}),
    "header: 64 KiB authorization": ("/v1/chat/completions", _with(CHAT),
                                     {"authorization": "Bearer " + "k" * 64_000}),
    "header: 64 KiB conversation id, no key": ("/v1/chat/completions", _with(CHAT),
                                               {"authorization": "", "x-conversation-id":
                                                "c" * 64_000}),
    "list: 10000 stop strings": ("/v1/chat/completions", _with(CHAT, stop=["x"] * 10_000), {}),
    "list: 10000 completion stop strings": ("/v1/completions",
                                            _with(COMPLETION, stop=["x"] * 10_000), {}),
    "list: 10000 prompts": ("/v1/completions", _with(COMPLETION, prompt=["x"] * 10_000), {}),
    "list: 10000 messages": ("/v1/chat/completions", _with(CHAT, messages=MESSAGES * 10_000), {}),
    "list: no messages": ("/v1/chat/completions", _with(CHAT, messages=[]), {}),
    "value: unknown role": ("/v1/chat/completions",
                            _with(CHAT, messages=[{"role": "doctor", "content": "x"}]), {}),
    "value: negative max_tokens": ("/v1/chat/completions", _with(CHAT, max_tokens=-1), {}),
    "value: stream_options without stream": ("/v1/chat/completions", _with(
        CHAT, stream_options={"include_usage": True}), {}),
    "route: admin with a client key": ("/admin/v1/versions", _with({"parent": "base"}), {}),
}


def _assert_openai_error(resp: httpx.Response) -> None:
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300])
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["type"], str)


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_request_is_a_4xx_in_openai_shape(server, case):
    path, body, headers = CASES[case]
    resp = httpx.post(server.base_url + path, content=body, timeout=60,
                      headers={"content-type": "application/json", **AUTH, **headers})
    _assert_openai_error(resp)


def test_server_keeps_serving_after_the_hostile_requests(server):
    """Runs after the cases above (pytest keeps file order): nothing broke. A header past what
    the HTTP parser takes (1 MB) is refused by uvicorn itself, before any of our code runs."""
    try:
        giant = httpx.post(server.v1 + "/chat/completions", json=CHAT, timeout=30,
                           headers={**AUTH, "x-note": "n" * 1_000_000})
        assert 400 <= giant.status_code < 500
    except httpx.TransportError:
        pass  # the connection closed on it: refused too
    assert httpx.get(server.base_url + "/health").status_code == 200
    resp = httpx.post(server.v1 + "/chat/completions", json=CHAT, headers=AUTH, timeout=60)
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] is not None
    assert server.proc.poll() is None
