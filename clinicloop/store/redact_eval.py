"""Measure the PHI redactor on the synthetic case set: recall per kind of PHI and text retention.

Each case in `data/phi_cases.jsonl` (all invented) is `{"text", "phi": {KIND: [spans]}, "keep":
[spans]}`. A PHI span counts as removed when neither it nor any of its words of 3+ characters is
left in the redacted text, so a half-redacted name ("Jane [NAME]") is a miss. A keep span counts as
retained when it is still in the redacted text verbatim.

    python -m clinicloop.store.redact_eval          # a table
    python -m clinicloop.store.redact_eval --json   # the same as JSON

It prints and writes nothing else.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from clinicloop.store.redact import redact

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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--cases", type=Path, help="a JSONL case file instead of the shipped one")
    args = parser.parse_args(argv)
    report = evaluate(load_cases(args.cases))
    print(report.model_dump_json(indent=2) if args.json else format_table(report))


if __name__ == "__main__":
    main()
