"""The shipped dialogue corpus: large enough, and in the shape training expects (that it is what
`scripts/make_corpus.py` writes: tests/scripts/test_make_corpus.py)."""

from __future__ import annotations

from collections import Counter

from clinicloop.model.corpus import load_corpus


def test_corpus_size_and_topics() -> None:
    rows = load_corpus()
    assert len(rows) >= 300
    assert len({r["id"] for r in rows}) == len(rows)
    topics = Counter(r["topic"] for r in rows)
    assert {"symptom", "red_flag", "medication", "follow_up", "clarify"} <= set(topics)
    assert all(count >= 40 for count in topics.values())


def test_rows_are_well_formed_chats() -> None:
    rows = load_corpus()
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        turns = [r for r in roles if r != "system"]
        assert roles.count("system") <= 1 and (roles[0] == "system" or "system" not in roles)
        assert turns == ["user", "assistant"] * (len(turns) // 2), row["id"]
        answer = row["messages"][-1]["content"]
        # Short answers and a one-sentence thought, so a tiny model can learn the format.
        assert 0 < len(answer.split()) <= 45, row["id"]
        assert 0 < len(row["reasoning"].split()) <= 40, row["id"]
        assert "<think>" not in answer and "<|im_" not in answer
    multi_turn = [r for r in rows if sum(m["role"] == "user" for m in r["messages"]) > 1]
    assert len(multi_turn) >= 100
    assert any(r["id"].startswith("red_flag-") and "emergency" in r["messages"][-1]["content"]
               for r in rows)
