"""What reviewers and apps add to the store (labels, rubric edits, notes, feedback) and the
console's conversation list and version scores, on SQLite and Postgres."""

from __future__ import annotations

import math
import statistics
from datetime import UTC, datetime, timedelta

import pytest

from clinicloop.store import reviews
from clinicloop.store.db import Store, TurnScore
from clinicloop.store.records import TurnRecord
from clinicloop.store.reviews import ConversationFilter, RubricEdit
from tests.store.conftest import PHI, make_turn

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def turn(i: int, conversation: str, minutes: int, *, version: str = "v1",
         origin: str = "client", user_text: str | None = None) -> TurnRecord:
    record = make_turn(i, conversation_id=conversation, model_version=version)
    update: dict = {"created_at": T0 + timedelta(minutes=minutes), "origin": origin}
    if user_text is not None:
        update["messages"] = [{"role": "system", "content": "Be careful."},
                              {"role": "user", "content": user_text}]
    return record.model_copy(update=update)


def score(store: Store, turn_id: str, value: float | None, red_flags: int | None = 0) -> None:
    store.put_turn_score(TurnScore(turn_id=turn_id, score=value, n_items=3,
                                   red_flags=red_flags, judge_model="judge"))


def test_the_latest_label_of_an_item_counts_and_history_keeps_every_one(store):
    a, b = turn(0, "c1", 0), turn(1, "c1", 1)
    store.insert_many([a, b])
    item = {"criterion": "Asks about onset", "points": 5, "tags": []}
    first = reviews.add_label(store, turn_id=a.id, item_key="k1", item=item, criteria_met=True,
                              verdict_key="vk1", reviewer="rev-a")
    second = reviews.add_label(store, turn_id=a.id, item_key="k1", item=item,
                               criteria_met=False, verdict_key=None, reviewer="rev-b")
    other = reviews.add_label(store, turn_id=b.id, item_key="k1", item=item, criteria_met=True,
                              verdict_key=None, reviewer="rev-a")
    assert second.id > first.id and second.created_at.tzinfo is not None
    assert reviews.latest_labels(store) == {(a.id, "k1"): second, (b.id, "k1"): other}
    assert reviews.latest_labels(store, [a.id]) == {(a.id, "k1"): second}
    assert reviews.latest_labels(store, []) == {}
    history = reviews.label_history(store, a.id)
    assert [(h.criteria_met, h.reviewer, h.verdict_key) for h in history] == [
        (True, "rev-a", "vk1"), (False, "rev-b", None)]
    assert history[0].item == item


def test_rubric_edits_are_kept_per_prefix_in_order_and_apply_as_written(store):
    base = [{"criterion": "A", "points": 5}, {"criterion": "B", "points": -3},
            {"criterion": "C", "points": 2}]
    made = [
        reviews.add_rubric_edit(store, prefix_hash="p1", turn_id=None, action="add",
                                target_key=None, item={"criterion": "D", "points": 4},
                                reviewer="r"),
        reviews.add_rubric_edit(store, prefix_hash="p1", turn_id="t", action="edit",
                                target_key="A", item={"criterion": "A2", "points": 6},
                                reviewer="r"),
        reviews.add_rubric_edit(store, prefix_hash="p1", turn_id=None, action="remove",
                                target_key="B", item=None, reviewer="r"),
        # Both target items that are gone by then ("A" was edited into "A2"): skipped.
        reviews.add_rubric_edit(store, prefix_hash="p1", turn_id=None, action="edit",
                                target_key="A", item={"criterion": "A3", "points": 1},
                                reviewer="r"),
        reviews.add_rubric_edit(store, prefix_hash="p1", turn_id=None, action="remove",
                                target_key="B", item=None, reviewer="r"),
    ]
    reviews.add_rubric_edit(store, prefix_hash="p2", turn_id=None, action="remove",
                            target_key="C", item=None, reviewer="r")
    edits = reviews.rubric_edits(store, "p1")
    assert edits == made
    assert [e.action for e in edits] == ["add", "edit", "remove", "edit", "remove"]
    result = reviews.apply_edits(base, edits, key_of=lambda item: item["criterion"])
    assert result == [{"criterion": "A2", "points": 6}, {"criterion": "C", "points": 2},
                      {"criterion": "D", "points": 4}]
    assert len(base) == 3  # the input is left as it was
    assert reviews.rubric_edits(store, "nothing") == []


def test_apply_edits_is_pure_and_edits_only_the_targeted_item():
    edit = RubricEdit(id=1, prefix_hash="p", turn_id=None, action="edit", target_key="x",
                      item={"k": "y"}, reviewer="r", created_at=T0)
    items = [{"k": "a"}, {"k": "x"}, {"k": "b"}]
    assert reviews.apply_edits(items, [edit], key_of=lambda i: i["k"]) == [
        {"k": "a"}, {"k": "y"}, {"k": "b"}]
    assert items[1] == {"k": "x"}


def test_notes_and_feedback_comments_are_redacted_and_stripped_of_nul(store):
    t = turn(0, "c1", 0)
    store.insert_many([t])
    phi_text = ("My name is Maria Lopez, DOB 03/14/1962, MRN 00482913, call 555-201-4477 or "
                "maria.lg@example.com\x00 about the ECG")
    note = reviews.add_note(store, turn_id=t.id, conversation_id="c1", body=phi_text,
                            reviewer="rev")
    fb = reviews.add_feedback(store, turn_id=t.id, rating="down", comment=phi_text,
                              api_key_id="key1")
    kept = reviews.add_note(store, turn_id=t.id, conversation_id="c1", body="Maria\x00 Lopez",
                            reviewer="rev", redact=False)
    stored_notes = reviews.notes(store, conversation_id="c1")
    stored_fb = reviews.feedback_for(store, [t.id])[t.id]
    for text in (note.body, fb.comment, stored_notes[0].body, stored_fb[0].comment):
        assert "ECG" in text and "\x00" not in text
        assert not [p for p in PHI if p in text], text
    assert stored_notes[1] == kept and kept.body == "Maria Lopez"
    assert reviews.notes(store, conversation_id="other") == []


def test_feedback_per_turn_and_the_latest_rating_decides(store):
    a, b, c = turn(0, "c1", 0), turn(1, "c1", 1), turn(2, "c2", 2)
    store.insert_many([a, b, c])
    reviews.add_feedback(store, turn_id=a.id, rating="up", comment=None, api_key_id="k")
    reviews.add_feedback(store, turn_id=a.id, rating="down", comment="wrong dose",
                         api_key_id="k")
    reviews.add_feedback(store, turn_id=b.id, rating="up", comment=None, api_key_id=None)
    got = reviews.feedback_for(store, [a.id, b.id, c.id])
    assert set(got) == {a.id, b.id}
    assert [(f.rating, f.comment) for f in got[a.id]] == [("up", None), ("down", "wrong dose")]
    assert reviews.turns_with_feedback(store, "down") == {a.id}
    assert reviews.turns_with_feedback(store, "up") == {b.id}


@pytest.fixture
def conversations(store) -> dict[str, list[TurnRecord]]:
    """Five client conversations (c1 oldest .. c5 newest) plus one of service traffic."""
    long_text = "chest pain " * 40
    convs = {
        "c1": [turn(0, "c1", 0, version="v1"), turn(1, "c1", 1, version="v1")],
        "c2": [turn(2, "c2", 10, version="v1"),
               turn(3, "c2", 11, version="v2", user_text=long_text)],
        "c3": [turn(4, "c3", 20, version="v2")],
        "c4": [turn(5, "c4", 30, version="v2", user_text="Fever since Monday"),
               turn(6, "c4", 31, version="v2", origin="service")],
        "c5": [turn(7, "c5", 40, version="v2")],
        "svc": [turn(8, "svc", 50, version="v2", origin="service")],
    }
    store.insert_many([t for turns in convs.values() for t in turns])
    score(store, convs["c1"][0].id, 0.2)
    score(store, convs["c1"][1].id, 0.6, red_flags=None)  # scored before red flags existed
    score(store, convs["c2"][1].id, 0.9, red_flags=2)
    score(store, convs["c3"][0].id, 0.5, red_flags=1)
    score(store, convs["c4"][1].id, 0.1, red_flags=5)  # a service turn: never counted
    # c2 reviewed by a label, c3 by a note; c4 rated down then up, c5 rated down.
    reviews.add_label(store, turn_id=convs["c2"][0].id, item_key="k", item={}, criteria_met=True,
                      verdict_key=None, reviewer="r")
    reviews.add_note(store, turn_id=convs["c3"][0].id, conversation_id="c3", body="ok",
                     reviewer="r")
    reviews.add_feedback(store, turn_id=convs["c4"][0].id, rating="down", comment=None,
                         api_key_id="k")
    reviews.add_feedback(store, turn_id=convs["c4"][0].id, rating="up", comment=None,
                         api_key_id="k")
    reviews.add_feedback(store, turn_id=convs["c5"][0].id, rating="down", comment=None,
                         api_key_id="k")
    return convs


def ids(page: reviews.ConversationPage) -> list[str]:
    return [item.conversation_id for item in page.items]


def test_conversations_list_unreviewed_first_then_newest_with_their_aggregates(store,
                                                                               conversations):
    page = reviews.list_conversations(store, ConversationFilter())
    assert ids(page) == ["c5", "c4", "c1", "c3", "c2"]
    assert (page.total, page.page, page.page_size) == (5, 1, 50)
    by_id = {item.conversation_id: item for item in page.items}
    c1, c2, c4 = by_id["c1"], by_id["c2"], by_id["c4"]
    assert c1.n_turns == 2 and c1.score == pytest.approx(0.4) and c1.red_flags == 0
    assert c1.last_turn_at == T0 + timedelta(minutes=1) and not c1.reviewed
    assert c2.model_version == "v2" and c2.score == pytest.approx(0.9) and c2.red_flags == 2
    assert c2.reviewed and by_id["c3"].reviewed
    assert c2.first_user_text == ("chest pain " * 40)[:200]
    # c4's service turn is neither counted nor its "last turn".
    assert c4.n_turns == 1 and c4.score is None and c4.red_flags == 0
    assert c4.last_turn_at == T0 + timedelta(minutes=30)
    assert c4.first_user_text == "Fever since Monday"
    assert (c4.feedback_up, c4.feedback_down) == (1, 0)
    assert (by_id["c5"].feedback_up, by_id["c5"].feedback_down) == (0, 1)
    assert c1.first_user_text.startswith("My name is Maria Lopez")  # as make_turn logged it

    newest_first = reviews.list_conversations(store, ConversationFilter(unreviewed_first=False))
    assert ids(newest_first) == ["c5", "c4", "c3", "c2", "c1"]


def test_conversations_paginate_with_the_total_of_all_pages(store, conversations):
    pages = [reviews.list_conversations(store, ConversationFilter(), page=n, page_size=2)
             for n in (1, 2, 3, 4)]
    assert [ids(p) for p in pages] == [["c5", "c4"], ["c1", "c3"], ["c2"], []]
    assert {p.total for p in pages} == {5}
    assert pages[1].page == 2 and pages[1].page_size == 2


@pytest.mark.parametrize(("filters", "expected"), [
    ({"model_version": "v1"}, ["c1", "c2"]),
    ({"model_version": "v2"}, ["c5", "c4", "c3", "c2"]),
    ({"model_version": "nope"}, []),
    ({"since": T0 + timedelta(minutes=11)}, ["c5", "c4", "c3", "c2"]),
    ({"until": T0 + timedelta(minutes=20)}, ["c1", "c3", "c2"]),
    ({"since": (T0 + timedelta(minutes=20)).replace(tzinfo=None),  # naive means UTC
      "until": T0 + timedelta(minutes=30)}, ["c4", "c3"]),
    ({"min_score": 0.45}, ["c3", "c2"]),
    ({"max_score": 0.5}, ["c1", "c3"]),
    ({"red_flags": True}, ["c3", "c2"]),
    ({"feedback": "up"}, ["c4"]),
    ({"feedback": "down"}, ["c5"]),
    ({"model_version": "v2", "red_flags": True, "min_score": 0.6}, ["c2"]),
])
def test_conversation_filters_run_in_sql(store, conversations, filters, expected):
    page = reviews.list_conversations(store, ConversationFilter(**filters))
    assert ids(page) == expected and page.total == len(expected)


def test_version_scores_give_the_mean_and_a_normal_95_percent_interval(store):
    scores = {"v1": [0.2, 0.4, 0.9, 0.5], "v2": [0.7], "v3": []}
    turns = []
    for v, values in scores.items():
        for i in range(max(len(values), 1)):
            turns.append((v, turn(len(turns), f"{v}-{i}", len(turns), version=v)))
    store.insert_many([t for _, t in turns]
                      + [turn(99, "svc", 99, version="v1", origin="service")])
    for v, values in scores.items():
        for value, (_, t) in zip(values, [p for p in turns if p[0] == v], strict=False):
            score(store, t.id, value)
    v3_extra = turn(100, "v3-x", 100, version="v3")  # scored, but with no positive item: None
    store.insert_many([v3_extra])
    score(store, v3_extra.id, None)

    got = {s.version: s for s in reviews.version_scores(store)}
    assert list(got) == ["v1", "v2", "v3"]  # oldest version first
    v1 = got["v1"]
    values = scores["v1"]
    half = 1.959963984540054 * statistics.stdev(values) / math.sqrt(len(values))
    assert v1.n == 4 and v1.mean == pytest.approx(statistics.mean(values))
    assert v1.ci_low == pytest.approx(v1.mean - half) and v1.ci_high == pytest.approx(
        v1.mean + half)
    assert (got["v2"].n, got["v2"].mean, got["v2"].ci_low, got["v2"].ci_high) == (
        1, pytest.approx(0.7), None, None)
    assert (got["v3"].n, got["v3"].mean, got["v3"].ci_low) == (0, None, None)
