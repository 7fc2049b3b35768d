"""The shipped dialogue corpus: large enough, and in the shape training expects (that it is what
`scripts/make_corpus.py` writes: tests/scripts/test_make_corpus.py)."""

from __future__ import annotations

import json
from collections import Counter

from clinicloop.model.corpus import TOOLS, load_corpus


def test_corpus_size_and_topics() -> None:
    rows = load_corpus()
    assert len(rows) >= 300
    assert len({r["id"] for r in rows}) == len(rows)
    topics = Counter(r["topic"] for r in rows)
    assert {"symptom", "red_flag", "medication", "follow_up", "clarify", "tool", "tool_none"
            } <= set(topics)
    assert all(count >= 40 for count in topics.values())


def test_rows_are_well_formed_chats() -> None:
    rows = load_corpus()
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        # A tool result stands where the user's turn would (the template renders it as one).
        turns = ["user" if r == "tool" else r for r in roles if r != "system"]
        assert roles.count("system") <= 1 and (roles[0] == "system" or "system" not in roles)
        assert turns == ["user", "assistant"] * (len(turns) // 2), row["id"]
        answer = row["messages"][-1]["content"]
        # Short answers and a one-sentence thought, so a tiny model can learn the format.
        assert 0 < len(answer.split()) <= 45, row["id"]
        assert 0 < len(row["reasoning"].split()) <= 40, row["id"]
        assert "<think>" not in answer and "<|im_" not in answer and "<tool_call>" not in answer
    multi_turn = [r for r in rows if sum(m["role"] == "user" for m in r["messages"]) > 1]
    assert len(multi_turn) >= 100
    assert any(r["id"].startswith("red_flag-") and "emergency" in r["messages"][-1]["content"]
               for r in rows)


def test_tool_dialogues_call_with_arguments_from_the_question() -> None:
    rows = load_corpus()
    offered = [r for r in rows if "tools" in r]
    calling = [r for r in offered if any("tool_calls" in m for m in r["messages"])]
    assert all(r["tools"] == TOOLS for r in offered)
    # About a tenth of the corpus calls a tool, and some rows offer tools but need none.
    assert 0.10 <= len(calling) / len(rows) <= 0.15
    assert len(offered) - len(calling) >= 30
    names = Counter()
    for row in calling:
        user, call_turn, result, answer = row["messages"][-4:]
        (call,) = call_turn["tool_calls"]
        assert call_turn["content"] == "" and result["tool_call_id"] == call["id"]
        names[call["function"]["name"]] += 1
        arguments = call["function"]["arguments"]
        schema = next(t["function"]["parameters"] for t in TOOLS
                      if t["function"]["name"] == call["function"]["name"])
        assert set(arguments) == set(schema["required"])
        for key, value in arguments.items():
            assert value in schema["properties"][key].get("enum", [value])
        text = answer["content"]
        if call["function"]["name"] == "check_drug_interaction":
            question = user["content"]
            # Arguments in the order the question names the drugs.
            assert question.index(arguments["drug_a"]) < question.index(arguments["drug_b"])
            found = json.loads(result["content"])
            assert found["advice"] in text
            assert found["severity"] in text or "no known" in text
        else:
            assert arguments["day"] in user["content"] and arguments["day"] in text
    assert names["check_drug_interaction"] >= 50 and names["book_appointment"] >= 25
