"""The sampler chain of the in-process engine on the real tiny model, without HTTP: which of
llama.cpp's samplers a request gets, and that each sampling field does what it says (penalties,
logit_bias, top_k, min_p, min_tokens, stop_token_ids), alone, and with speculative decoding."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest

from clinicloop.backends.base import Delta, EngineError, SamplingParams
from clinicloop.backends.batching import Request
from clinicloop.backends.llamacpp import LlamaCppEngine
from clinicloop.config import EngineSettings, SpeculativeSettings

CHAT = [{"role": "user", "content": "I have had a sore throat since yesterday."}]
GREEDY = SamplingParams(max_tokens=60, temperature=0.0)


@dataclasses.dataclass
class Out:
    text: str
    tokens: int
    finish: str | None


def _engine(tiny_model, tmp_path, **settings) -> LlamaCppEngine:
    return LlamaCppEngine(EngineSettings(model_path=tiny_model.gguf_q8_0, **settings), tmp_path)


async def _run(engine: LlamaCppEngine, params: SamplingParams, prompt: str | None = None,
               messages: list[dict[str, str]] = CHAT) -> Out:
    parts, tokens, finish = [], 0, None
    events = (engine.chat(messages, params, {}) if prompt is None
              else engine.complete(prompt, params))
    async for event in events:
        if isinstance(event, Delta):
            parts.append(event.content)
            tokens += event.tokens
            finish = event.finish_reason or finish
    return Out("".join(parts), tokens, finish)


@pytest.fixture(scope="module")
def engine(tiny_model, tmp_path_factory):
    """One started engine and an event loop on a thread of its own, shared by the module."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    eng = _engine(tiny_model, tmp_path_factory.mktemp("samplers"), n_parallel=2)
    asyncio.run_coroutine_threadsafe(eng.start(), loop).result(120)
    eng.loop = loop  # type: ignore[attr-defined]
    yield eng
    asyncio.run_coroutine_threadsafe(eng.close(), loop).result(120)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)


def generate(engine, params: SamplingParams, prompt: str | None = None,
             messages: list[dict[str, str]] = CHAT) -> Out:
    return asyncio.run_coroutine_threadsafe(_run(engine, params, prompt, messages),
                                            engine.loop).result(120)


def token_ids(engine, text: str) -> list[int]:
    return engine.base.llama.tokenize(text.encode(), add_bos=False, special=True)


def chain(engine, **fields) -> list[str]:
    """The names of the samplers in the chain a request with `fields` gets."""
    import llama_cpp

    scheduler = engine._scheduler
    request = Request(**{"prompt": [1, 2, 3], "max_tokens": 8, "temperature": 0.0, "top_p": 1.0,
                         "seed": None, "grammar": None, "top_logprobs": None,
                         "ignore_eos": False, "emit": lambda _: None, **fields})
    sampler = scheduler._sampler(request)
    try:
        return [llama_cpp.llama_sampler_name(llama_cpp.llama_sampler_chain_get(sampler, i))
                .decode() for i in range(llama_cpp.llama_sampler_chain_n(sampler))]
    finally:
        llama_cpp.llama_sampler_free(sampler)


def test_fields_at_their_defaults_keep_the_chain_a_request_always_had(engine):
    assert chain(engine) == ["greedy"]
    assert chain(engine, temperature=0.7, top_p=0.9) == ["top-p", "temp", "dist"]
    # vLLM's "off" values are off.
    assert chain(engine, temperature=0.7, top_p=0.9, top_k=0, min_p=0.0,
                 repetition_penalty=1.0) == [
        "top-p", "temp", "dist"]


def test_every_field_adds_llama_cpps_sampler_in_llama_cpps_order(engine):
    assert chain(engine, temperature=0.7, top_p=0.9, logit_bias={5: 1.0}, repetition_penalty=1.2,
                 presence_penalty=0.5, top_k=40, min_p=0.05, min_tokens=2) == [
        "logit-bias",  # min_tokens holds back the end of generation
        "logit-bias", "penalties", "penalties", "top-k", "top-p", "min-p", "temp", "dist"]
    # Greedy ignores the truncations (as vLLM does) but not the biases and penalties.
    assert chain(engine, logit_bias={5: 1.0}, frequency_penalty=1.0, top_k=40, min_p=0.5) == [
        "logit-bias", "penalties", "greedy"]


def test_logit_bias_changes_greedy_output(engine):
    plain = generate(engine, GREEDY)
    first = token_ids(engine, plain.text)[0]
    banned = generate(engine, dataclasses.replace(GREEDY, logit_bias={first: -100.0}))
    assert token_ids(engine, banned.text)[0] != first
    forced = generate(engine, dataclasses.replace(GREEDY, max_tokens=5, logit_bias={42: 100.0}))
    assert forced.tokens == 5
    assert forced.text == engine.base.llama.detokenize([42] * 5).decode()


@pytest.mark.parametrize(("field", "prompt"), [
    ("frequency_penalty", "fever fever fever fever"),
    ("presence_penalty", "the the the"),
    ("repetition_penalty", None),
])
def test_penalties_change_a_repetitive_greedy_continuation(engine, field, prompt):
    value = 2.0
    plain = generate(engine, dataclasses.replace(GREEDY, max_tokens=30), prompt)
    penalised = generate(engine, dataclasses.replace(GREEDY, max_tokens=30, **{field: value}),
                         prompt)
    assert penalised.text != plain.text
    if field != "repetition_penalty":  # output only: repeats within the output fall
        def repeats(text: str) -> int:
            ids = token_ids(engine, text)
            return len(ids) - len(set(ids))
        assert repeats(penalised.text) < repeats(plain.text)


@pytest.mark.parametrize("fields", [{"top_k": 1}, {"min_p": 1.0}])
def test_top_k_1_and_min_p_1_are_greedy_at_temperature_1(engine, fields):
    greedy = generate(engine, GREEDY)
    for seed in (1, 2, 3):
        sampled = generate(engine, dataclasses.replace(GREEDY, temperature=1.0, seed=seed,
                                                       **fields))
        assert sampled.text == greedy.text
    # And without them, temperature 1 does sample something else for some seed.
    assert any(generate(engine, dataclasses.replace(GREEDY, temperature=1.0, seed=s)).text
               != greedy.text for s in (1, 2, 3))


def test_min_tokens_generates_past_an_early_end_then_lets_it_end(engine):
    plain = generate(engine, GREEDY)
    assert plain.finish == "stop" and plain.tokens < 50
    longer = generate(engine, dataclasses.replace(GREEDY, max_tokens=200,
                                                  min_tokens=plain.tokens + 10))
    assert longer.tokens >= plain.tokens + 10
    assert longer.text.startswith(plain.text)
    assert longer.finish == "stop", "once min_tokens are out, end of generation is allowed again"
    # Stop strings count only after min_tokens, as in vLLM.
    word = plain.text.split()[1]
    cut = generate(engine, dataclasses.replace(GREEDY, stop=[word]))
    kept = generate(engine, dataclasses.replace(GREEDY, stop=[word], min_tokens=plain.tokens))
    assert len(cut.text) < len(kept.text) and kept.text.startswith(plain.text)


def test_stop_token_ids_end_the_choice_and_min_tokens_holds_them_back(engine):
    plain = generate(engine, GREEDY)
    ids = token_ids(engine, plain.text)
    stop = ids[3]
    assert stop not in ids[:3]
    stopped = generate(engine, dataclasses.replace(GREEDY, stop_token_ids=[stop]))
    assert stopped.finish == "stop"
    assert token_ids(engine, stopped.text) == ids[:3] and stopped.tokens == 3
    held = generate(engine, dataclasses.replace(GREEDY, stop_token_ids=[stop], min_tokens=5))
    assert held.tokens >= 5 and stop not in token_ids(engine, held.text)[:5]


@pytest.mark.parametrize(("fields", "param"), [
    ({"logit_bias": {1024: 1.0}}, "logit_bias"),
    ({"logit_bias": {5: 1.0, 10**9: 1.0}}, "logit_bias"),
    ({"stop_token_ids": [3, 2**31 - 1]}, "stop_token_ids"),
    ({"min_tokens": 3, "json_object": True}, "min_tokens"),
])
def test_what_the_engine_cannot_honour_is_refused_by_name(engine, fields, param):
    with pytest.raises(EngineError) as caught:
        generate(engine, dataclasses.replace(GREEDY, **fields))
    assert caught.value.param == param and caught.value.status == 400


def test_penalties_and_min_tokens_with_drafting_match_plain_decoding(engine, tiny_model,
                                                                    tmp_path):
    """Prompt lookup drafts for greedy requests; the chain (penalties that count each accepted
    token, min_tokens that is lifted mid-choice) must see what plain decoding sees. A second turn
    that repeats the question makes the model repeat its answer, which lookup can draft."""
    answer = generate(engine, GREEDY).text
    again = [*CHAT, {"role": "assistant", "content": answer}, *CHAT]
    cases = [dataclasses.replace(GREEDY, frequency_penalty=0.3),
             dataclasses.replace(GREEDY, repetition_penalty=1.1),
             dataclasses.replace(GREEDY, max_tokens=120, min_tokens=45, presence_penalty=0.1)]
    plain = [generate(engine, p, messages=again) for p in cases]

    async def drafted() -> tuple[list[Out], dict[str, int]]:
        eng = _engine(tiny_model, tmp_path, speculative=SpeculativeSettings(mode="ngram"))
        await eng.start()
        try:
            return [await _run(eng, p, messages=again) for p in cases], eng.stats()
        finally:
            await eng.close()

    outs, stats = asyncio.run(drafted())
    assert outs == plain
    assert stats["spec_decode_num_accepted_tokens"] > 0


def test_an_openai_upstream_gets_each_field_under_vllms_name_when_it_does_anything():
    from clinicloop.backends.openai_upstream import OpenAIUpstreamEngine

    upstream = OpenAIUpstreamEngine(EngineSettings(kind="openai",
                                                   upstream_url="http://127.0.0.1:9/v1"))
    fields = {"presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.2,
              "logit_bias": {7: -100.0}, "top_k": 5, "min_p": 0.1, "min_tokens": 3,
              "stop_token_ids": [2]}
    body = upstream._sampling(SamplingParams(**fields), None)
    assert {name: body[name] for name in fields} == fields
    assert not set(fields) & set(upstream._sampling(SamplingParams(), None))
