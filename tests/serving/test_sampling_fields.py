"""Every sampling field, and no field silently dropped: the official `openai` client against a real
server on the tiny model. Penalties, logit_bias, top_k, min_tokens and stop_token_ids change what
is generated; what the server does not honour, and every value out of range, is a 400 naming the
field; metadata that cannot change the answer is accepted."""

from __future__ import annotations

import openai
import pytest

CHAT = [{"role": "user", "content": "I have had a sore throat since yesterday."}]
GREEDY = {"temperature": 0, "max_tokens": 40}


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def vocab(tiny_model):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(tiny_model.gguf_q8_0), vocab_only=True, verbose=False)


def ids(vocab, text: str) -> list[int]:
    return vocab.tokenize(text.encode(), add_bos=False, special=True)


def chat(client, tiny_model, **fields):
    return client.chat.completions.create(model=tiny_model.name, messages=CHAT,
                                          **{**GREEDY, **fields})


def complete(client, tiny_model, prompt: str, **fields):
    return client.completions.create(model=tiny_model.name, prompt=prompt,
                                     **{**GREEDY, **fields})


def test_logit_bias_changes_greedy_output(client, tiny_model, vocab):
    plain = chat(client, tiny_model).choices[0].message.content
    first = ids(vocab, plain)[0]
    biased = chat(client, tiny_model, logit_bias={str(first): -100}).choices[0].message.content
    assert ids(vocab, biased)[0] != first
    text = complete(client, tiny_model, "Rest", max_tokens=16).choices[0].text
    forced = complete(client, tiny_model, "Rest", max_tokens=4, logit_bias={"42": 100})
    assert forced.choices[0].text == vocab.detokenize([42] * 4).decode() != text


def test_penalties_change_a_repetitive_continuation(client, tiny_model):
    prompt = "fever fever fever fever"
    plain = complete(client, tiny_model, prompt, max_tokens=30).choices[0].text
    for fields in ({"frequency_penalty": 2}, {"presence_penalty": 2},
                   {"extra_body": {"repetition_penalty": 2.0}}):
        assert complete(client, tiny_model, prompt, max_tokens=30, **fields).choices[0].text \
            != plain, fields
    # Chat too: repetition_penalty also counts the prompt's tokens (vLLM's definition).
    assert (chat(client, tiny_model, extra_body={"repetition_penalty": 2.0}).choices[0]
            .message.content != chat(client, tiny_model).choices[0].message.content)


def test_top_k_1_is_greedy_at_temperature_1(client, tiny_model):
    greedy = chat(client, tiny_model).choices[0].message.content
    for seed in (1, 2):
        sampled = chat(client, tiny_model, temperature=1.0, seed=seed, extra_body={"top_k": 1})
        assert sampled.choices[0].message.content == greedy
    # min_p 1 keeps only the most likely token: greedy too.
    assert chat(client, tiny_model, temperature=1.0, seed=1,
                extra_body={"min_p": 1.0}).choices[0].message.content == greedy


def test_min_tokens_keeps_generating_past_an_early_end(client, tiny_model):
    plain = chat(client, tiny_model, max_tokens=200)
    assert plain.choices[0].finish_reason == "stop"
    early = plain.usage.completion_tokens
    longer = chat(client, tiny_model, max_tokens=200, extra_body={"min_tokens": early + 10})
    assert longer.usage.completion_tokens >= early + 10
    assert longer.choices[0].message.content.startswith(plain.choices[0].message.content)


def test_stop_token_ids_stop(client, tiny_model, vocab):
    plain = chat(client, tiny_model).choices[0].message.content
    tokens = ids(vocab, plain)
    stopped = chat(client, tiny_model, extra_body={"stop_token_ids": [tokens[3]]})
    assert stopped.choices[0].finish_reason == "stop"
    assert ids(vocab, stopped.choices[0].message.content) == tokens[:3]
    streamed = chat(client, tiny_model, stream=True, extra_body={"stop_token_ids": [tokens[3]]})
    chunks = [c for c in streamed if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        stopped.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_metadata_and_a_reply_sent_back_are_accepted(client, tiny_model):
    reply = chat(client, tiny_model, user="patient-7", metadata={"app": "triage"}, store=True,
                 service_tier="auto", safety_identifier="h-123", prompt_cache_key="k",
                 modalities=["text"], frequency_penalty=0, presence_penalty=0, logit_bias={},
                 extra_body={"top_k": -1, "min_p": 0, "repetition_penalty": 1, "min_tokens": 0,
                             "stop_token_ids": [], "ignore_eos": False, "tools": None})
    assert reply.choices[0].message.content
    message = reply.choices[0].message
    # As apps send a reply back: the client's object, and its full dump (refusal, tool_calls,
    # audio... as null; our reasoning_content).
    for earlier in (message, message.model_dump()):
        again = client.chat.completions.create(
            model=tiny_model.name, max_tokens=4,
            messages=[*CHAT, earlier, {"role": "user", "content": "And now?"}])
        assert again.choices[0].message.content is not None
    assert client.completions.create(model=tiny_model.name, prompt="Rest", max_tokens=4,
                                     best_of=1, suffix="", echo=True, user="u").choices


def _refused(call, field: str, code: str | None = None) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    error = caught.value
    assert error.status_code == 400 and error.type == "invalid_request_error"
    assert error.param is not None and error.param.split(".")[0] == field.split(".")[0], \
        (error.param, error.message)
    assert error.param == field or error.param.startswith(field + "."), error.param
    if code is not None:
        assert error.code == code


CHAT_NOT_HONOURED = {  # tools are honoured: tests/serving/test_tool_calls.py
    "functions": [{"name": "lookup", "parameters": {}}],
    "function_call": "auto",
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"},
    "web_search_options": {},
    "reasoning_effort": "low",
    "verbosity": "low",
    "moderation": {"model": "omni-moderation-latest"},
}


@pytest.mark.parametrize("field", CHAT_NOT_HONOURED)
def test_chat_fields_not_honoured_are_refused_by_name(client, tiny_model, field):
    _refused(lambda: chat(client, tiny_model, extra_body={field: CHAT_NOT_HONOURED[field]}),
             field, "unsupported_parameter")


@pytest.mark.parametrize(("field", "value"), [("best_of", 2), ("suffix", " and then?")])
def test_completion_fields_not_honoured_are_refused_by_name(client, tiny_model, field, value):
    _refused(lambda: complete(client, tiny_model, "Rest", extra_body={field: value}), field,
             "unsupported_parameter")


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("field", ["guided_json", "top_a", "frequency-penalty", "x" * 300])
def test_unknown_fields_are_refused_by_name(client, tiny_model, endpoint, field):
    def call():
        if endpoint == "chat":
            return chat(client, tiny_model, extra_body={field: None})
        return complete(client, tiny_model, "Rest", extra_body={field: 1})
    _refused(call, field, "unknown_parameter")


@pytest.mark.parametrize(("message", "param"), [
    ({"role": "assistant", "content": "x", "function_call": {"name": "f", "arguments": "{}"}},
     "messages.1.function_call"),
    ({"role": "assistant", "content": None, "refusal": "I can't."}, "messages.1.refusal"),
    ({"role": "assistant", "content": "x", "audio": {"id": "a1"}}, "messages.1.audio"),
    ({"role": "user", "content": "x", "cache_control": {"type": "ephemeral"}},
     "messages.1.cache_control"),
])
def test_message_fields_not_honoured_are_refused_by_name(client, tiny_model, message, param):
    _refused(lambda: client.chat.completions.create(
        model=tiny_model.name, max_tokens=4, messages=[*CHAT, message]), param)


HUGE = 2**70
BAD_VALUES = [
    # (field, value): wrong types, out of range, huge
    ("presence_penalty", 2.5), ("presence_penalty", -3), ("presence_penalty", "high"),
    ("frequency_penalty", 2.01), ("frequency_penalty", -1e308), ("frequency_penalty", [1]),
    ("repetition_penalty", 0), ("repetition_penalty", -1), ("repetition_penalty", 1e300),
    ("repetition_penalty", {}),
    ("logit_bias", {"abc": 1}), ("logit_bias", {"-5": 1}), ("logit_bias", {"5": 101}),
    ("logit_bias", {"5": -1e9}), ("logit_bias", {"5": "x"}), ("logit_bias", [5]),
    ("logit_bias", {str(HUGE): 1}), ("logit_bias", {"1024": 1}),
    ("logit_bias", {"5": 1, "9" * 9: 1}),
    ("top_k", -2), ("top_k", HUGE), ("top_k", 1.5), ("top_k", "all"),
    ("min_p", -0.1), ("min_p", 1.01), ("min_p", "low"),
    ("min_tokens", -1), ("min_tokens", 41), ("min_tokens", HUGE), ("min_tokens", 2.5),
    ("stop_token_ids", [-1]), ("stop_token_ids", [1024]), ("stop_token_ids", [HUGE]),
    ("stop_token_ids", "2"), ("stop_token_ids", [1.5]), ("stop_token_ids", [3, None]),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_out_of_range_values_are_a_400_naming_the_field(client, tiny_model, endpoint, field,
                                                        value):
    def call():
        if endpoint == "chat":
            return chat(client, tiny_model, extra_body={field: value})
        return complete(client, tiny_model, "Rest", extra_body={field: value})
    _refused(call, field)


def test_min_tokens_is_checked_against_max_completion_tokens_and_the_default_budget(
        client, tiny_model):
    _refused(lambda: client.chat.completions.create(
        model=tiny_model.name, messages=CHAT, max_completion_tokens=5,
        extra_body={"min_tokens": 6}), "min_tokens", "invalid_value")
    # /v1/completions has OpenAI's default of 16 tokens.
    _refused(lambda: client.completions.create(model=tiny_model.name, prompt="Rest",
                                               extra_body={"min_tokens": 17}), "min_tokens")
    # Structured output ends when its value is complete: min_tokens cannot hold that back.
    _refused(lambda: chat(client, tiny_model, response_format={"type": "json_object"},
                          extra_body={"min_tokens": 3}), "min_tokens")
