"""The refresh job's training prompts, taken from logged traffic.

Logged replies are off-policy: they came from an older model, so they only evaluate. What trains
is the logged *prompt* (the conversation up to its last user turn): redacted again (the store
redacts by default, but can be told not to), deduplicated, optionally only those the verifier
scored low or has not scored, and split by a hash of the prompt into a training set and a held-out
set. The split depends only on the prompt, so a prompt held out once is held out in every later
refresh and never trains. Only patients' traffic is read: turns logged with origin `service` (the
judge's, rubric generator's and patient simulator's calls, benchmarks, load tests) never become
prompts, because the store's `turns_to_score` leaves them out.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from clinicloop.store.db import Store
from clinicloop.store.redact import redact


@dataclass(frozen=True)
class LoggedPrompt:
    key: str  # hash of the redacted prompt: the dedup and split key
    messages: list[dict[str, Any]]
    turn_id: str  # the first turn that asked it, to find its logged reply and score
    score: float | None  # the verifier's score of the logged reply, if scored


@dataclass
class PromptSplit:
    train: list[LoggedPrompt] = field(default_factory=list)
    heldout: list[LoggedPrompt] = field(default_factory=list)
    seen: int = 0  # answered turns read
    duplicates: int = 0
    filtered: int = 0  # dropped by the score filter


def prompt_of(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The conversation up to and including its last user message, redacted; None without one."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last_user is None:
        return None
    return [{"role": m["role"], "content": redact(str(m.get("content") or ""))}
            for m in messages[: last_user + 1]]


def prompt_key(messages: list[dict[str, Any]]) -> str:
    canonical = json.dumps([[m["role"], " ".join(m["content"].split())] for m in messages])
    return hashlib.sha256(canonical.encode()).hexdigest()


def is_heldout(key: str, fraction: float) -> bool:
    return int(key[:8], 16) / 0xFFFFFFFF < fraction


def logged_prompts(store: Store, *, heldout_fraction: float = 0.2, since: datetime | None = None,
                   model_version: str | None = None, max_score: float | None = None,
                   include_unscored: bool = True, page: int = 500) -> PromptSplit:
    """Deduplicated logged prompts, split into train and held-out.

    `max_score`: keep only prompts whose logged reply scored at most this (the ones the policy
    handles badly); `include_unscored` keeps prompts the verifier has not scored yet.
    """
    split = PromptSplit()
    seen_keys: set[str] = set()
    after: tuple[datetime, str] | None = None
    while turns := store.turns_to_score(since=since, model_version=model_version,
                                        only_unscored=False, after=after, limit=page):
        after = (turns[-1].created_at, turns[-1].id)
        for turn in turns:
            split.seen += 1
            messages = prompt_of(turn.messages)
            if messages is None:
                continue
            key = prompt_key(messages)
            if key in seen_keys:
                split.duplicates += 1
                continue
            seen_keys.add(key)
            scored = store.get_turn_score(turn.id)
            score = None if scored is None else scored.score
            if (score is None and not include_unscored) or (
                    score is not None and max_score is not None and score > max_score):
                split.filtered += 1
                continue
            prompt = LoggedPrompt(key, messages, turn.id, score)
            (split.heldout if is_heldout(key, heldout_fraction) else split.train).append(prompt)
    return split
