"""What people add to the store, and the console's views of it.

Reviewers label the judge's verdicts (`verdict_labels`), edit a prefix's rubric (`rubric_edits`)
and leave notes (`review_notes`); apps rate responses (`feedback`, `POST /v1/feedback`). Rows are
only ever added: the newest row of a kind is the one that counts, and the judge's own verdicts
stay as they were. Free text (notes, feedback comments) is redacted before it is stored.

`list_conversations` and `version_scores` are the console's list and version views, aggregated
and paginated in SQL so a page never loads more than its own conversations. Every function is
blocking (async callers run them in a thread) and works on SQLite and Postgres.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel
from sqlalchemy import case, func, select, union
from sqlalchemy.orm import Session

from clinicloop.store.db import (
    Base,
    FeedbackRow,
    ReviewNoteRow,
    RubricEditRow,
    Store,
    TurnRow,
    TurnScoreRow,
    VerdictLabelRow,
    _clean,
    _utc,
)
from clinicloop.store.records import content_text
from clinicloop.store.redact import redact as redact_text

Rating = Literal["up", "down"]
EditAction = Literal["add", "edit", "remove"]

# The z of a two-sided 95% normal interval.
_Z95 = 1.959963984540054
# How much of a conversation's opening message the list shows.
_PREVIEW_CHARS = 200


class VerdictLabel(BaseModel):
    id: int
    turn_id: str
    item_key: str
    item: dict[str, Any]
    criteria_met: bool
    verdict_key: str | None
    reviewer: str
    created_at: datetime


class RubricEdit(BaseModel):
    id: int
    prefix_hash: str
    turn_id: str | None
    action: EditAction
    target_key: str | None
    item: dict[str, Any] | None
    reviewer: str
    created_at: datetime


class ReviewNote(BaseModel):
    id: int
    turn_id: str
    conversation_id: str
    body: str
    reviewer: str
    created_at: datetime


class Feedback(BaseModel):
    id: int
    turn_id: str
    rating: Rating
    comment: str | None
    api_key_id: str | None
    created_at: datetime


class ConversationFilter(BaseModel):
    """Which conversations the console lists: `model_version` keeps those with a turn served by
    it; `since`/`until` bound the last turn's time; `min_score`/`max_score` bound the mean score
    (unscored conversations drop out); `red_flags` keeps those with a met negative item;
    `feedback` keeps those with a turn whose latest rating is that one."""

    model_version: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    min_score: float | None = None
    max_score: float | None = None
    red_flags: bool = False
    unreviewed_first: bool = True
    feedback: Rating | None = None


class ConversationSummary(BaseModel):
    conversation_id: str
    last_turn_at: datetime
    model_version: str  # of its last turn
    n_turns: int
    score: float | None  # mean of its scored turns
    red_flags: int  # summed over its turns
    reviewed: bool  # a label or a note on any of its turns
    feedback_up: int  # turns whose latest rating is "up"
    feedback_down: int
    first_user_text: str  # the last turn's first user message, cut to 200 characters


class ConversationPage(BaseModel):
    items: list[ConversationSummary]
    page: int
    page_size: int
    total: int


class VersionScore(BaseModel):
    """The mean judge score of a version's scored client turns, with a 95% normal-approximation
    interval (None with fewer than two scores)."""

    version: str
    n: int
    mean: float | None
    ci_low: float | None
    ci_high: float | None


# Verdict labels.


def add_label(store: Store, *, turn_id: str, item_key: str, item: dict[str, Any],
              criteria_met: bool, verdict_key: str | None, reviewer: str) -> VerdictLabel:
    row = VerdictLabelRow(turn_id=turn_id, item_key=item_key, item=_clean(item),
                          criteria_met=criteria_met, verdict_key=verdict_key,
                          reviewer=reviewer, created_at=datetime.now(UTC))
    return VerdictLabel.model_validate(_add(store, row))


def latest_labels(store: Store, turn_ids: Sequence[str] | None = None
                  ) -> dict[tuple[str, str], VerdictLabel]:
    """(turn_id, item_key) -> the newest label; `turn_ids=None` means every turn."""
    newest = select(func.max(VerdictLabelRow.id)).group_by(
        VerdictLabelRow.turn_id, VerdictLabelRow.item_key)
    if turn_ids is not None:
        newest = newest.where(VerdictLabelRow.turn_id.in_(list(turn_ids)))
    query = select(VerdictLabelRow).where(VerdictLabelRow.id.in_(newest))
    labels = [VerdictLabel.model_validate(r) for r in _rows(store, query)]
    return {(label.turn_id, label.item_key): label for label in labels}


def label_history(store: Store, turn_id: str) -> list[VerdictLabel]:
    """Every label on a turn, oldest first."""
    query = select(VerdictLabelRow).where(VerdictLabelRow.turn_id == turn_id).order_by(
        VerdictLabelRow.id)
    return [VerdictLabel.model_validate(r) for r in _rows(store, query)]


# Rubric edits.


def add_rubric_edit(store: Store, *, prefix_hash: str, turn_id: str | None, action: EditAction,
                    target_key: str | None, item: dict[str, Any] | None,
                    reviewer: str) -> RubricEdit:
    row = RubricEditRow(prefix_hash=prefix_hash, turn_id=turn_id, action=action,
                        target_key=target_key, item=_clean(item), reviewer=reviewer,
                        created_at=datetime.now(UTC))
    return RubricEdit.model_validate(_add(store, row))


def rubric_edits(store: Store, prefix_hash: str) -> list[RubricEdit]:
    """A prefix's rubric edits, oldest first (the order `apply_edits` takes them in)."""
    query = select(RubricEditRow).where(RubricEditRow.prefix_hash == prefix_hash)
    return [RubricEdit.model_validate(r) for r in _rows(store, query.order_by(RubricEditRow.id))]


def apply_edits(items: list[dict[str, Any]], edits: Sequence[RubricEdit],
                key_of: Callable[[dict[str, Any]], str]) -> list[dict[str, Any]]:
    """The rubric `items` after `edits` in order: `add` appends its item, `edit` replaces the item
    whose `key_of` is the edit's target, `remove` drops it. An edit or removal whose target is
    no longer there (removed or edited by an earlier edit) is skipped."""
    result = list(items)
    for edit in edits:
        if edit.action == "add":
            if edit.item is not None:
                result.append(edit.item)
            continue
        at = next((i for i, item in enumerate(result) if key_of(item) == edit.target_key), None)
        if at is None:
            continue
        if edit.action == "remove":
            del result[at]
        elif edit.item is not None:
            result[at] = edit.item
    return result


# Notes and feedback: free text, redacted before it is stored.


def add_note(store: Store, *, turn_id: str, conversation_id: str, body: str, reviewer: str,
             redact: bool = True) -> ReviewNote:
    row = ReviewNoteRow(turn_id=turn_id, conversation_id=conversation_id,
                        body=_text(body, redact), reviewer=reviewer,
                        created_at=datetime.now(UTC))
    return ReviewNote.model_validate(_add(store, row))


def notes(store: Store, *, conversation_id: str) -> list[ReviewNote]:
    """A conversation's notes, oldest first."""
    query = select(ReviewNoteRow).where(ReviewNoteRow.conversation_id == conversation_id)
    return [ReviewNote.model_validate(r) for r in _rows(store, query.order_by(ReviewNoteRow.id))]


def add_feedback(store: Store, *, turn_id: str, rating: Rating, comment: str | None,
                 api_key_id: str | None, redact: bool = True) -> Feedback:
    row = FeedbackRow(turn_id=turn_id, rating=rating,
                      comment=None if comment is None else _text(comment, redact),
                      api_key_id=api_key_id, created_at=datetime.now(UTC))
    return Feedback.model_validate(_add(store, row))


def feedback_for(store: Store, turn_ids: Sequence[str]) -> dict[str, list[Feedback]]:
    """Each turn's feedback, oldest first (turns without any are absent)."""
    query = select(FeedbackRow).where(FeedbackRow.turn_id.in_(list(turn_ids)))
    result: dict[str, list[Feedback]] = {}
    for row in _rows(store, query.order_by(FeedbackRow.id)):
        result.setdefault(row["turn_id"], []).append(Feedback.model_validate(row))
    return result


def turns_with_feedback(store: Store, rating: Rating) -> set[str]:
    """The turns whose latest rating is `rating`."""
    latest = _latest_feedback().subquery()
    query = select(latest.c.turn_id).where(latest.c.rating == rating)
    with store.engine.connect() as connection:
        return set(connection.execute(query).scalars())


# The console's views.


def list_conversations(store: Store, filters: ConversationFilter, *, page: int = 1,
                       page_size: int = 50) -> ConversationPage:
    """One page of conversations (client turns only), unreviewed ones first when
    `filters.unreviewed_first`, then the newest last turn first."""
    page, page_size = max(page, 1), max(page_size, 1)
    summary = _conversation_summaries(filters).subquery()
    order = [summary.c.reviewed] if filters.unreviewed_first else []
    order += [summary.c.last_turn_at.desc(), summary.c.conversation_id.desc()]
    rows_query = select(summary).order_by(*order).limit(page_size).offset((page - 1) * page_size)
    with store.engine.connect() as connection:
        total = connection.execute(select(func.count()).select_from(summary)).scalar_one()
        rows = connection.execute(rows_query).mappings().all()
        last = _last_turns(connection, [r["conversation_id"] for r in rows])
    items = []
    for r in rows:
        version, messages = last[r["conversation_id"]]
        items.append(ConversationSummary(
            conversation_id=r["conversation_id"], last_turn_at=_utc(r["last_turn_at"]),
            model_version=version, n_turns=r["n_turns"],
            score=None if r["score"] is None else float(r["score"]),
            red_flags=int(r["red_flags"] or 0), reviewed=bool(r["reviewed"]),
            feedback_up=int(r["feedback_up"] or 0), feedback_down=int(r["feedback_down"] or 0),
            first_user_text=_first_user_text(messages)))
    return ConversationPage(items=items, page=page, page_size=page_size, total=total)


def version_scores(store: Store) -> list[VersionScore]:
    """Every version that served a client turn, oldest first, with its mean turn score."""
    score = TurnScoreRow.score
    query = (
        select(TurnRow.model_version, func.count(score), func.avg(score),
               func.avg(score * score))
        .select_from(TurnRow)
        .outerjoin(TurnScoreRow, TurnScoreRow.turn_id == TurnRow.id)
        .where(TurnRow.origin == "client")
        .group_by(TurnRow.model_version)
        .order_by(func.min(TurnRow.created_at), TurnRow.model_version)
    )
    with store.engine.connect() as connection:
        rows = connection.execute(query).all()
    return [_version_score(version, n, mean, mean_sq) for version, n, mean, mean_sq in rows]


def _version_score(version: str, n: int, mean: Any, mean_sq: Any) -> VersionScore:
    if n == 0:
        return VersionScore(version=version, n=0, mean=None, ci_low=None, ci_high=None)
    mean, mean_sq = float(mean), float(mean_sq)
    if n < 2:
        return VersionScore(version=version, n=n, mean=mean, ci_low=None, ci_high=None)
    # Sample variance from the two moments; clamped, as rounding can make it slightly negative.
    variance = max(mean_sq - mean * mean, 0.0) * n / (n - 1)
    half = _Z95 * math.sqrt(variance / n)
    return VersionScore(version=version, n=n, mean=mean, ci_low=mean - half,
                        ci_high=mean + half)


def _latest_feedback() -> Any:
    """Each rated turn's latest feedback row (turn_id, rating)."""
    newest = select(func.max(FeedbackRow.id)).group_by(FeedbackRow.turn_id)
    return select(FeedbackRow.turn_id, FeedbackRow.rating).where(FeedbackRow.id.in_(newest))


def _conversation_summaries(filters: ConversationFilter) -> Any:
    """One row per conversation with client turns that passes `filters`: its aggregates, no
    order, no limit."""
    feedback = _latest_feedback().subquery()
    reviewed = union(select(VerdictLabelRow.turn_id), select(ReviewNoteRow.turn_id)).subquery()
    red_flags = func.sum(func.coalesce(TurnScoreRow.red_flags, 0))
    score = func.avg(TurnScoreRow.score)
    up = func.sum(case((feedback.c.rating == "up", 1), else_=0))
    down = func.sum(case((feedback.c.rating == "down", 1), else_=0))
    last_turn_at = func.max(TurnRow.created_at)
    query = (
        select(
            TurnRow.conversation_id.label("conversation_id"),
            last_turn_at.label("last_turn_at"),
            func.count(TurnRow.id).label("n_turns"),
            score.label("score"),
            red_flags.label("red_flags"),
            func.max(case((reviewed.c.turn_id.is_not(None), 1), else_=0)).label("reviewed"),
            up.label("feedback_up"),
            down.label("feedback_down"),
        )
        .select_from(TurnRow)
        .outerjoin(TurnScoreRow, TurnScoreRow.turn_id == TurnRow.id)
        .outerjoin(feedback, feedback.c.turn_id == TurnRow.id)
        .outerjoin(reviewed, reviewed.c.turn_id == TurnRow.id)
        .where(TurnRow.origin == "client")
        .group_by(TurnRow.conversation_id)
    )
    if filters.model_version is not None:
        served = case((TurnRow.model_version == filters.model_version, 1), else_=0)
        query = query.having(func.max(served) == 1)
    if filters.since is not None:
        query = query.having(last_turn_at >= _utc(filters.since))
    if filters.until is not None:
        query = query.having(last_turn_at <= _utc(filters.until))
    if filters.min_score is not None:
        query = query.having(score >= filters.min_score)
    if filters.max_score is not None:
        query = query.having(score <= filters.max_score)
    if filters.red_flags:
        query = query.having(red_flags > 0)
    if filters.feedback is not None:
        query = query.having((up if filters.feedback == "up" else down) > 0)
    return query


def _last_turns(connection: Any, conversation_ids: list[str]
                ) -> dict[str, tuple[str, list[dict[str, Any]]]]:
    """conversation_id -> (model_version, messages) of its last client turn."""
    if not conversation_ids:
        return {}
    position = func.row_number().over(
        partition_by=TurnRow.conversation_id,
        order_by=(TurnRow.created_at.desc(), TurnRow.id.desc()),
    ).label("position")
    ranked = (
        select(TurnRow.conversation_id, TurnRow.model_version, TurnRow.messages, position)
        .where(TurnRow.origin == "client", TurnRow.conversation_id.in_(conversation_ids))
        .subquery()
    )
    query = select(ranked.c.conversation_id, ranked.c.model_version, ranked.c.messages).where(
        ranked.c.position == 1)
    return {c: (version, messages) for c, version, messages in connection.execute(query)}


def _first_user_text(messages: list[dict[str, Any]]) -> str:
    for message in messages:
        if message.get("role") != "user":
            continue
        return content_text(message.get("content"))[:_PREVIEW_CHARS]
    return ""


def _text(text: str, redact: bool) -> str:
    text = _clean(text)
    return redact_text(text) if redact else text


def _add(store: Store, row: Base) -> dict[str, Any]:
    """Insert `row`; its columns as stored (id included), timestamps in UTC."""
    with Session(store.engine, expire_on_commit=False) as session:
        session.add(row)
        session.commit()
        return _columns(row)


def _rows(store: Store, query: Any) -> list[dict[str, Any]]:
    """The columns of `query`'s rows."""
    with Session(store.engine) as session:
        return [_columns(row) for row in session.scalars(query)]


def _columns(row: Base) -> dict[str, Any]:
    columns = {c.key: getattr(row, c.key) for c in row.__table__.columns}
    return {k: _utc(v) if isinstance(v, datetime) else v for k, v in columns.items()}

