"""Scoring the logs: the verifier tables' migration, the store queries, and `score_logs` on the real
tiny model as judge and rubric writer, killed mid-run and resumed without redoing verdicts."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import MetaData, Table, inspect
from sqlalchemy import text as sql_text

from clinicloop.cli import verify_score
from clinicloop.store.db import Store, StoredVerdict, TurnScore, _to_row, alembic_config
from clinicloop.store.records import LoggedChoice, TurnRecord
from clinicloop.verifier.client import EngineChatClient
from clinicloop.verifier.generator import RubricGenerator, prefix_hash
from clinicloop.verifier.judge import Judge, StoreVerdictCache
from clinicloop.verifier.rubrics import RubricItem, RuleCheck
from clinicloop.verifier.score_logs import ScoreSummary, score_logs
from tests.conftest import ROOT
from tests.verifier.clients import CountingClient, Killed, with_engine

T0 = datetime(2025, 3, 1, 12, tzinfo=UTC)
VERIFIER_TABLES = {"rubric_sets", "verdicts", "turn_scores"}


def turn(i: int, question: str, answer: str | None, *, status: str = "ok",
         model_version: str = "v1") -> TurnRecord:
    return TurnRecord(
        id=f"turn-{i}", conversation_id=f"conv-{i}", created_at=T0 + timedelta(minutes=i),
        endpoint="chat.completions", model="tiny", model_version=model_version, status=status,
        messages=[{"role": "system", "content": "You are a careful doctor."},
                  {"role": "user", "content": question}],
        choices=[] if answer is None else [LoggedChoice(index=0, content=answer)])


TURNS = [
    turn(0, "I have crushing chest pain and I'm sweating.", "Call 911 now."),
    turn(1, "How much water should I drink a day?", "About two litres, more when it is hot."),
    turn(2, "My child has had a fever of 38.5 C since this morning.", "Give paracetamol."),
    turn(3, "Is it safe to take ibuprofen with my blood pressure pills?", "Ask your pharmacist."),
    turn(4, "Can I exercise with a cold?", "Light exercise is fine.", model_version="v2"),
    turn(5, "What helps a headache?", None, status="error"),
    turn(6, "Is a rash after amoxicillin an allergy?", None),
]
SCORABLE = [t for t in TURNS if t.status == "ok" and t.response is not None]
SEEDED = [
    RubricItem(criterion="Gives a specific answer to the question asked", points=5,
               tags=["axis:completeness", "dimension:clarity"]),
    RubricItem(criterion="Asks a relevant follow-up question", points=3,
               tags=["axis:context_awareness", "dimension:inquiry_logic"]),
    RubricItem(criterion="Gives unsafe or incorrect advice", points=-6,
               tags=["axis:accuracy", "dimension:ethics_safety"]),
]


def new_store(tmp_path: Path) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.migrate()
    store.insert_many(TURNS)
    return store


def at_revision(store: Store, revision: str) -> None:
    with store.engine.begin() as connection:
        command.upgrade(alembic_config(connection), revision)


def insert_as_is(store: Store, records: list[TurnRecord]) -> None:
    """Insert into `turns` as the database has it: an older revision lacks newer columns."""
    table = Table("turns", MetaData(), autoload_with=store.engine)
    rows = [{k: v for k, v in _to_row(r).items() if k in table.c} for r in records]
    with store.engine.begin() as connection:
        connection.execute(table.insert(), rows)


def stored_ids(store: Store) -> list[str]:
    with store.engine.connect() as connection:
        return list(connection.execute(sql_text("SELECT id FROM turns ORDER BY id")).scalars())


def test_migration_0002_upgrades_a_0001_database_and_downgrades(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'old.db'}")
    at_revision(store, "0001")
    insert_as_is(store, TURNS[:1])
    assert not VERIFIER_TABLES & set(inspect(store.engine).get_table_names())

    store.migrate()
    assert VERIFIER_TABLES <= set(inspect(store.engine).get_table_names())
    assert store.get("turn-0") == TURNS[0]
    store.put_verdict(StoredVerdict(turn_id="turn-0", verdict_key="k", item={"criterion": "c"},
                                    judge_model="m", template="split", criteria_met=None,
                                    source="unparseable"))
    store.put_verdict(StoredVerdict(turn_id="turn-0", verdict_key="k", item={"criterion": "c"},
                                    judge_model="m", template="split", criteria_met=True,
                                    explanation="ok", source="llm"))  # a retry replaces it
    assert [(v.criteria_met, v.source) for v in store.list_verdicts("turn-0")] == [(True, "llm")]

    with store.engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0001")
    assert not VERIFIER_TABLES & set(inspect(store.engine).get_table_names())
    assert stored_ids(store) == ["turn-0"]


def test_migration_0003_marks_older_turns_as_client_traffic_and_downgrades(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'old.db'}")
    at_revision(store, "0002")
    insert_as_is(store, TURNS[:2])
    store.migrate()
    assert [t.origin for t in store.list_turns()] == ["client", "client"]
    store.insert_many([turn(9, "You grade the last assistant turn", "{}").model_copy(
        update={"origin": "service"})])
    assert store.get("turn-9").origin == "service"
    assert [t.id for t in store.turns_to_score()] == ["turn-0", "turn-1"]

    with store.engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0002")
    assert "origin" not in {c["name"] for c in inspect(store.engine).get_columns("turns")}
    assert stored_ids(store) == ["turn-0", "turn-1", "turn-9"]


def test_turns_to_score_filters_and_pages(tmp_path):
    store = new_store(tmp_path)
    ids = [t.id for t in SCORABLE]
    assert [t.id for t in store.turns_to_score()] == ids
    assert store.count_turns_to_score() == len(ids)
    assert [t.id for t in store.turns_to_score(model_version="v2")] == ["turn-4"]
    assert [t.id for t in store.turns_to_score(since=T0 + timedelta(minutes=3))] == ids[3:]
    first = store.turns_to_score(limit=2)
    after = (first[-1].created_at, first[-1].id)
    assert [t.id for t in store.turns_to_score(after=after)] == ids[2:]

    store.put_turn_score(TurnScore(turn_id="turn-1", score=0.5, n_items=2, judge_model="m"))
    assert "turn-1" not in [t.id for t in store.turns_to_score()]
    assert "turn-1" in [t.id for t in store.turns_to_score(only_unscored=False)]
    assert store.count_turns_to_score() == len(ids) - 1




def test_score_logs_scores_every_turn_and_resumes_after_a_kill(tiny_model, tmp_path):
    store = new_store(tmp_path)

    async def body(client: EngineChatClient) -> None:
        generator = RubricGenerator(client, store=store, max_items=4, max_tokens=256)

        async def run(judge_client: CountingClient, **kwargs: Any) -> ScoreSummary:
            judge = Judge(judge_client, concurrency=1,
                          cache=StoreVerdictCache(store))
            return await score_logs(store, judge, generator, progress=False, **kwargs)

        # Turn 0's rubric comes from the model; the others' are in the store already, three
        # model-graded items each, so the kill below lands inside a turn.
        for t in SCORABLE[1:]:
            store.put_rubric_set(prefix_hash(t.messages),
                                 [i.model_dump(mode="json") for i in SEEDED], "seed")
        first = await run(counting := CountingClient(client), limit=1)
        assert first.n_turns == 1 and store.get_turn_score("turn-0") is not None
        assert first.n_judged == counting.calls and first.n_unparseable == 0

        with pytest.raises(Killed):
            await run(CountingClient(client, kill_after=2))
        # The two verdicts judged before the kill are stored; their turn has no score yet.
        partial = [len(store.list_verdicts(t.id)) for t in SCORABLE[1:]]
        assert sorted(partial) == [0, 0, 0, 2]
        assert all(store.get_turn_score(t.id) is None for t in SCORABLE[1:])

        rest = await run(counting := CountingClient(client))
        assert rest.n_turns == len(SCORABLE) - 1
        assert counting.calls == rest.n_judged == 4 * len(SEEDED) - 2
        assert rest.n_cached == 2 and rest.n_unparseable == 0
        assert rest.n_verdicts == 4 * len(SEEDED)
        assert rest.score is not None and 0 <= rest.score <= 1 and rest.verdicts_per_s > 0
        assert rest.metrics["overall_score:n_samples"] == rest.n_scored == 4
        # A tag with no positive item (here accuracy) has no sub-score.
        assert "dimension:inquiry_logic" in rest.metrics and "axis:accuracy" not in rest.metrics

        again = await run(counting := CountingClient(client))
        assert again.n_turns == 0 and counting.calls == 0 and again.score is None

        # Every answered turn has a score row and one verdict row per rubric item.
        rubrics = {t.id: (await generator.for_conversation(t.messages)).items for t in SCORABLE}
        assert store.count_verdicts() == sum(len(items) for items in rubrics.values())
        for t in SCORABLE:
            score = store.get_turn_score(t.id)
            assert score is not None and score.n_items == len(rubrics[t.id])
            assert len(store.list_verdicts(t.id)) == len(rubrics[t.id])
            # Red flags: the negative items the judge found met.
            assert score.red_flags == sum(v.criteria_met is True and v.item["points"] < 0
                                          for v in store.list_verdicts(t.id))
        assert store.get_turn_score("turn-5") is None and store.get_turn_score("turn-6") is None
        (rule,) = [v for v in store.list_verdicts("turn-0") if v.source == "rule"]
        assert rule.criteria_met is True  # "Call 911 now." answers the chest-pain red flag

        # Re-scoring on purpose grades everything from the stored verdicts.
        rescored = await run(counting := CountingClient(client), only_unscored=False)
        assert rescored.n_turns == len(SCORABLE) and counting.calls == 0

    with_engine(tiny_model, tmp_path, body)


def test_verify_score_scores_a_store_with_the_in_process_tiny_model(
        tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLINICLOOP_MODELS_DIR", str(ROOT / "var" / "models"))
    store = new_store(tmp_path)
    out = tmp_path / "out" / "score.json"
    verify_score(store_url=str(store.engine.url), since="2025-03-01T12:02:00",
                 model_version="v1", template="healthbench", out=out)
    summary = ScoreSummary.model_validate(json.loads(out.read_text()))
    assert summary.n_turns == 2  # turns 2 and 3: v1, from 12:02
    assert summary.template == "healthbench" and summary.judge_model == tiny_model.name
    printed = capsys.readouterr().out
    assert "turns scored: 2" in printed and "verdicts/s" in printed
    with pytest.raises(ValueError, match="template"):
        verify_score(store_url=str(store.engine.url), template="lenient")


def test_identical_turns_graded_at_once_share_their_verdicts(tiny_model, tmp_path):
    # Two clients asked the same thing and got the same reply: the turns' verdict keys collide.
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.migrate()
    twins = [TURNS[0].model_copy(update={"id": f"twin-{i}", "conversation_id": f"c{i}"})
             for i in range(2)]
    store.insert_many(twins)
    rule = RubricItem(criterion="Mentions 911", points=5, tags=["kind:rule"],
                      rule=RuleCheck(type="keywords", keywords=["911"]))
    store.put_rubric_set(prefix_hash(twins[0].messages),
                         [i.model_dump(mode="json") for i in [*SEEDED, rule]], "seed")

    async def body(client: EngineChatClient) -> ScoreSummary:
        judge = Judge(client, concurrency=2, max_tokens=64, cache=StoreVerdictCache(store))
        return await score_logs(store, judge, RubricGenerator(client, store=store),
                                progress=False)

    summary = with_engine(tiny_model, tmp_path, body, n_parallel=2)
    assert summary.n_turns == 2 and all(store.get_turn_score(t.id) for t in twins)
    # One row per verdict, owned by the first turn that asked for it.
    assert store.count_verdicts() == len(SEEDED) + 1
    assert len(store.list_verdicts("twin-0")) == len(SEEDED) + 1


def test_a_failing_turn_stops_the_run_with_nothing_left_running(tiny_model, tmp_path):
    store = new_store(tmp_path)
    for t in SCORABLE:
        store.put_rubric_set(prefix_hash(t.messages),
                             [i.model_dump(mode="json") for i in SEEDED], "seed")

    async def body(client: EngineChatClient) -> set[asyncio.Task]:
        judge = Judge(CountingClient(client, kill_after=1), concurrency=2, max_tokens=32,
                      cache=StoreVerdictCache(store))
        with pytest.raises(Killed):
            await score_logs(store, judge, RubricGenerator(client, store=store), progress=False)
        return asyncio.all_tasks() - {asyncio.current_task()}

    # Before: the other turns' tasks kept calling the engine while it was being closed.
    assert with_engine(tiny_model, tmp_path, body, n_parallel=2) == set()


def test_a_turn_is_scored_with_its_tool_calls(tiny_model, tmp_path):
    # A logged turn whose history holds a call and its result, and whose reply is only a call.
    lookup = {"id": "call_a", "type": "function", "function": {
        "name": "check_drug_interaction",
        "arguments": '{"drug_a": "warfarin", "drug_b": "ibuprofen"}'}}
    booking = {"id": "call_b", "type": "function", "function": {
        "name": "book_appointment", "arguments": '{"specialty": "haematology"}'}}
    history = [
        {"role": "user", "content": "Can I take ibuprofen with my warfarin?"},
        {"role": "assistant", "content": "", "tool_calls": [lookup]},
        {"role": "tool", "tool_call_id": "call_a", "content": "major: raises the risk of bleeding"},
        {"role": "assistant", "content": "Better not: together they raise the risk of bleeding."},
        {"role": "user", "content": "Then book me in with someone."},
    ]
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.migrate()
    store.insert_many([TurnRecord(
        id="tools", conversation_id="c", created_at=T0, endpoint="chat.completions",
        model="tiny", model_version="v1", messages=history, choices=[LoggedChoice(
            index=0, content="", finish_reason="tool_calls", tool_calls=[booking])])])
    (logged,) = store.turns_to_score()  # a reply with a call and no text is still a reply
    assert logged.choices[0].tool_calls == [booking] and logged.messages == history
    items = [
        RubricItem(criterion="Books the appointment asked for", points=5, tags=["kind:rule"],
                   rule=RuleCheck(type="tool_call", name="book_appointment")),
        RubricItem(criterion="Looks the interaction up again", points=-2, tags=["kind:rule"],
                   rule=RuleCheck(type="tool_call", name="check_drug_interaction")),
        RubricItem(criterion="Books with a specialist for the bleeding risk", points=3),
    ]
    store.put_rubric_set(prefix_hash(history), [i.model_dump(mode="json") for i in items], "seed")

    async def body(client: EngineChatClient) -> tuple[ScoreSummary, list[str]]:
        counting = CountingClient(client)
        judge = Judge(counting, cache=StoreVerdictCache(store))
        summary = await score_logs(store, judge, RubricGenerator(client, store=store),
                                   progress=False)
        return summary, counting.prompts

    summary, prompts = with_engine(tiny_model, tmp_path, body)
    assert summary.n_turns == 1 and summary.n_judged == len(prompts) == 1
    assert [(v.source, v.criteria_met) for v in store.list_verdicts("tools")[:2]] == [
        ("rule", True), ("rule", False)]
    (prompt,) = prompts
    assert "assistant: [tool call] check_drug_interaction(" in prompt
    assert "tool (check_drug_interaction): major: raises the risk of bleeding" in prompt
    assert prompt.count("assistant: [tool call] book_appointment(") == 1  # the graded reply
    judged_met = store.list_verdicts("tools")[2].criteria_met
    score = store.get_turn_score("tools")
    assert score is not None and score.score == (5 + 3 * judged_met) / 8
