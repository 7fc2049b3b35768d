"""The in-process engine's decode loop on the real tiny model: concurrent sequences, prefix reuse
and speculative decoding (prompt lookup, a draft model) change no greedy output, and each does
what it claims (sequences really run together, a later turn really skips its cached prefix,
drafts really get accepted)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from clinicloop.backends.base import Delta, SamplingParams
from clinicloop.backends.drafting import common_prefix, lookup_draft
from clinicloop.backends.llamacpp import LlamaCppEngine
from clinicloop.config import EngineSettings, SpeculativeSettings
from clinicloop.model.corpus import load_corpus
from clinicloop.model.tiny_train import build_tiny
from tests.conftest import until

GREEDY = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)


def test_lookup_draft_proposes_what_followed_the_last_ngram():
    assert lookup_draft([1, 2, 3, 4, 9, 1, 2, 3], ngram=3, max_draft=3) == [4, 9, 1]
    assert lookup_draft([1, 2, 3, 4, 9, 1, 2, 3], ngram=3, max_draft=1) == [4]
    assert lookup_draft([5, 6, 7, 8], ngram=2, max_draft=4) == []  # never seen before
    # The latest earlier occurrence wins, and a draft never runs past the present.
    assert lookup_draft([1, 2, 7, 1, 2, 8, 1, 2], ngram=2, max_draft=5) == [8, 1, 2]
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2


def prompts() -> list[list[dict[str, str]]]:
    """Corpus consultations, some continued for a second turn that repeats the first question:
    the tiny model then tends to repeat its earlier answer, which drafting can copy."""
    dialogues = [d for d in load_corpus() if len(d["messages"]) >= 2][:40:5]
    out = []
    for d in dialogues:
        first = [m for m in d["messages"] if m["role"] != "assistant"][:2]
        out.append(first)
        user = next(m for m in d["messages"] if m["role"] == "user")
        answer = next(m for m in d["messages"] if m["role"] == "assistant")
        out.append([*first, answer, {"role": "user", "content": user["content"]}])
    return out


async def _run(engine: LlamaCppEngine, messages, params=GREEDY) -> tuple[str, int]:
    parts, tokens = [], 0
    async for event in engine.chat(messages, params, {}):
        if isinstance(event, Delta):
            parts.append(event.content)
            tokens += event.tokens
    return "".join(parts), tokens


def _prompt_tokens(engine: LlamaCppEngine, messages) -> list[int]:
    """The tokens the engine feeds for `messages` (the chat template, then the tokenizer)."""
    return engine._prepare(engine.base.template.render(messages), GREEDY)[0]


def _engine(tiny_model, tmp_path, **settings) -> LlamaCppEngine:
    return LlamaCppEngine(EngineSettings(model_path=tiny_model.gguf_q8_0, **settings), tmp_path)


def generate_all(tiny_model, tmp_path, *, concurrent: bool, **settings):
    async def main():
        engine = _engine(tiny_model, tmp_path, **settings)
        await engine.start()
        try:
            if concurrent:
                texts = await asyncio.gather(*(_run(engine, p) for p in prompts()))
            else:
                texts = [await _run(engine, p) for p in prompts()]
            return [t for t, _ in texts], engine.stats()
        finally:
            await engine.close()

    return asyncio.run(main())


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """Each prompt alone on a fresh engine: one sequence, no cache, no drafting."""
    async def main():
        texts = []
        for messages in prompts():
            engine = _engine(tiny_model, tmp_path_factory.mktemp("ref"), n_parallel=1,
                             prefix_cache_slots=0)
            await engine.start()
            try:
                texts.append((await _run(engine, messages))[0])
            finally:
                await engine.close()
        return texts

    return asyncio.run(main())


@pytest.mark.parametrize("min_batched_seqs", [1, None], ids=["together", "apart-below-5"])
def test_batched_and_reused_decoding_change_no_greedy_output(tiny_model, tmp_path, reference,
                                                            min_batched_seqs):
    """Four sequences in one decode of several KV streams (`min_batched_seqs` 1), or each in
    its own (the CPU default below 5): the same text as each alone."""
    texts, stats = generate_all(tiny_model, tmp_path, concurrent=True, n_parallel=4,
                                min_batched_seqs=min_batched_seqs)
    assert texts == reference
    assert stats["prefix_cache_hits"] > 0  # shared system prompts and first turns
    texts, _ = generate_all(tiny_model, tmp_path, concurrent=False, n_parallel=4,
                            min_batched_seqs=min_batched_seqs)
    assert texts == reference


def test_without_prefix_caching_every_prompt_is_computed_whole(tiny_model, tmp_path,
                                                              reference):
    texts, stats = generate_all(tiny_model, tmp_path, concurrent=False, n_parallel=4,
                                enable_prefix_caching=False)
    assert texts == reference
    assert stats["prefix_cache_queries"] > 0 and stats["prefix_cache_hits"] == 0


def test_the_argmax_of_plain_greedy_picks_what_llama_cpps_greedy_sampler_picks(
        tiny_model, tmp_path, reference):
    """Plain greedy requests take the argmax of all rows at once; a logit bias of 0 changes no
    logit but sends the request through llama.cpp's sampler chain."""
    async def main():
        engine = _engine(tiny_model, tmp_path, n_parallel=4, min_batched_seqs=1)
        await engine.start()
        try:
            chained = dataclasses.replace(GREEDY, logit_bias={0: 0.0})
            return await asyncio.gather(*(_run(engine, p, chained) for p in prompts()))
        finally:
            await engine.close()

    assert [text for text, _ in asyncio.run(main())] == reference


def test_drafting_changes_no_greedy_output_and_gets_drafts_accepted(tiny_model, tmp_path,
                                                                    reference):
    ngram = SpeculativeSettings(mode="ngram")
    for concurrent in (False, True):
        texts, stats = generate_all(tiny_model, tmp_path, concurrent=concurrent, n_parallel=4,
                                    speculative=ngram, min_batched_seqs=1)
        assert texts == reference
        assert stats["spec_decode_num_drafts"] > 0
        assert 0 < stats["spec_decode_num_accepted_tokens"] <= stats[
            "spec_decode_num_draft_tokens"]


def test_a_later_turn_prefills_only_what_is_new(tiny_model, tmp_path):
    async def main():
        engine = _engine(tiny_model, tmp_path, n_parallel=2, prefix_cache_slots=2)
        await engine.start()
        try:
            turn1 = [{"role": "user", "content": "I have had a sore throat since yesterday."}]
            answer, _ = await _run(engine, turn1)
            before = engine.stats()["prefix_cache_hits"]
            # Another conversation in between must not evict this one's cache.
            await _run(engine, [{"role": "user", "content": "My knee hurts after running."}])
            turn2 = [*turn1, {"role": "assistant", "content": answer},
                     {"role": "user", "content": "Should I see a doctor?"}]
            await _run(engine, turn2)
            reused = engine.stats()["prefix_cache_hits"] - before
            prompt1, prompt2 = _prompt_tokens(engine, turn1), _prompt_tokens(engine, turn2)
            return reused, common_prefix(prompt1, prompt2), len(prompt1)
        finally:
            await engine.close()

    reused, shared, prompt1 = asyncio.run(main())
    # Everything turn 2 shares with turn 1's prompt came from the cache (the template renders
    # the generation prompt and the same turn in history a little differently at the end).
    assert reused >= shared > 0.7 * prompt1


def test_sequences_decode_together_and_a_cancelled_one_frees_its_slot(tiny_model, tmp_path):
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    timeline: list[tuple[str, int]] = []

    async def watched(k: int) -> int:
        tokens = 0
        async for event in engine.chat(prompts()[k], long, {}):
            if isinstance(event, Delta) and event.tokens:
                if not tokens:
                    timeline.append(("first", k))
                tokens += event.tokens
        timeline.append(("done", k))
        return tokens

    async def main():
        await engine.start()
        try:
            counts = await asyncio.gather(*(watched(k) for k in range(4)))
            # Cancel a stream mid-way: its slot must serve the next request.
            stream = engine.chat(prompts()[1], long, {})
            await anext(stream)
            await stream.aclose()
            _, n = await asyncio.wait_for(_run(engine, prompts()[2]), 30)
            return counts, n
        finally:
            await engine.close()

    engine = _engine(tiny_model, tmp_path, n_parallel=4)
    counts, n = asyncio.run(main())
    assert counts == [200] * 4 and n == GREEDY.max_tokens
    # All four had streamed before any finished: they were decoded together, not in turn.
    assert [kind for kind, _ in timeline[:4]] == ["first"] * 4


def _busy_ids(engine: LlamaCppEngine) -> list[int]:
    return [slot.seq_id for slot in engine._scheduler.slots if slot.busy is not None]


def test_running_sequences_take_the_lowest_free_ids(tiny_model, tmp_path):
    """llama.cpp puts only consecutive sequence ids into one micro-batch: with slots 0 and 1
    freed while 2 and 3 decode, the next two requests take 0 and 1, not the empty slots above
    the running ones."""
    long = SamplingParams(max_tokens=1800, temperature=0.0, ignore_eos=True)

    async def started(k: int):
        stream = engine.chat(prompts()[k], long, {})
        await anext(stream)
        return stream

    async def main():
        await engine.start()
        streams = []
        try:
            for k in range(4):
                streams.append(await started(k))
            first = _busy_ids(engine)
            for stream in streams[:2]:
                await stream.aclose()
            await until(lambda: len(_busy_ids(engine)) == 2, 30, "two slots freed")
            freed = _busy_ids(engine)
            for k in (4, 5):
                streams.append(await started(k))
            return first, freed, _busy_ids(engine)
        finally:
            for stream in streams:
                await stream.aclose()
            await engine.close()

    engine = _engine(tiny_model, tmp_path, n_parallel=4, prefix_cache_slots=4,
                     min_batched_seqs=1)
    assert asyncio.run(main()) == ([0, 1, 2, 3], [2, 3], [0, 1, 2, 3])


def test_a_conversation_cached_where_others_then_ran_is_reused_and_changes_no_output(
        tiny_model, tmp_path, reference):
    """While a sequence decodes in slot 0, turn 1 of a conversation runs in slot 1, then
    another conversation takes slot 1 (first fit): turn 1's cache is copied aside first, and
    turn 2 copies it back, prefills only what is new, and says what it says alone."""
    long = SamplingParams(max_tokens=1800, temperature=0.0, ignore_eos=True)
    turn1, turn2 = prompts()[0], prompts()[1]  # turn 2 continues turn 1 (`prompts`)

    async def main():
        await engine.start()
        background = engine.chat(prompts()[4], long, {})
        try:
            await anext(background)
            first, _ = await _run(engine, turn1)
            await _run(engine, prompts()[2])  # another conversation, in the same slot
            before = engine.stats()["prefix_cache_hits"]
            second, _ = await _run(engine, turn2)
            reused = engine.stats()["prefix_cache_hits"] - before
            shared = common_prefix(_prompt_tokens(engine, turn1), _prompt_tokens(engine, turn2))
            return first, second, reused, shared, _busy_ids(engine)
        finally:
            await background.aclose()
            await engine.close()

    engine = _engine(tiny_model, tmp_path, n_parallel=2, prefix_cache_slots=4,
                     min_batched_seqs=1)
    first, second, reused, shared, busy = asyncio.run(main())
    assert busy == [0]  # the background sequence decoded throughout
    assert (first, second) == (reference[0], reference[1])
    assert reused >= shared > 20


@pytest.mark.parametrize("settings", [{"min_batched_seqs": 1}, {"min_batched_seqs": None},
                                      {"speculative": SpeculativeSettings(mode="ngram")}],
                         ids=["together", "apart-below-5", "prompt-lookup"])
def test_streams_closed_mid_decode_change_no_other_greedy_output(tiny_model, tmp_path,
                                                                 reference, settings):
    """Every third stream is closed by its client after its first tokens, while the others decode
    beside it (cancelled in the middle of steps, its slot reused at once): every other stream gets
    the text it gets alone, and the engine still serves a request afterwards."""
    async def close_early(messages) -> None:
        stream = engine.chat(messages, GREEDY, {})
        async for event in stream:
            if isinstance(event, Delta) and event.tokens:
                break
        await stream.aclose()

    async def main():
        await engine.start()
        try:
            texts = await asyncio.gather(*(close_early(p) if k % 3 == 1 else _run(engine, p)
                                           for k, p in enumerate(prompts())))
            after = await asyncio.wait_for(_run(engine, prompts()[0]), 30)
            return texts, after
        finally:
            await engine.close()

    engine = _engine(tiny_model, tmp_path, n_parallel=4, **settings)
    texts, after = asyncio.run(main())
    kept = [(k, got[0], want) for k, (got, want) in enumerate(zip(texts, reference, strict=True))
            if k % 3 != 1]
    assert [(k, got) for k, got, _ in kept] == [(k, want) for k, _, want in kept]
    assert after[0] == reference[0]


def test_a_stop_string_that_arrives_with_the_end_of_the_sequence_ends_the_stream(tiny_model,
                                                                                 tmp_path):
    """The event loop is busy while the decode thread finishes the sequence, so the tokens with
    the stop string and the sequence's end are taken in one batch: the stream still ends at once
    (it once waited for an end it had already taken and dropped, until the request deadline)."""
    async def main():
        engine = _engine(tiny_model, tmp_path)
        await engine.start()
        try:
            text, _ = await _run(engine, prompts()[0])
            # A word first seen in the second half, so the stop comes after the loop's nap.
            word = next(w for w in reversed(text.split()) if text.index(w) > len(text) // 2)
            stream = engine.chat(prompts()[0], dataclasses.replace(GREEDY, stop=[word]), {})
            events = [await anext(stream)]
            time.sleep(1.0)  # blocks the loop: the decode thread emits the rest and the end
            events += await asyncio.wait_for(_all(stream), 10)
            return text, word, events
        finally:
            await engine.close()

    async def _all(stream) -> list:
        return [event async for event in stream]

    text, word, events = asyncio.run(main())
    deltas = [e for e in events if isinstance(e, Delta)]
    assert "".join(d.content for d in deltas) == text[:text.index(word)]
    assert deltas[-1].finish_reason == "stop"


@pytest.fixture(scope="module")
def draft_model(tiny_model):
    """The tiny model trained from another seed: the same vocabulary (the tokenizer depends on
    the corpus only), other weights, so its drafts are often but not always right."""
    return build_tiny("tiny", seed=1, out_root=tiny_model.root.parent, progress=False)


def test_a_draft_model_changes_no_greedy_output(tiny_model, draft_model, tmp_path, reference):
    spec = SpeculativeSettings(mode="draft_model", draft_model=draft_model.gguf_q8_0)
    for concurrent in (False, True):
        texts, stats = generate_all(tiny_model, tmp_path, concurrent=concurrent, n_parallel=4,
                                    speculative=spec)
        assert texts == reference
        drafted, accepted = (stats["spec_decode_num_draft_tokens"],
                             stats["spec_decode_num_accepted_tokens"])
        # Another seed's model agrees often, but not always: both paths ran.
        assert 0 < accepted < drafted


def _start_then_close(engine: LlamaCppEngine) -> None:
    async def main():
        try:
            await engine.start()
        finally:
            await engine.close()

    asyncio.run(main())


def test_draft_models_the_engine_cannot_use_are_refused(tiny_model, bench, tmp_path):
    eagle = _engine(tiny_model, tmp_path, speculative=SpeculativeSettings(
        mode="eagle3", draft_model=tiny_model.hf_dir))
    with pytest.raises(ValueError, match="vLLM upstream"):
        _start_then_close(eagle)
    # A draft's tokens are checked by id: another vocabulary would be silently wrong.
    other_vocab = _engine(tiny_model, tmp_path, speculative=SpeculativeSettings(
        mode="draft_model", draft_model=bench.gguf_q8_0))
    with pytest.raises(ValueError, match="vocabulary"):
        _start_then_close(other_vocab)


def _submit_raw(engine: LlamaCppEngine, **fields) -> list:
    """Submit one request straight to the scheduler; what it emits, up to DONE (deadline 30 s)."""
    import queue

    from clinicloop.backends.batching import DONE, Request

    events: queue.SimpleQueue = queue.SimpleQueue()
    request = Request(**{"prompt": [1], "max_tokens": 4, "temperature": 0.0, "top_p": 1.0,
                         "seed": None, "grammar": None, "top_logprobs": None,
                         "ignore_eos": True, "emit": events.put, **fields})
    assert engine._scheduler is not None
    engine._scheduler.submit(request)
    out = []
    while (item := events.get(timeout=30)) is not DONE:
        out.append(item)
    return out


def test_a_request_with_nothing_to_feed_or_a_refused_grammar_ends_in_error(tiny_model,
                                                                           tmp_path):
    """Neither may hold a slot (the loop would spin over a sequence with no tokens) nor reach the
    sampler with a NULL grammar (the decode thread would crash the process)."""
    async def main():
        engine = _engine(tiny_model, tmp_path, n_parallel=1)
        await engine.start()
        try:
            empty = await asyncio.to_thread(_submit_raw, engine, prompt=[])
            # A left-recursive grammar: llama.cpp's grammar sampler for it is NULL.
            refused = await asyncio.to_thread(_submit_raw, engine, grammar="root ::= root")
            scheduler = engine._scheduler
            assert scheduler is not None
            free = not scheduler._running and all(s.busy is None for s in scheduler.slots)
            # The one slot serves the next request.
            _, n = await asyncio.wait_for(_run(engine, prompts()[0]), 30)
            return empty, refused, free, n
        finally:
            await engine.close()

    empty, refused, free, n = asyncio.run(main())
    assert empty == [("finish", "error", None)]
    assert refused == [("finish", "error", None)]
    assert free and n == GREEDY.max_tokens


def test_an_empty_prompt_is_400_and_holds_no_slot(server_factory):
    """The tiny model adds no BOS: an empty completion prompt has no tokens at all."""
    import httpx

    server = server_factory({"CLINICLOOP_ENGINE__N_PARALLEL": "1"})
    r = httpx.post(server.v1 + "/completions", json={"prompt": "", "max_tokens": 4}, timeout=30)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["message"] == "The decoder prompt cannot be empty" and error["param"] == "prompt"
    # Its one slot is free at once (no deadline to wait for).
    ok = httpx.post(server.v1 + "/completions", json={"prompt": "Hi", "max_tokens": 4},
                    timeout=30)
    assert ok.status_code == 200
