"""Where the decode loop's speculative drafts come from.

`NgramDrafter` is prompt lookup: the tokens that followed the latest earlier occurrence of a
sequence's last `ngram` tokens. `ModelDrafter` runs a small GGUF model with the target's
vocabulary greedily for a few tokens, on a llama.cpp context of its own whose KV-cache sequences
mirror the scheduler's slots, so a slot's history is prefilled into the draft once and each later
draft feeds only what is new since the last (the target's accepted tokens and its own next one).
Both propose for every drafting sequence of a step at once; the target verifies all drafts in one
decode (see `batching.py`), so what a draft says never changes the output, only its speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass
class DraftWant:
    """One sequence's draft request: its slot (a KV-cache sequence id), everything it has seen or
    sampled so far, how many tokens to propose at most, and the request it is for (a new request
    on a slot starts a new history)."""

    seq_id: int
    history: list[int]
    n: int
    owner: object


class Drafter(Protocol):
    def propose(self, wants: list[DraftWant]) -> list[list[int]]: ...


def common_prefix(a: list[int], b: list[int], start: int = 0) -> int:
    """Length of the common prefix of `a` and `b`, which agree on their first `start` items."""
    n = min(len(a), len(b))
    i = min(start, n)
    while i < n and a[i] == b[i]:
        i += 1
    return i


class NgramIndex:
    """Where each n-gram of a growing token history last started, its final n-gram excepted, so
    a draft lookup costs a dict access plus the tokens new since the last one, not a scan."""

    def __init__(self, ngram: int) -> None:
        self.ngram = ngram
        self._starts: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # n-grams starting before this are in `_starts`

    def draft(self, history: list[int], max_draft: int) -> list[int]:
        """The tokens that followed the latest earlier occurrence of the last `ngram` tokens.
        `history` only ever grows between calls."""
        n = self.ngram
        for start in range(self._indexed, len(history) - n):
            self._starts[tuple(history[start:start + n])] = start
        self._indexed = max(self._indexed, len(history) - n)
        start = self._starts.get(tuple(history[-n:])) if len(history) > n else None
        return [] if start is None else history[start + n:start + n + max_draft]


def lookup_draft(history: list[int], ngram: int, max_draft: int) -> list[int]:
    """`NgramIndex.draft` on a history seen once."""
    return NgramIndex(ngram).draft(history, max_draft)


class NgramDrafter:
    """Prompt lookup, with an n-gram index per running request that grows with it."""

    def __init__(self, ngram: int) -> None:
        self.ngram = ngram
        self._indexes: dict[int, tuple[object, NgramIndex]] = {}  # by seq id

    def propose(self, wants: list[DraftWant]) -> list[list[int]]:
        out = []
        for want in wants:
            owner, index = self._indexes.get(want.seq_id, (None, None))
            if owner is not want.owner or index is None:
                index = NgramIndex(self.ngram)
                self._indexes[want.seq_id] = (want.owner, index)
            out.append(index.draft(want.history, want.n))
        return out


class ModelDrafter:
    """Greedy drafts from a small model on `ctx` (a context of `llama`'s model with one KV
    sequence per scheduler slot)."""

    def __init__(self, llama: Any, ctx: Any, *, n_slots: int, n_batch: int) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self.ctx = ctx
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.n_vocab = llama.n_vocab()
        self.n_batch = n_batch
        self.cached: list[list[int]] = [[] for _ in range(n_slots)]  # per seq id: its KV cells
        # Per seq id: the request last drafted for and how long its history was then. The cache
        # holds that history (and drafts after it), and a request's history only grows, so a
        # later draft for it compares only what came after.
        self._seen: dict[int, tuple[object, int]] = {}
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)

    def close(self) -> None:
        self._lib.llama_batch_free(self._batch)

    def propose(self, wants: list[DraftWant]) -> list[list[int]]:
        # Feed each sequence what its draft cache lacks (at least its last token, whose logits
        # give the first draft token), then one token per sequence per draft position.
        feeds: dict[int, list[int]] = {}
        for want in wants:
            cached = self.cached[want.seq_id]
            owner, seen = self._seen.get(want.seq_id, (None, 0))
            agreed = common_prefix(cached, want.history, seen if owner is want.owner else 0)
            self._seen[want.seq_id] = (want.owner, len(want.history))
            keep = min(agreed, len(want.history) - 1)
            if keep < len(cached):
                self._lib.llama_memory_seq_rm(self.memory, want.seq_id, keep, -1)
                del cached[keep:]
            feeds[want.seq_id] = want.history[keep:]
        drafts: dict[int, list[int]] = {want.seq_id: [] for want in wants}
        limits = {want.seq_id: want.n for want in wants}
        while feeds:
            for seq_id, token in self._decode(feeds).items():
                drafts[seq_id].append(token)
            feeds = {seq_id: [drafts[seq_id][-1]] for seq_id in feeds
                     if len(drafts[seq_id]) < limits[seq_id]}
        return [drafts[want.seq_id] for want in wants]

    def _decode(self, feeds: dict[int, list[int]]) -> dict[int, int]:
        """Decode every sequence's tokens (in `n_batch` chunks); the greedy next token of each."""
        lib, batch = self._lib, self._batch
        queue = [(seq_id, i == len(tokens) - 1, token) for seq_id, tokens in feeds.items()
                 for i, token in enumerate(tokens)]
        greedy: dict[int, int] = {}
        for start in range(0, len(queue), self.n_batch):
            chunk = queue[start:start + self.n_batch]
            rows: dict[int, int] = {}
            for n, (seq_id, last, token) in enumerate(chunk):
                batch.token[n] = token
                batch.pos[n] = len(self.cached[seq_id])
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq_id
                batch.logits[n] = last
                self.cached[seq_id].append(token)
                if last:
                    rows[seq_id] = n
            batch.n_tokens = len(chunk)
            status = lib.llama_decode(self.ctx, batch)
            if status != 0:
                raise RuntimeError(f"draft llama_decode returned {status}")
            for seq_id, row in rows.items():  # read before the next chunk overwrites the logits
                logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, row),
                                               shape=(self.n_vocab,))
                greedy[seq_id] = int(np.argmax(logits))
        return greedy
