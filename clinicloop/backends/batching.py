"""Continuous batching over one llama.cpp context: the in-process engine's decode loop.

One worker thread owns the context. Requests (one per sequence) are admitted between decode steps
into free sequence slots; every step puts one token of each decoding sequence (plus its draft
tokens, when drafting) and a budget of prompt tokens of the sequences still prefilling into one
`llama_decode`, so several sequences advance per step and none waits for another to finish.

Each slot is a KV-cache sequence with a stream of cells of its own (`kv_unified` off): a sequence
attends only to its own cells, in position order, so what it generates does not depend on what
else is cached or decoded with it (greedy output is the same alone, batched, or after a reuse).

Placement: llama.cpp decodes in one micro-batch only sequences whose ids follow each other
(`split_equal`, sequential, over per-sequence streams), and reuses the previous step's graph only
when a micro-batch is made of the same sequences as before. So a new request takes the lowest free
id (first fit): the running sequences fill the ids from 0 up, the hole a finished one leaves is
the next one filled, and a step is one micro-batch for the decoding sequences (plus one for each
prompt being prefilled), reused by the next step while the same sequences run. (Choosing instead
next to running ones left two blocks that never merged: 2.6 micro-batches a step at 16 at once,
against 1.5 with first fit.) With nothing running, any slot will do.

Prefix reuse: a slot keeps the tokens its KV cache holds after its request ends. A new request
whose prompt continues an idle slot's cache for most of that slot's last prompt (a later turn of
the same conversation) reuses it and prefills only the rest: in place when that slot is the one
placement chose, else copied into it (`llama_memory_seq_cp` copies a whole stream: on the bench
model 0.3 ms, half a one-token step). A busy slot sharing a longer prefix (the same system
prompt) is copied likewise. The conversation cached in the slot taken is first copied to the
least recently used other idle slot, if that one was used less recently, so the cache keeps the
conversations used last wherever they ran. There are more slots than sequences decoded at once
(`n_parallel`), so that many idle conversations stay cached.

Speculative decoding (greedy requests without a grammar or logprobs): a drafter (`drafting.py`:
prompt lookup, or a small draft model) proposes the next few tokens of every decoding sequence;
one decode checks them all, the longest prefix that greedy decoding would have produced is
accepted, plus the model's own next token, and the rejected positions are removed from the KV
cache. Drafts start short and double while wholly accepted; a sequence whose draft was wholly
rejected does not draft for the next few steps, so text the drafter cannot predict costs little.
Greedy with logit biases and penalties drafts too: each accepted token is accepted by the chain.

Sampling: each sequence has a chain of llama.cpp's samplers (`_sampler`) holding only those its
fields turn on, so a request at the defaults gets a bare greedy or top-p/temperature/seed chain.
"""

from __future__ import annotations

import codecs
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clinicloop.backends.base import TokenLogprob, TopLogprob
from clinicloop.backends.drafting import Drafter, DraftWant, common_prefix

log = logging.getLogger(__name__)

#: Share of an idle slot's last prompt a new prompt must continue for the slot to be reused.
SIMILARITY = 0.5
#: Steps a sequence does not draft after a draft it wholly rejected.
DRAFT_PAUSE = 4
#: The last item a request's `emit` receives.
DONE = object()


@dataclass
class Request:
    """One sequence to generate, as the engine submits it, and its state while it runs."""

    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    grammar: str | None  # GBNF
    top_logprobs: int | None
    ignore_eos: bool
    #: Called from the worker thread with ("token", text, logprob), then ("finish", reason,
    #: None), then `DONE`.
    emit: Callable[[Any], None]
    # What else shapes the logits (`SamplingParams`' fields); the defaults leave them alone.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    top_k: int = 0
    min_p: float = 0.0
    min_tokens: int = 0
    stop_token_ids: frozenset[int] = frozenset()
    cancel: threading.Event = field(default_factory=threading.Event)
    generated: int = 0
    # -- worker state
    slot: Slot | None = None
    sampler: Any = None
    #: Chain index of the sampler that holds back the end of the choice until `min_tokens`.
    min_tokens_at: int | None = None
    #: Its chain is greedy alone: the next token is the logits' argmax, taken for every such
    #: sequence of a step at once rather than through the chain.
    argmax: bool = False
    pending: list[int] = field(default_factory=list)  # tokens still to feed the model
    draft_pause: int = 0  # steps left without drafting
    draft_len: int = 2  # how many tokens to draft next: grows while drafts are accepted
    decoder: Any = None

    @property
    def drafting_allowed(self) -> bool:
        # Before `min_tokens` the chain changes after each token: a draft checks one chain only.
        return (self.temperature <= 0 and self.grammar is None and self.top_logprobs is None
                and self.min_tokens_at is None)


@dataclass(eq=False)
class Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # what its KV cells hold, in order
    prompt_len: int = 0  # the prompt of the last request it served
    busy: Request | None = None
    last_used: float = 0.0


@dataclass
class SpecStats:
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0


class BatchScheduler:
    """Owns `ctx` (a llama.cpp context built with `n_slots` sequences) and its worker thread."""

    def __init__(self, llama: Any, ctx: Any, *, n_parallel: int, n_slots: int, n_batch: int,
                 n_ctx_seq: int, drafter: Drafter | None = None, draft_max: int = 8,
                 prefix_caching: bool = True, min_batched: int = 1) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self.llama = llama
        self.ctx = ctx
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.vocab = llama_cpp.llama_model_get_vocab(llama.model)
        self.n_vocab = llama.n_vocab()
        self.n_parallel = n_parallel
        self.n_batch = n_batch
        self.n_ctx_seq = n_ctx_seq
        self.drafter = drafter
        self.draft_max = draft_max
        self.prefix_caching = prefix_caching
        self.min_batched = min_batched
        self.slots = [Slot(i) for i in range(n_slots)]
        self._eog = frozenset(t for t in range(self.n_vocab)
                              if llama_cpp.llama_vocab_is_eog(self.vocab, t))
        self._pieces: list[bytes | None] = [None] * self.n_vocab  # detokenized once each
        self.spec = SpecStats()
        # Prefix cache lookups as vLLM counts them, in tokens: every placed request's prompt is
        # queried; the hits are the tokens not prefilled thanks to a cached prefix.
        self.prefix_queries = 0
        self.prefix_hits = 0
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._inbox: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._waiting: list[Request] = []
        self._running: list[Request] = []
        self._wake = threading.Event()
        self._stopped = False
        self.dead = False
        self._thread = threading.Thread(target=self._loop, name="llamacpp-batch", daemon=True)
        self._thread.start()

    # -- called from other threads ------------------------------------------------------------

    def submit(self, seq: Request) -> None:
        if self.dead:
            self._finish(seq, "error")
            return
        self._inbox.put(seq)
        self._wake.set()

    def wake(self) -> None:
        """A sequence was cancelled: let the worker notice without waiting for a step."""
        self._wake.set()

    def kv_cells(self) -> tuple[int, int]:
        """(cells held by running requests, cells of all slots), as vLLM counts KV usage: the
        cells of a busy slot (its reused prefix included) are in use; an idle slot's cached
        prefix is free, since the next request that needs the slot drops it (vLLM's cached
        blocks with no running request sit in its free queue likewise)."""
        used = sum(len(slot.tokens) for slot in self.slots if slot.busy is not None)
        return used, self.n_ctx_seq * len(self.slots)

    def close(self) -> None:
        self._stopped = True
        self._inbox.put(None)
        self._wake.set()
        self._thread.join()
        self._lib.llama_batch_free(self._batch)

    # -- the worker ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopped:
            self._drain_inbox()
            self._admit()
            if not self._running:
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                self._step()
            except Exception:
                log.exception("llama.cpp batch decode failed")
                self.dead = True
                for seq in self._running + self._waiting:
                    self._finish(seq, "error")
                self._running, self._waiting = [], []
                return
        for seq in self._running + self._waiting:
            self._finish(seq, "stop")

    def _drain_inbox(self) -> None:
        while True:
            try:
                seq = self._inbox.get_nowait()
            except queue.Empty:
                return
            if seq is not None:
                self._waiting.append(seq)

    def _admit(self) -> None:
        for seq in [s for s in self._waiting if s.cancel.is_set()]:
            self._waiting.remove(seq)
            self._finish(seq, "stop")
        while self._waiting and len(self._running) < self.n_parallel:
            seq = self._waiting.pop(0)
            seq.sampler = self._sampler(seq)
            if seq.sampler is None:  # llama.cpp refused its grammar: never sample without it
                self._finish(seq, "error")
                continue
            self._place(seq)
            seq.decoder = codecs.getincrementaldecoder("utf-8")("replace")
            self._running.append(seq)

    def _place(self, seq: Request) -> None:
        """Give `seq` the slot placement chooses, holding as much of its prompt in its KV cache as
        the cached slots allow (module docstring: "Placement", "Prefix reuse")."""
        lib = self._lib
        # The last prompt token is always fed: its logits start it.
        usable = max(len(seq.prompt) - 1, 0)

        # Without prefix caching nothing is shared: every prompt is computed whole.
        shared = {s.seq_id: min(common_prefix(s.tokens, seq.prompt), usable)
                  if self.prefix_caching else 0 for s in self.slots}

        def reuse(slot: Slot) -> int:
            return shared[slot.seq_id]

        idle = [s for s in self.slots if s.busy is None]
        # First fit: the lowest free id, so the running sequences fill ids from 0 up and a
        # hole a finished one leaves is the next taken. With nothing running any slot will do.
        running = len(idle) < len(self.slots)
        fit = idle[:1] if running else idle
        # A cache is a hit when the prompt continues most of the last prompt it served (a later
        # turn, a retry: generated tokens seldom match how the reply is re-tokenized). A small
        # overlap (a shared opening) is no hit: the slot is then the fitting empty one, else
        # the least recently used, and the conversation it holds is copied aside first.
        hits = [s for s in idle if s.tokens and reuse(s) >= SIMILARITY * s.prompt_len]
        best = max(hits, key=reuse, default=None)
        if best in fit:
            slot = best
        else:
            slot = min(fit, key=lambda s: (bool(s.tokens), s.last_used))
            if self.prefix_caching:
                self._move_out(slot, spare=[s for s in idle if s not in fit and s not in hits])
        kept = reuse(slot)
        # A longer prefix elsewhere is copied over: a hit away from the running sequences, or
        # a busy slot's (the same system prompt). Each sequence has a stream of its own: a copy
        # is of the whole stream, then trimmed.
        donor = max([*hits, *(s for s in self.slots if s.busy is not None)], key=reuse,
                    default=None)
        if donor is not None and reuse(donor) > kept:
            kept = reuse(donor)
            lib.llama_memory_seq_cp(self.memory, donor.seq_id, slot.seq_id, -1, -1)
        lib.llama_memory_seq_rm(self.memory, slot.seq_id, kept, -1)
        slot.tokens = seq.prompt[:kept]
        slot.prompt_len = len(seq.prompt)
        slot.busy = seq
        seq.slot = slot
        seq.pending = seq.prompt[kept:]
        self.prefix_queries += len(seq.prompt)
        self.prefix_hits += kept

    def _move_out(self, slot: Slot, spare: list[Slot]) -> None:
        """Before `slot`'s cached conversation is overwritten, copy it to the spare slot that
        is empty or else least recently used, if that one was used less recently."""
        if not slot.tokens or not spare:
            return
        to = min(spare, key=lambda s: (bool(s.tokens), s.last_used))
        if to.tokens and to.last_used >= slot.last_used:
            return
        self._lib.llama_memory_seq_cp(self.memory, slot.seq_id, to.seq_id, -1, -1)
        to.tokens, to.prompt_len, to.last_used = slot.tokens, slot.prompt_len, slot.last_used

    def _sampler(self, seq: Request) -> Any:
        """The request's chain of llama.cpp's samplers, in the order llama.cpp's server chains
        them: grammar, logit biases, penalties, then greedy, or top-k, top-p, min-p, temperature
        and a seeded draw. A sampler at its default is left out, so a request with default fields
        gets the chain it always had. None when llama.cpp cannot compile the grammar (a NULL
        sampler in the chain would crash the process at the first sample)."""
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())

        def add(sampler: Any) -> None:
            lib.llama_sampler_chain_add(chain, sampler)

        if seq.grammar is not None:
            grammar = lib.llama_sampler_init_grammar(self.vocab, seq.grammar.encode(), b"root")
            if not grammar:
                lib.llama_sampler_free(chain)
                return None
            add(grammar)
        held = self._held_back(seq)
        if held:  # removed from the chain once `min_tokens` are out (`_emit_token`)
            seq.min_tokens_at = lib.llama_sampler_chain_n(chain)
            add(self._logit_bias(dict.fromkeys(held, -math.inf)))
        if seq.logit_bias:
            add(self._logit_bias(seq.logit_bias))
        if seq.repetition_penalty != 1.0:
            # vLLM's: on every token of the prompt and of the output. It applies once per token
            # however often it occurs, so each prompt token is counted once.
            prompt = list(dict.fromkeys(seq.prompt))
            repeat = lib.llama_sampler_init_penalties(
                self.n_vocab, len(prompt) + seq.max_tokens, seq.repetition_penalty, 0.0, 0.0)
            for token in prompt:
                lib.llama_sampler_accept(repeat, token)
            add(repeat)
        if seq.frequency_penalty or seq.presence_penalty:  # OpenAI's: on the output only
            add(lib.llama_sampler_init_penalties(self.n_vocab, seq.max_tokens, 1.0,
                                                 seq.frequency_penalty, seq.presence_penalty))
        if seq.temperature <= 0:
            seq.argmax = lib.llama_sampler_chain_n(chain) == 0
            add(lib.llama_sampler_init_greedy())
        else:
            if seq.top_k > 0:
                add(lib.llama_sampler_init_top_k(seq.top_k))
            add(lib.llama_sampler_init_top_p(seq.top_p, 1))
            if seq.min_p > 0:
                add(lib.llama_sampler_init_min_p(seq.min_p, 1))
            add(lib.llama_sampler_init_temp(seq.temperature))
            seed = lib.LLAMA_DEFAULT_SEED if seq.seed is None else seq.seed & 0xFFFFFFFF
            add(lib.llama_sampler_init_dist(seed))
        return chain

    def _held_back(self, seq: Request) -> set[int]:
        """The tokens that would end `seq`, which `min_tokens` holds back, as vLLM does: its stop
        token ids, and end-of-generation unless `ignore_eos`."""
        if seq.min_tokens <= 0:
            return set()
        return set(seq.stop_token_ids) | (set() if seq.ignore_eos else self._eog)

    def _piece(self, token: int) -> bytes:
        piece = self._pieces[token]
        if piece is None:
            piece = self._pieces[token] = self.llama.detokenize([token], special=True)
        return piece

    def _logit_bias(self, bias: dict[int, float]) -> Any:
        entries = (self._lib.llama_logit_bias * len(bias))(*bias.items())
        return self._lib.llama_sampler_init_logit_bias(self.n_vocab, len(bias), entries)

    def _step(self) -> None:
        """One decode over every running sequence; then sample, emit and retire."""
        for seq in [s for s in self._running if s.cancel.is_set()]:
            self._retire(seq, "stop")
        # A sequence with nothing to feed would never advance, and the loop would spin over it
        # while it holds a slot: it ends in an error instead (an empty prompt, for one).
        for seq in [s for s in self._running if not s.pending]:
            self._retire(seq, "error")
        feeds: list[_Feed] = []
        budget = self.n_batch
        decoding = [s for s in self._running if len(s.pending) == 1]
        drafts = self._drafts(decoding, budget - len(decoding))
        for seq in decoding:  # every decoding sequence advances each step: fair streaming
            draft = drafts.get(id(seq), [])
            feeds.append(_Feed(seq, seq.pending + draft, draft))
            budget -= 1 + len(draft)
        for seq in (s for s in self._running if len(s.pending) > 1):
            if budget <= 0:
                break
            feeds.append(_Feed(seq, seq.pending[:budget], []))
            budget -= len(feeds[-1].tokens)
        if not feeds:
            return
        # In order of sequence id: llama.cpp's micro-batches (`split_equal`, sequential) take a
        # run of consecutive ids in batch order, so any other order splits a step into more.
        feeds.sort(key=lambda f: f.seq.slot.seq_id if f.seq.slot is not None else -1)
        # Below `min_batched` sequences each decodes on its own (`engine.min_batched_seqs`).
        for group in [feeds] if len(feeds) >= self.min_batched else [[f] for f in feeds]:
            n_out = self._decode(group)
            best = None
            if any(f.seq.argmax and f.logits_at is not None for f in group):
                # One argmax over every output row (rows in batch order, as llama.h promises),
                # read before the next decode overwrites them.
                logits = np.ctypeslib.as_array(self._lib.llama_get_logits(self.ctx),
                                               shape=(n_out, self.n_vocab))
                best = logits.argmax(axis=1).tolist()
            for feed in group:
                seq, slot = feed.seq, feed.seq.slot
                assert slot is not None
                slot.tokens.extend(feed.tokens)
                seq.pending = seq.pending[len(feed.tokens) - len(feed.draft):]
                if feed.logits_at is not None:
                    self._sample(feed, best if seq.argmax else None)

    def _drafts(self, decoding: list[Request], room: int) -> dict[int, list[int]]:
        """Drafts (by `id` of the request) for the decoding sequences that draft this step, at
        most `room` tokens in all."""
        if self.drafter is None:
            return {}
        wants: list[tuple[Request, DraftWant]] = []
        for seq in decoding:
            if not seq.drafting_allowed:
                continue
            if seq.draft_pause:
                seq.draft_pause -= 1
                continue
            slot = seq.slot
            assert slot is not None
            n = min(seq.draft_len, self.draft_max, room, seq.max_tokens - seq.generated - 1,
                    self.n_ctx_seq - len(slot.tokens) - 2)
            if n > 0:
                wants.append((seq, DraftWant(slot.seq_id, slot.tokens + seq.pending, n, seq)))
                room -= n
        proposed = self.drafter.propose([want for _, want in wants]) if wants else []
        return {id(seq): draft for (seq, _), draft in zip(wants, proposed, strict=True)}

    def _decode(self, feeds: list[_Feed]) -> int:
        """Put every feed into one batch and decode it; the number of rows of logits."""
        lib, batch = self._lib, self._batch
        n = n_out = 0
        for feed in feeds:
            assert feed.seq.slot is not None
            pos0 = len(feed.seq.slot.tokens)
            completes = len(feed.tokens) - len(feed.draft) >= len(feed.seq.pending)
            first = len(feed.tokens) - 1 - len(feed.draft)
            feed.logits_at = n + first if completes else None
            feed.out_at = n_out
            seq_id = feed.seq.slot.seq_id
            for i, token in enumerate(feed.tokens):
                batch.token[n] = token
                batch.pos[n] = pos0 + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq_id
                batch.logits[n] = wanted = completes and i >= first
                n += 1
                n_out += wanted
        batch.n_tokens = n
        status = lib.llama_decode(self.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        return n_out

    def _sample(self, feed: _Feed, best: list[int] | None) -> None:
        """Sample after a decode (`best`: the argmax of every output row, for a sequence whose
        chain is greedy alone); with a draft, accept the prefix greedy decoding agrees with."""
        seq, slot = feed.seq, feed.seq.slot
        assert feed.logits_at is not None and slot is not None
        lib = self._lib
        out: list[tuple[int, int]] = []  # (token, its logits row)
        for i in range(len(feed.draft) + 1):
            row = feed.logits_at + i
            token = (best[feed.out_at + i] if best is not None
                     else lib.llama_sampler_sample(seq.sampler, self.ctx, row))
            out.append((token, row))
            if i == len(feed.draft) or token != feed.draft[i]:
                break
        if feed.draft:
            accepted = len(out) - 1
            seq.draft_pause = 0 if accepted else DRAFT_PAUSE
            seq.draft_len = 2 * len(feed.draft) if accepted == len(feed.draft) else accepted + 1
            self.spec.num_drafts += 1
            self.spec.num_draft_tokens += len(feed.draft)
            self.spec.num_accepted_tokens += accepted
            keep = len(slot.tokens) - len(feed.draft) + accepted
            if keep < len(slot.tokens):  # drop the rejected draft positions
                lib.llama_memory_seq_rm(self.memory, slot.seq_id, keep, -1)
                del slot.tokens[keep:]
        for token, row in out:
            if not self._emit_token(seq, token, row):
                return
        seq.pending = [out[-1][0]]

    def _emit_token(self, seq: Request, token: int, row: int) -> bool:
        """Emit one generated token; False when the sequence has ended (and is retired)."""
        lib = self._lib
        if seq.cancel.is_set():
            self._retire(seq, "stop")
            return False
        eog = token in self._eog
        if (eog and not seq.ignore_eos) or token in seq.stop_token_ids:
            self._retire(seq, "stop")
            return False
        seq.generated += 1
        if seq.min_tokens_at is not None and seq.generated >= seq.min_tokens:
            lib.llama_sampler_free(lib.llama_sampler_chain_remove(seq.sampler, seq.min_tokens_at))
            seq.min_tokens_at = None
        logprob = None if seq.top_logprobs is None else self._logprob(token, row,
                                                                     seq.top_logprobs)
        text = "" if eog else seq.decoder.decode(self._piece(token))
        seq.emit(("token", text, logprob))
        if seq.generated >= seq.max_tokens:
            self._retire(seq, "length")
            return False
        return True

    def _logprob(self, token: int, row: int, top: int) -> TokenLogprob:
        pointer = self._lib.llama_get_logits_ith(self.ctx, row)
        logits = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).astype(np.float64)
        logprobs = logits - np.logaddexp.reduce(logits)

        def entry(tid: int) -> TopLogprob:
            raw = self.llama.detokenize([int(tid)], special=True)
            return TopLogprob(raw.decode("utf-8", "replace"), float(logprobs[tid]), list(raw))

        chosen = entry(token)
        best = np.argsort(-logprobs)[:top] if top else []
        return TokenLogprob(chosen.token, chosen.logprob, chosen.bytes,
                            top=[entry(int(t)) for t in best])

    def _retire(self, seq: Request, reason: str) -> None:
        self._running.remove(seq)
        if seq.slot is not None:
            seq.slot.busy = None
            seq.slot.last_used = time.monotonic()
        self._finish(seq, reason)

    def _finish(self, seq: Request, reason: str) -> None:
        if seq.sampler is not None:
            self._lib.llama_sampler_free(seq.sampler)
            seq.sampler = None
        seq.emit(("finish", reason, None))
        seq.emit(DONE)


@dataclass
class _Feed:
    """What one sequence puts into one decode: pending tokens (a prompt chunk, or the last sampled
    token) and draft tokens after them."""

    seq: Request
    tokens: list[int]
    draft: list[int]
    logits_at: int | None = None  # batch row of its first logits, if it samples this step
    out_at: int = 0  # its first row among the decode's outputs
