"""Measure the PHI redactor: recall per kind of PHI and text retention on the synthetic case set,
and the hostile text its time is measured on (`hostile_shapes`, `hostile_text`).

Each case in `data/phi_cases.jsonl` (all invented) is `{"text", "phi": {KIND: [spans]}, "keep":
[spans]}`. A PHI span counts as removed when neither it nor any of its words of 3+ characters is
left in the redacted text, so a half-redacted name ("Jane [NAME]") is a miss. A keep span counts as
retained when it is still in the redacted text verbatim.

    clinicloop store redaction-recall          # a table
    clinicloop store redaction-recall --json   # the same as JSON
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from clinicloop.store.redact import Rule, redact

PhiKind = Literal["EMAIL", "PHONE", "DATE", "ID", "SSN", "ADDRESS", "URL", "IP", "NAME"]


class PhiCase(BaseModel):
    text: str
    phi: dict[PhiKind, list[str]] = Field(default_factory=dict)
    keep: list[str] = Field(default_factory=list)


class KindScore(BaseModel):
    spans: int
    removed: int

    @property
    def recall(self) -> float:
        return self.removed / self.spans if self.spans else 1.0


class Miss(BaseModel):
    case: int
    kind: str = Field(description="The PHI kind, or KEEP for text that should have survived.")
    span: str
    redacted: str


class RedactionReport(BaseModel):
    cases: int
    per_kind: dict[str, KindScore]
    recall: float = Field(description="Share of all PHI spans removed.")
    keep_total: int
    keep_retained: int
    keep_retention: float = Field(description="Share of keep spans left intact.")
    misses: list[Miss]


def load_cases(path: Path | None = None) -> list[PhiCase]:
    source = path or resources.files("clinicloop.store") / "data" / "phi_cases.jsonl"
    lines = source.read_text(encoding="utf-8").splitlines()
    return [PhiCase.model_validate_json(line) for line in lines if line.strip()]


def _words(word: str, text: str) -> int:
    return len(re.findall(rf"(?<!\w){re.escape(word)}(?!\w)", text))


def _removed(span: str, text: str, redacted: str) -> bool:
    if span in redacted:
        return False
    rest = text.replace(span, " ")
    return all(_words(w, redacted) <= _words(w, rest) for w in re.findall(r"\w{3,}", span))


def evaluate(cases: Sequence[PhiCase]) -> RedactionReport:
    per_kind: dict[str, KindScore] = {}
    misses: list[Miss] = []
    keep_retained = keep_total = 0
    for index, case in enumerate(cases):
        redacted = redact(case.text)
        for kind, spans in case.phi.items():
            score = per_kind.setdefault(kind, KindScore(spans=0, removed=0))
            for span in spans:
                score.spans += 1
                if _removed(span, case.text, redacted):
                    score.removed += 1
                else:
                    misses.append(Miss(case=index, kind=kind, span=span, redacted=redacted))
        for span in case.keep:
            keep_total += 1
            if span in redacted:
                keep_retained += 1
            else:
                misses.append(Miss(case=index, kind="KEEP", span=span, redacted=redacted))
    spans = sum(s.spans for s in per_kind.values())
    return RedactionReport(
        cases=len(cases),
        per_kind=dict(sorted(per_kind.items())),
        recall=sum(s.removed for s in per_kind.values()) / spans if spans else 1.0,
        keep_total=keep_total,
        keep_retained=keep_retained,
        keep_retention=keep_retained / keep_total if keep_total else 1.0,
        misses=misses,
    )


def format_table(report: RedactionReport) -> str:
    rows = [f"{'kind':<8} {'spans':>5} {'removed':>7} {'recall':>7}"]
    rows += [
        f"{kind:<8} {s.spans:>5} {s.removed:>7} {s.recall:>7.3f}"
        for kind, s in report.per_kind.items()
    ]
    total = sum(s.spans for s in report.per_kind.values())
    removed = sum(s.removed for s in report.per_kind.values())
    rows.append(f"{'all':<8} {total:>5} {removed:>7} {report.recall:>7.3f}")
    rows.append(
        f"keep     {report.keep_total:>5} {report.keep_retained:>7} {report.keep_retention:>7.3f}"
        f"   ({report.cases} cases)"
    )
    rows += [f"miss {m.kind}: {m.span!r} in case {m.case}: {m.redacted!r}" for m in report.misses]
    return "\n".join(rows)


# What makes regular expressions slow, whatever the rule: long runs of word characters, dots,
# digits, spaces, capitalised words, "@", "-", and mixes of them.
GENERIC_PIECES = ("a", "A", "Aa ", "é", "1", ".", "-", "@", " ", "\t", "\n", ":", "/", "+", "#")


def runs(example: str) -> list[str]:
    """The example cut into stretches of one kind of character: "Best", ",", "\n", "Gretchen"."""
    return re.findall(r"[^\W\d_]+|\d+|\s+|.", example, re.DOTALL)


def pieces(example: str) -> list[str]:
    """What hostile text for a rule is made of: its example, the example's runs, each of its
    characters, and the generic pieces."""
    return list(dict.fromkeys([example, *runs(example), *example, *GENERIC_PIECES]))


def hostile_text(parts: Sequence[tuple[str, bool]], size: int) -> str:
    """About `size` characters from `parts`, each `(piece, stretched)`: stretched pieces repeat
    until the text reaches `size` (one long run each); with none stretched, the whole repeats."""
    fixed = sum(len(piece) for piece, stretched in parts if not stretched)
    stretched = sum(len(piece) for piece, stretched in parts if stretched)
    if not stretched:
        return "".join(piece for piece, _ in parts) * max(1, size // max(fixed, 1))
    times = max(1, (size - fixed) // stretched)
    return "".join(piece * times if stretched else piece for piece, stretched in parts)


def hostile_shapes(rule: Rule, size: int, seed: int = 0) -> dict[str, str]:
    """Texts of about `size` characters built to be slow for `rule`: its example over and over
    (every match work), near misses (the example cut short or glued to more of itself), the
    example's last character, or the last character of each of its runs, repeated into long
    tokens ("Best,\nGretchennnn…"), and a seeded mix of its pieces."""
    example = rule.example
    mix = random.Random(seed).choices(pieces(example), k=64)
    return {
        "dense": hostile_text([(example + " ", False)], size),
        "glued": hostile_text([(example, False)], size),
        "cut": hostile_text([(example[:-1] + " ", False)], size),
        "tail": hostile_text([(example, False), (example[-1], True), ("1", False)], size),
        "runs": hostile_text(
            [part for run in runs(example) for part in ((run[:-1], False), (run[-1], True))]
            + [("1", False)], size),
        "mix": hostile_text([(piece, False) for piece in mix], size),
    }


def generic_shapes(size: int) -> dict[str, str]:
    """Long runs of each generic piece, and all of them mixed."""
    shapes = {f"run {piece!r}": hostile_text([(piece, True)], size) for piece in GENERIC_PIECES}
    shapes["mixed"] = hostile_text([("".join(GENERIC_PIECES), False)], size)
    return shapes

