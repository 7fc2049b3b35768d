"""The console's pages as view models, built from the store, the registry, calibration and the
refresh runs' files: everything but HTTP (the routes in `api_router.py` render these).

Every method is blocking (the routes run them in a thread) and raises `ConsoleError` for what the
reviewer should see as an error page: 400 for input it refuses, 404 for what does not exist, 503
when the store does not answer. Input from the browser arrives here as strings and is validated
here, whatever it holds.

A turn's rubric is the items its judge verdicts name, then any of its stored rubric set's (the
prefix's, `verifier.generator.prefix_hash`) not among them, then the reviewers' rubric edits of
that prefix applied in order. Its reviewed score is HealthBench's score of the turn with each
reviewer label in place of the judge's verdict, over that edited rubric. Refresh runs are read
from `runs_dir/<run_id>/{state,report}.json` as plain JSON: serving never imports `rl`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from clinicloop.backends.registry import Registry, RegistryEvent
from clinicloop.config import ConsoleSettings
from clinicloop.store import reviews
from clinicloop.store.db import Store, StoredVerdict
from clinicloop.store.records import TurnRecord, content_text
from clinicloop.verifier.calibration import Calibration, calibrate_stored
from clinicloop.verifier.generator import prefix_hash
from clinicloop.verifier.judge import item_key, stored_item_key
from clinicloop.verifier.rubrics import RubricItem
from clinicloop.verifier.scoring import score_example

T = TypeVar("T")

AXES = ("accuracy", "completeness", "context_awareness", "communication_quality",
        "instruction_following")
MAX_NOTE_CHARS = 4000
MAX_CRITERION_CHARS = 2000
MAX_TURNS_SHOWN = 500
_MAX_FIELD_CHARS = 200
_MAX_PAGE = 1_000_000
_MAX_SCORE = 1000.0
_RUN_ID = re.compile(r"^[A-Za-z0-9._-]+$")
_KEY = re.compile(r"^[0-9a-f]{64}$")


class ConsoleError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def guarded(call: Callable[[], T]) -> T:
    """`call()`, with the store failing to answer as a 503."""
    try:
        return call()
    except SQLAlchemyError as exc:
        raise ConsoleError(503, "the conversation store is unavailable") from exc


# Input from query strings and forms.


def _field(values: Mapping[str, str], name: str) -> str:
    value = values.get(name, "").strip()
    if len(value) > _MAX_FIELD_CHARS:
        raise ConsoleError(400, f"{name}: longer than {_MAX_FIELD_CHARS} characters")
    return value


def _number(values: Mapping[str, str], name: str) -> float | None:
    text = _field(values, name)
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConsoleError(400, f"{name}: not a number") from None
    if not math.isfinite(value) or abs(value) > _MAX_SCORE:
        raise ConsoleError(400, f"{name}: out of range")
    return value


def _int(text: str, name: str, low: int, high: int) -> int:
    if not re.fullmatch(r"-?[0-9]{1,9}", text):
        raise ConsoleError(400, f"{name}: not a whole number")
    value = int(text)
    if not low <= value <= high:
        raise ConsoleError(400, f"{name}: must be between {low} and {high}")
    return value


def _moment(values: Mapping[str, str], name: str, *, end_of_day: bool) -> datetime | None:
    """A date (`2026-05-01`; as `until`, the whole day counts) or an ISO date-time (UTC unless it
    says otherwise)."""
    text = _field(values, name)
    if not text:
        return None
    try:
        if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", text):
            day = datetime.fromisoformat(text).date()
            moment = datetime.combine(day, time.max if end_of_day else time.min)
        else:
            moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConsoleError(400, f"{name}: not a date (YYYY-MM-DD)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass
class ConversationQuery:
    """The conversation list's filters as validated, and as the form shows them again."""

    filters: reviews.ConversationFilter
    page: int
    form: dict[str, str]

    @classmethod
    def parse(cls, values: Mapping[str, str]) -> ConversationQuery:
        names = ("version", "since", "until", "min_score", "max_score", "red_flags", "feedback")
        form = {name: _field(values, name) for name in names}
        feedback = form["feedback"] or None
        if feedback not in (None, "up", "down"):
            raise ConsoleError(400, "feedback: must be up or down")
        if form["red_flags"] not in ("", "1", "on", "true"):
            raise ConsoleError(400, "red_flags: must be 1")
        page_text = _field(values, "page")
        page = _int(page_text, "page", 1, _MAX_PAGE) if page_text else 1
        low, high = _number(values, "min_score"), _number(values, "max_score")
        since = _moment(values, "since", end_of_day=False)
        until = _moment(values, "until", end_of_day=True)
        filters = reviews.ConversationFilter(
            model_version=form["version"] or None, since=since, until=until, min_score=low,
            max_score=high, red_flags=bool(form["red_flags"]), feedback=feedback)
        return cls(filters, page, {k: v for k, v in form.items() if v})


# View models.


@dataclass
class MessageView:
    role: str
    text: str


@dataclass
class ItemView:
    key: str
    criterion: str
    points: int
    axis: str | None
    tags: list[str]
    verdict: StoredVerdict | None
    label: reviews.VerdictLabel | None

    @property
    def judge_met(self) -> str:
        if self.verdict is None or self.verdict.criteria_met is None:
            return "no verdict"
        return "met" if self.verdict.criteria_met else "not met"


@dataclass
class TurnView:
    turn: TurnRecord
    messages: list[MessageView]
    judge_score: float | None
    judge_model: str | None
    red_flags: int | None
    reviewed_score: float | None
    items: list[ItemView]
    feedback: list[reviews.Feedback]
    notes: list[reviews.ReviewNote]


@dataclass
class ConversationView:
    conversation_id: str
    turns: list[TurnView]


@dataclass
class VersionRow:
    version: str
    state: Literal["active", "canary", "—"]
    share: float | None
    parent: str | None
    created_at: datetime | None
    score: reviews.VersionScore | None


@dataclass
class RunSummary:
    run_id: str
    created_at: str | None
    serving_version: str | None
    finished: bool
    publish: bool | None
    before: float | None
    after: float | None
    swapped: str | None
    version_id: str | None
    abandoned: str | None


@dataclass
class VersionsView:
    registry: str | None  # where the registry lives; None: this server has none
    versions: list[VersionRow]
    events: list[RegistryEvent]
    runs: list[RunSummary]


@dataclass
class RunView:
    summary: RunSummary
    reasons: list[str]
    margin: float | None
    regressed_negatives: list[str]
    prompts: dict[str, Any]
    report_md: str | None
    has_curve: bool


def message_text(content: Any) -> str:
    """A message's content as text: OpenAI content parts keep their text parts; anything else
    is shown as JSON."""
    if content is None or isinstance(content, str) or (
            isinstance(content, list) and all(isinstance(p, dict) for p in content)):
        return content_text(content)
    return json.dumps(content, ensure_ascii=False)


def _run_summary(run_id: str, state: dict[str, Any], report: dict[str, Any] | None
                 ) -> RunSummary:
    decision = (report or {}).get("decision") or {}
    return RunSummary(
        run_id=run_id, created_at=state.get("created_at"),
        serving_version=state.get("serving_version"), finished="report" in state.get("done", {}),
        publish=decision.get("publish"), before=(report or {}).get("before"),
        after=(report or {}).get("after"), swapped=state.get("swapped"),
        version_id=state.get("version_id"), abandoned=state.get("abandoned"))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


class Console:
    """The console's reads and writes; `redact`: notes are redacted before they are stored."""

    def __init__(self, store: Store, registry: Registry | None, settings: ConsoleSettings, *,
                 redact: bool) -> None:
        self.store = store
        self.registry = registry
        self.settings = settings
        self.redact = redact

    # Conversations.

    def conversations(self, query: ConversationQuery) -> reviews.ConversationPage:
        return guarded(lambda: reviews.list_conversations(
            self.store, query.filters, page=query.page, page_size=self.settings.page_size))

    def conversation(self, conversation_id: str) -> ConversationView:
        return guarded(lambda: self._conversation(conversation_id))

    def _conversation(self, conversation_id: str) -> ConversationView:
        turns = self.store.list_turns(conversation_id=conversation_id, limit=MAX_TURNS_SHOWN)
        if not turns:
            raise ConsoleError(404, "no such conversation")
        ids = [t.id for t in turns]
        labels = reviews.latest_labels(self.store, ids)
        feedback = reviews.feedback_for(self.store, ids)
        notes = reviews.notes(self.store, conversation_id=conversation_id)
        return ConversationView(conversation_id, [
            self._turn(t, labels, feedback.get(t.id, []),
                       [n for n in notes if n.turn_id == t.id]) for t in turns])

    def _rubric(self, turn: TurnRecord) -> tuple[list[dict[str, Any]], dict[str, StoredVerdict]]:
        """The turn's rubric items (edits applied) and its latest judge verdict per item key."""
        verdicts: dict[str, StoredVerdict] = {}
        items: dict[str, dict[str, Any]] = {}
        for verdict in self.store.list_verdicts(turn.id):  # oldest first: the latest wins
            key = stored_item_key(verdict.item)
            verdicts[key] = verdict
            items.setdefault(key, verdict.item)
        key = prefix_hash(turn.messages)
        stored = self.store.get_rubric_set(key)
        for item in stored[0] if stored else []:
            items.setdefault(stored_item_key(item), item)
        edited = reviews.apply_edits(list(items.values()), reviews.rubric_edits(self.store, key),
                                     stored_item_key)
        return edited, verdicts

    def _turn(self, turn: TurnRecord, labels: Mapping[tuple[str, str], reviews.VerdictLabel],
              feedback: list[reviews.Feedback], notes: list[reviews.ReviewNote]) -> TurnView:
        raw_items, verdicts = self._rubric(turn)
        rubric = [RubricItem.model_validate(raw) for raw in raw_items]
        items = []
        for item in rubric:
            key = item_key(item)
            axes = item.tag_values("axis")
            items.append(ItemView(key=key, criterion=item.criterion, points=item.points,
                                  axis=axes[0] if axes else None, tags=item.tags,
                                  verdict=verdicts.get(key), label=labels.get((turn.id, key))))
        met = [i.label.criteria_met if i.label is not None
               else (i.verdict.criteria_met if i.verdict is not None else None) for i in items]
        score = self.store.get_turn_score(turn.id)
        messages = [MessageView(str(m.get("role", "")), message_text(m.get("content")))
                    for m in turn.messages]
        return TurnView(
            turn=turn, messages=messages, judge_score=score.score if score else None,
            judge_model=score.judge_model if score else None,
            red_flags=score.red_flags if score else None,
            reviewed_score=score_example(rubric, met),
            items=items, feedback=feedback, notes=notes)

    # Corrections. Each returns the turn's conversation id (the page to go back to).

    def _turn_or_404(self, turn_id: str) -> TurnRecord:
        turn = self.store.get(turn_id) if len(turn_id) <= _MAX_FIELD_CHARS else None
        if turn is None:
            raise ConsoleError(404, "no such turn")
        return turn

    def label(self, turn_id: str, form: Mapping[str, str], reviewer: str) -> str:
        key = _field(form, "item_key")
        met = _field(form, "criteria_met")
        if met not in ("true", "false"):
            raise ConsoleError(400, "criteria_met: must be true or false")

        def write() -> str:
            turn = self._turn_or_404(turn_id)
            items, verdicts = self._rubric(turn)
            item = next((i for i in items if stored_item_key(i) == key), None)
            if item is None:
                raise ConsoleError(400, "item_key: not an item of this turn's rubric")
            verdict = verdicts.get(key)
            reviews.add_label(self.store, turn_id=turn.id, item_key=key, item=item,
                              criteria_met=met == "true",
                              verdict_key=verdict.verdict_key if verdict else None,
                              reviewer=reviewer)
            return turn.conversation_id

        return guarded(write)

    def edit_rubric(self, turn_id: str, action: Literal["add", "edit", "remove"],
                    form: Mapping[str, str], reviewer: str) -> str:
        item = None if action == "remove" else self._item_from(form)
        target = None if action == "add" else _field(form, "target_key")
        if target is not None and not _KEY.fullmatch(target):
            raise ConsoleError(400, "target_key: not an item key")

        def write() -> str:
            turn = self._turn_or_404(turn_id)
            if target is not None and target not in {stored_item_key(i)
                                                     for i in self._rubric(turn)[0]}:
                raise ConsoleError(400, "target_key: not an item of this turn's rubric")
            reviews.add_rubric_edit(self.store, prefix_hash=prefix_hash(turn.messages),
                                    turn_id=turn.id, action=action, target_key=target,
                                    item=item, reviewer=reviewer)
            return turn.conversation_id

        return guarded(write)

    @staticmethod
    def _item_from(form: Mapping[str, str]) -> dict[str, Any]:
        criterion = form.get("criterion", "").strip()
        if not criterion or len(criterion) > MAX_CRITERION_CHARS:
            raise ConsoleError(400, f"criterion: 1 to {MAX_CRITERION_CHARS} characters")
        points = _int(_field(form, "points"), "points", -10, 10)
        if points == 0:
            raise ConsoleError(400, "points: must not be 0")
        axis = _field(form, "axis")
        if axis and axis not in AXES:
            raise ConsoleError(400, f"axis: one of {', '.join(AXES)}")
        try:
            item = RubricItem(criterion=criterion, points=points,
                              tags=[f"axis:{axis}"] if axis else [])
        except ValidationError as exc:
            raise ConsoleError(400, f"rubric item: {exc.errors()[0]['msg']}") from None
        return item.model_dump(mode="json", exclude_none=True)

    def note(self, turn_id: str, form: Mapping[str, str], reviewer: str) -> str:
        body = form.get("body", "").strip()
        if not body:
            raise ConsoleError(400, "body: the note is empty")
        if len(body) > MAX_NOTE_CHARS:
            raise ConsoleError(400, f"body: longer than {MAX_NOTE_CHARS} characters")

        def write() -> str:
            turn = self._turn_or_404(turn_id)
            reviews.add_note(self.store, turn_id=turn.id, conversation_id=turn.conversation_id,
                             body=body, reviewer=reviewer, redact=self.redact)
            return turn.conversation_id

        return guarded(write)

    # Versions and refresh runs.

    def versions(self) -> VersionsView:
        scores = {s.version: s for s in guarded(lambda: reviews.version_scores(self.store))}
        rows: list[VersionRow] = []
        events: list[RegistryEvent] = []
        if self.registry is not None:
            state = guarded(self.registry.read)
            events = list(reversed(state.events))  # newest first
            for version in state.ordered():
                canary = state.canary is not None and state.canary.version == version.id
                rows.append(VersionRow(
                    version=version.id,
                    state="active" if state.active == version.id else
                    "canary" if canary else "—",
                    share=state.canary.share if canary and state.canary else None,
                    parent=version.parent, created_at=version.created_at,
                    score=scores.pop(version.id, None)))
        # Versions the store has turns of but the registry no longer names.
        rows += [VersionRow(version=v, state="—", share=None, parent=None, created_at=None,
                            score=s) for v, s in sorted(scores.items())]
        return VersionsView(registry=self.registry.location if self.registry else None,
                            versions=rows, events=events, runs=self._runs())

    def _runs(self) -> list[RunSummary]:
        root = self.settings.runs_dir
        runs = []
        for state_file in root.glob("*/state.json") if root.is_dir() else []:
            state = _read_json(state_file)
            if state is not None and _RUN_ID.fullmatch(state_file.parent.name):
                runs.append(_run_summary(state_file.parent.name, state,
                                         _read_json(state_file.parent / "report.json")))
        return sorted(runs, key=lambda r: (r.created_at or "", r.run_id), reverse=True)

    def _run_dir(self, run_id: str) -> Path:
        """`runs_dir/<run_id>`, or a 404 for a run id that is not one or escapes runs_dir."""
        root = self.settings.runs_dir.resolve()
        if not _RUN_ID.fullmatch(run_id) or run_id in (".", ".."):
            raise ConsoleError(404, "no such run")
        run = (root / run_id).resolve()
        if run.parent != root or not (run / "state.json").is_file():
            raise ConsoleError(404, "no such run")
        return run

    def run(self, run_id: str) -> RunView:
        run = self._run_dir(run_id)
        state = _read_json(run / "state.json")
        if state is None:
            raise ConsoleError(404, "the run's state.json cannot be read")
        report = _read_json(run / "report.json") or {}
        decision = report.get("decision") or {}
        try:
            report_md: str | None = (run / "report.md").read_text(errors="replace")
        except OSError:
            report_md = None
        return RunView(
            summary=_run_summary(run_id, state, report or None),
            reasons=[str(r) for r in decision.get("reasons", [])],
            margin=decision.get("margin"),
            regressed_negatives=[str(r) for r in decision.get("regressed_negatives", [])],
            prompts=report.get("prompts") or {}, report_md=report_md,
            has_curve=self._curve(run) is not None)

    @staticmethod
    def _curve(run: Path) -> Path | None:
        curve = (run / "reward_curve.png").resolve()
        return curve if curve.parent == run and curve.is_file() else None

    def reward_curve(self, run_id: str) -> Path:
        curve = self._curve(self._run_dir(run_id))
        if curve is None:
            raise ConsoleError(404, "this run has no reward curve")
        return curve

    # Calibration.

    def calibration(self) -> list[Calibration]:
        """One per (judge model, template) among the stored verdicts on labelled items."""
        return guarded(lambda: calibrate_stored(self.store, bootstrap=200))

