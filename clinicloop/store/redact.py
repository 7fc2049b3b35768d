"""PHI redaction: what the log writer applies to every record before anything is persisted.

Each rule is a precompiled regular expression for one kind of identifier (HIPAA Safe Harbor kinds
that show up in chat traffic) and replaces what it matches with a typed placeholder: `[EMAIL]`,
`[PHONE]`, `[DATE]`, `[ID]`, `[SSN]`, `[ADDRESS]`, `[URL]`, `[IP]`, `[NAME]`. Rules run in order,
so the more specific kinds claim text first (an email before a URL's bare domain, an SSN before a
phone number). Rules keyed on a cue ("MRN", "my name is", "Dr.") replace only the value after the
cue and keep the cue, so the text still reads ("MRN [ID]", "Dr. [NAME]").

False positives cost too: the logged text trains and evaluates the model, so ages ("45-year-old"),
durations, doses and vitals ("140/90") have no rule that matches them, and names need a cue and a
capitalised word ("I'm Daniel", not "I'm worried" or "I'm 45"). Names without a cue are not found.
`python -m clinicloop.store.redact_eval` measures recall and retention on `data/phi_cases.jsonl`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from clinicloop.store.records import TurnRecord

# A capitalised name word: "Jane", "O'Brien", "McDonald", "Lopez-Garcia"; not "HIV" or "I".
_NAME_WORD = r"[A-Z][a-z]*(?:['’][A-Z])?[a-z]+(?:[A-Z][a-z]+)?(?:-[A-Z][a-z]+)?"
# Up to three words, with an optional middle initial: "Jane Q. Public".
_NAME = rf"(?P<value>{_NAME_WORD}(?:[ \t]+(?:[A-Z]\.[ \t]+)?{_NAME_WORD}){{0,2}})"
# Capitalised words that follow a name cue but are not names ("I'm Catholic", "Thanks, Doctor").
_NOT_NAMES = frozenset("""
    Mr Mrs Ms Mx Dr Miss Prof Doctor Doc Nurse Sir Madam Team All Everyone Regards Wishes
    Not Also Just Still Currently Really Very So Sorry Okay Ok Fine Sure Here Back On In At
    Type Allergic Pregnant Diabetic Asthmatic Vegan Vegetarian Retired Married Single
    American Asian Black White Hispanic Latino Latina Native African European Indian Chinese
    Mexican British Canadian Catholic Christian Jewish Muslim Hindu Buddhist Mormon
""".split())

_MONTH = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
    r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
)
_DAY = r"(?:3[01]|[12]\d|0?[1-9])(?:st|nd|rd|th)?\b"
_STREET_SUFFIX = (
    r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Place|Pl"
    r"|Terrace|Ter|Way|Circle|Cir|Highway|Hwy|Parkway|Pkwy|Square|Sq|Trail|Trl|Alley)"
)
_CITY_STATE_ZIP = r"\b[A-Z][a-z]+(?:[ \t][A-Z][a-z]+){0,2},[ \t]*[A-Z]{2}[ \t]+\d{5}(?:-\d{4})?\b"
_HEX4 = r"[0-9A-Fa-f]{1,4}"


# Every pattern starts only where its text can start (a lookbehind rather than `\b` inside a run
# like "a.b.c") and bounds its repetitions, so no input makes a rule quadratic: a pasted log or
# a long token must not stall the writer.


@dataclass(frozen=True)
class _Rule:
    label: str
    pattern: re.Pattern[str]
    accept: Callable[[str], bool] | None = None

    def apply(self, text: str) -> str:
        return self.pattern.sub(self._replace, text)

    def _replace(self, match: re.Match[str]) -> str:
        # A `value` group marks the part to replace; the cue around it stays.
        has_value = "value" in match.re.groupindex and match.start("value") >= 0
        start, end = match.span("value") if has_value else match.span()
        if self.accept is not None and not self.accept(match.string[start:end]):
            return match.group(0)
        whole = match.group(0)
        return whole[: start - match.start()] + f"[{self.label}]" + whole[end - match.start() :]


def _is_name(value: str) -> bool:
    return value.split()[0] not in _NOT_NAMES


def _rules() -> list[_Rule]:
    def rule(label: str, pattern: str, accept: Callable[[str], bool] | None = None) -> _Rule:
        return _Rule(label, re.compile(pattern), accept)

    # Words that are an id's cue by themselves, and words that are one only with a suffix
    # ("patient ID", "policy #") or a colon ("Policy: ..."); "patient 45" is no id.
    id_suffix = r"(?:[ \t]+(?:id|number|no\.|no\b|num|#)|[ \t]*#)"
    id_cue = (
        r"(?i:\b(?:(?:MRN|medicare|medicaid|ID)\b" + id_suffix + "?"
        r"|(?:medical[ \t]+record|record|chart|patient|member(?:ship)?|subscriber|policy"
        r"|insurance|group|account|acct|claim|case|rx|prescription|licen[cs]e)"
        r"(?:" + id_suffix + r"|(?=[ \t]*:)))"
        r"(?:[ \t]*(?:is\b|was\b|=|:|#))*[ \t]*)"
    )
    return [
        rule(
            "EMAIL",
            r"(?<![\w.%+-])[\w.%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b",
        ),
        rule("URL", r"(?:\b(?:https?|ftp)://|\bwww\.)[^\s<>\"'\]]*[^\s<>\"'\].,;:!?)]"),
        rule(
            "URL",
            r"(?i:(?<![\w.-])(?:[a-z0-9-]+\.)+(?:com|org|net|edu|gov|io)\b"
            r"(?:/[^\s<>\"']*[^\s<>\"'.,;:!?)])?)",
        ),
        rule(
            "IP",
            rf"(?<![\w:])(?:(?:{_HEX4}:){{7}}{_HEX4}"
            rf"|{_HEX4}(?::{_HEX4})*::(?:{_HEX4}(?::{_HEX4})*)?|::{_HEX4}(?::{_HEX4})*)"
            r"(?::\d{1,3}(?:\.\d{1,3}){3})?(?![\w:])",
        ),
        rule("IP", r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)"
             r"(?![\d.]*\d)"),
        rule("SSN", r"(?<![\d-])\d{3}-\d{2}-\d{4}(?![\d-])"),
        rule(
            "SSN",
            r"(?i:\b(?:SSN|SS#|social[ \t]+security)(?:[ \t]+(?:number|no\.|#))?"
            r"(?:[ \t]*(?:is\b|:|#))*[ \t]*)(?P<value>\d{3}[ -]?\d{2}[ -]?\d{4})(?!\d)",
        ),
        # An id is an upper-case token of 4+ characters with a digit after a cue: "MRN 00482913",
        # "member ID: XJH-448-2291"; "Patient: 45-year-old" is no id.
        rule(
            "ID",
            id_cue + r"(?P<value>(?=[A-Z0-9-]*\d)[A-Z0-9][A-Z0-9-]{2,}[A-Z0-9](?:[ \t]\d{3,})*)\b",
        ),
        rule(
            "DATE",
            rf"\b{_MONTH}\.?[ \t]+{_DAY}(?:,?[ \t]+(?:19|20)\d{{2}}\b)?"
            rf"|\b{_DAY}(?:[ \t]+of)?[ \t]+{_MONTH}\b\.?(?:,?[ \t]+(?:19|20)\d{{2}}\b)?"
            rf"|\b{_MONTH}\.?(?:[ \t]+of)?,?[ \t]+(?:19|20)\d{{2}}\b",
        ),
        rule(
            "DATE",
            r"(?<![\d/.-])(?:\d{4}([/.-])\d{1,2}\1\d{1,2}"
            r"(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?"
            r"|\d{1,2}([/.-])\d{1,2}\2(?:\d{4}|\d{2})"
            r"|(?:0?[1-9]|1[0-2])/(?:19|20)\d{2})(?![\d/])",
        ),
        rule(
            "PHONE",
            r"(?<![\w+])(?:\+?1[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}"
            r"(?:[ \t]*(?:x|ext\.?|extension)[ \t]*\d{1,5})?(?!\d)",
        ),
        rule(
            "PHONE",
            r"(?<!\w)\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}(?!\d)",
        ),
        rule(
            "PHONE",
            r"(?i:\b(?:phone|tel|telephone|cell|mobile|fax|pager|call|text|number)\b[^\d\n]{0,20})"
            r"(?P<value>\d{3}[ .-]?\d{4}|\d{10})(?!\d)",
        ),
        rule(
            "ADDRESS",
            rf"\b\d{{1,6}}[A-Z]?[ \t]+(?:(?:[NSEW]\.?|North|South|East|West)[ \t]+)?"
            rf"(?:(?:[A-Z][a-z]+|\d{{1,3}}(?:st|nd|rd|th))[ \t]+){{1,4}}{_STREET_SUFFIX}\b\.?"
            r"(?:,?[ \t]*(?:Apt|Apartment|Suite|Ste|Unit|#)\.?[ \t]*#?[A-Za-z0-9-]+)?"
            rf"(?:,[ \t]*{_CITY_STATE_ZIP})?",
        ),
        rule("ADDRESS", r"(?i:\b(?:P\.?[ \t]?O\.?|post[ \t]+office)[ \t]*box[ \t]+\d+\b)"),
        rule("ADDRESS", _CITY_STATE_ZIP),
        rule(
            "ADDRESS",
            r"(?i:\bzip(?:[ \t]*code)?(?:[ \t]*(?:is\b|:))*[ \t]*)(?P<value>\d{5}(?:-\d{4})?)\b",
        ),
        # Titles first, so "I'm Dr. Lee" leaves "Dr" to the stop list below.
        rule("NAME", r"\b(?:Mr|Mrs|Ms|Mx|Dr|Miss|Prof|Doctor)\.?[ \t]+" + _NAME, _is_name),
        rule(
            "NAME",
            r"(?i:\b(?:name(?:'s|’s|[ \t]+is)|I'm|I’m|I[ \t]+am|call[ \t]+me"
            r"|(?:hi|hello|hey)[,!]?[ \t]+(?:this[ \t]+is|it's|it’s|it[ \t]+is)"
            r"|my[ \t]+(?:son|daughter|wife|husband|partner|mother|father|mom|mum|dad|brother"
            r"|sister|child|baby|grandson|granddaughter|grandmother|grandfather),?)[ \t]+)"
            + _NAME,
            _is_name,
        ),
        rule(
            "NAME",
            r"(?i:\b(?:patient|pt|(?:full[ \t]+|patient[ \t]+)?name)[ \t]*:[ \t]*)" + _NAME,
            _is_name,
        ),
        # A sign-off: the name alone on the rest of the line ("Best,\nGretchen").
        rule(
            "NAME",
            r"(?im:\b(?:thanks|thank[ \t]+you|regards|best|sincerely|cheers)[,!.]?[ \t]*\n?[ \t]*)"
            + _NAME
            + r"(?=[ \t]*[.!]?[ \t]*(?:\n|$))",
            _is_name,
        ),
    ]


_RULES = _rules()


def redact(text: str) -> str:
    """Replace every PHI span found in `text` with its typed placeholder."""
    for rule in _RULES:
        text = rule.apply(text)
    return text


def _redact_message(message: dict[str, Any]) -> dict[str, Any]:
    out = dict(message)
    content = message.get("content")
    if isinstance(content, str):
        out["content"] = redact(content)
    elif isinstance(content, list):
        out["content"] = [
            {**part, "text": redact(part["text"])}
            if isinstance(part, dict) and isinstance(part.get("text"), str)
            else part
            for part in content
        ]
    # A participant name on a user/assistant message is a person's name; on a tool message it
    # names the function, which is not PHI.
    if isinstance(message.get("name"), str) and message.get("role") not in ("tool", "function"):
        out["name"] = "[NAME]"
    return out


def redact_record(record: TurnRecord) -> TurnRecord:
    """A copy of `record` with its messages, responses, reasoning and error text redacted."""
    return record.model_copy(
        update={
            "messages": [_redact_message(m) for m in record.messages],
            "choices": [
                c.model_copy(
                    update={
                        "content": redact(c.content),
                        "reasoning_content": None
                        if c.reasoning_content is None
                        else redact(c.reasoning_content),
                    }
                )
                for c in record.choices
            ],
            "error": None if record.error is None else redact(record.error),
        }
    )
