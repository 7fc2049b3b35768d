"""POST /tokenize and /detokenize in vLLM's shapes against a real keyed server on the tiny model
(llama.cpp's vocabulary and chat template): round trips, chat messages counted as the engine
counts them, token strings, the model resolved as the generating routes resolve it, and every
bad request a 4xx in OpenAI's error shape."""

from __future__ import annotations

import httpx
import pytest

KEY, ADMIN_KEY = "sk-tokenize-client", "sk-tokenize-admin"
AUTH = {"authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "system", "content": "You are a careful doctor."},
            {"role": "user", "content": "I have had a fever for three days."}]
TEXTS = ["I have a fever.", "", "  leading and trailing  ", "39.5°C — since Tuesday",
         "發燒三天了", "emoji 🤒🤧", "tabs\tand\nnewlines\r\n", "<|im_start|>user\nhi<|im_end|>",
         "a" * 5000]


@pytest.fixture(scope="module")
def server(server_factory, tiny_model):
    server = server_factory({"CLINICLOOP_SERVER__API_KEYS": f'["{KEY}"]',
                             "CLINICLOOP_SERVER__ADMIN_KEYS": f'["{ADMIN_KEY}"]',
                             "CLINICLOOP_ENGINE__N_CTX": "1024"})
    r = httpx.post(server.base_url + "/admin/v1/versions", timeout=60,
                   headers={"authorization": f"Bearer {ADMIN_KEY}"},
                   json={"id": "v1", "parent": "base", "model_path": str(tiny_model.gguf_f16)})
    assert r.status_code == 201, r.text
    return server


def _post(server, path: str, body, headers=AUTH) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, headers=headers, timeout=60)


def _ok(server, path: str, body) -> dict:
    r = _post(server, path, body)
    assert r.status_code == 200, r.text
    return r.json()


def test_text_round_trips_through_tokens(server):
    for text in TEXTS:
        answer = _ok(server, "/tokenize", {"prompt": text})
        assert set(answer) == {"count", "max_model_len", "tokens", "token_strs"}
        assert answer["count"] == len(answer["tokens"]) and answer["max_model_len"] == 1024
        assert answer["token_strs"] is None
        assert bool(answer["tokens"]) == bool(text)
        assert _ok(server, "/detokenize", {"tokens": answer["tokens"]}) == {"prompt": text}
    # The chat template's markers are special tokens, each one id, as the engine reads them.
    marked = _ok(server, "/tokenize", {"prompt": "<|im_start|>"})
    assert marked["count"] == 1


def test_token_strs_are_the_vocabulary_entries(server):
    answer = _ok(server, "/tokenize", {"prompt": "I have a fever", "return_token_strs": True})
    strs = answer["token_strs"]
    assert len(strs) == answer["count"] and "".join(strs).replace("Ġ", " ") == "I have a fever"
    for token, text in zip(answer["tokens"], strs, strict=True):
        assert _ok(server, "/tokenize", {"prompt": text.replace("Ġ", " "),
                                         "add_special_tokens": False})["tokens"] == [token]


def test_messages_are_counted_as_the_engine_counts_them(server, tiny_model):
    answer = _ok(server, "/tokenize", {"messages": MESSAGES, "return_token_strs": True})
    reply = _ok(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1})
    assert answer["count"] == reply["usage"]["prompt_tokens"]
    rendered = _ok(server, "/detokenize", {"tokens": answer["tokens"]})["prompt"]
    assert rendered.startswith("<|im_start|>system\nYou are a careful doctor.<|im_end|>")
    assert "<|im_start|>assistant" in rendered
    # Without the generation prompt: the same tokens, less the assistant's opening.
    bare = _ok(server, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False})
    assert answer["tokens"][:bare["count"]] == bare["tokens"] and bare["count"] < answer["count"]
    assert "<|im_start|>assistant" not in _ok(server, "/detokenize",
                                              {"tokens": bare["tokens"]})["prompt"]
    # Multi-part text is joined with a newline, as for a chat completion.
    parts = [{"role": "user", "content": [{"type": "text", "text": "I have had a fever"},
                                          {"type": "text", "text": "for three days."}]}]
    joined = [{"role": "user", "content": "I have had a fever\nfor three days."}]
    assert _ok(server, "/tokenize", {"messages": parts}) == _ok(server, "/tokenize",
                                                                {"messages": joined})
    # chat_template_kwargs reach the template: thinking on leaves the <think> block open.
    on = _ok(server, "/tokenize", {"messages": MESSAGES,
                                   "chat_template_kwargs": {"thinking_mode": "on"}})
    assert on["tokens"] != answer["tokens"]


def test_the_model_is_resolved_as_for_a_chat(server, tiny_model):
    for model in (tiny_model.name, f"{tiny_model.name}@v1", "v1", "base"):
        ids = _ok(server, "/tokenize", {"model": model, "prompt": "fever"})["tokens"]
        assert _ok(server, "/detokenize", {"model": model, "tokens": ids})["prompt"] == "fever"
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
        r = _post(server, path, {**body, "model": "gpt-4o"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert r.json()["error"]["param"] == "model"


def test_a_client_key_is_required(server):
    for headers in ({}, {"authorization": "Bearer sk-wrong"}, {"authorization": "Basic x"}):
        for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]}),
                           ("/tokenize", {"not": "valid"})):
            r = _post(server, path, body, headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


BAD = {
    "/tokenize": [
        ({}, None), ({"prompt": "x", "messages": MESSAGES}, None),
        ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": 1}, "prompt"),
        ({"prompt": {"not": "text"}}, "prompt"), ({"prompt": None}, None),
        ({"messages": "hi"}, "messages"), ({"messages": [{"role": "doctor", "content": "x"}]},
                                           "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "https://example.com/x.png"}}]}]}, "messages.0.content"),
        ({"prompt": "x", "add_special_tokens": "maybe"}, "add_special_tokens"),
        ({"prompt": "x", "return_token_strs": [1]}, "return_token_strs"),
        ({"messages": MESSAGES, "chat_template_kwargs": [1]}, "chat_template_kwargs"),
        ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]},
         "tools"),
        ({"messages": MESSAGES, "chat_template": "{{ messages }}"}, "chat_template"),
        ({"messages": MESSAGES, "continue_final_message": True}, "continue_final_message"),
        ({"messages": MESSAGES, "chat_template_kwargs": {"add_generation_prompt": 1,
                                                         "messages": 2}}, "messages"),
        ({"prompt": "x", "model": 5}, "model"),
    ],
    "/detokenize": [
        ({}, "tokens"), ({"tokens": "1 2 3"}, "tokens"), ({"tokens": [-1]}, "tokens.0"),
        ({"tokens": [1, 1024]}, "tokens"), ({"tokens": [2**31]}, "tokens"),
        ({"tokens": [2**63]}, "tokens.0"), ({"tokens": [10**30]}, "tokens.0"),
        ({"tokens": [1.5]}, "tokens.0"), ({"tokens": ["one"]}, "tokens.0"),
        ({"tokens": [[1]]}, "tokens.0"), ({"tokens": [None]}, "tokens.0"),
        ({"tokens": {"0": 1}}, "tokens"), ({"tokens": [1] * 100_000 + [5000]}, "tokens"),
    ],
}


@pytest.mark.parametrize("path,body,param", [(p, b, x) for p, cases in BAD.items()
                                             for b, x in cases])
def test_bad_requests_are_400s_naming_the_field(server, path, body, param):
    r = _post(server, path, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert len(error["message"]) < 1000


def test_huge_inputs_are_served(server):
    ids = _ok(server, "/tokenize", {"prompt": "fever " * 50_000})["tokens"]
    assert len(ids) >= 50_000  # beyond max_model_len: counted, as vLLM counts it
    assert _ok(server, "/detokenize", {"tokens": ids})["prompt"] == "fever " * 50_000
