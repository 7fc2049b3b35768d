"""Training prompts from the log: redacted, deduplicated, filtered by score, and a held-out split
that depends on the prompt alone."""

from __future__ import annotations

from clinicloop.rl.prompts import is_heldout, logged_prompts, prompt_key, prompt_of
from clinicloop.store.db import Store, TurnScore
from clinicloop.store.records import LoggedChoice, TurnRecord


def turn(i: int, text: str, reply: str = "Rest.") -> TurnRecord:
    return TurnRecord(conversation_id=f"c{i}", endpoint="chat.completions", model="m",
                      model_version="base",
                      messages=[{"role": "system", "content": "Be careful."},
                                {"role": "user", "content": text}],
                      choices=[LoggedChoice(index=0, content=reply, finish_reason="stop")])


def test_prompt_of_cuts_at_the_last_user_turn_and_redacts():
    messages = [{"role": "user", "content": "I'm Dana Whitfield, call 617-555-0142"},
                {"role": "assistant", "content": "How can I help?"},
                {"role": "user", "content": "my knee"}, {"role": "assistant", "content": "ok"}]
    prompt = prompt_of(messages)
    assert [m["role"] for m in prompt] == ["user", "assistant", "user"]
    assert "617-555-0142" not in prompt[0]["content"] and "Dana" not in prompt[0]["content"]
    assert prompt_of([{"role": "system", "content": "x"}]) is None


def test_dedup_filter_and_stable_split(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.migrate()
    texts = [f"symptom number {i}" for i in range(60)]
    turns = [turn(i, t) for i, t in enumerate(texts)] + [turn(99, texts[0])]  # one duplicate
    store.insert_many(turns)
    for t, score in [(turns[1], 0.9), (turns[2], 0.1)]:
        store.put_turn_score(TurnScore(turn_id=t.id, score=score, n_items=3, judge_model="j"))

    split = logged_prompts(store, heldout_fraction=0.25)
    assert split.seen == 61 and split.duplicates == 1
    assert len(split.train) + len(split.heldout) == 60
    assert 0 < len(split.heldout) < 30
    assert all(is_heldout(p.key, 0.25) for p in split.heldout)
    assert not any(is_heldout(p.key, 0.25) for p in split.train)
    # The same prompt lands on the same side in a later refresh, whatever else was logged.
    again = logged_prompts(store, heldout_fraction=0.25)
    assert {p.key for p in again.heldout} == {p.key for p in split.heldout}

    low = logged_prompts(store, max_score=0.5, include_unscored=False)
    (kept,) = low.train + low.heldout
    assert kept.turn_id == turns[2].id and kept.score == 0.1 and low.filtered == 59
    assert prompt_key(prompt_of(turns[0].messages)) == prompt_key(prompt_of(turns[-1].messages))


def test_service_turns_never_become_prompts(tmp_path):
    # The judge's, rubric generator's and simulator's calls, logged by the gateway as service.
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.migrate()
    patient = turn(0, "my knee hurts when I climb stairs")
    judge = turn(1, "You grade the last assistant turn of a conversation ...", '{"criteria_met"')
    store.insert_many([patient, judge.model_copy(update={"origin": "service"})])

    split = logged_prompts(store, heldout_fraction=0.5)
    assert [p.turn_id for p in split.train + split.heldout] == [patient.id]
    assert split.seen == 1
