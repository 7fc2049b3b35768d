"""PHI redaction: what the log writer applies to every record before anything is persisted.

Each rule is a precompiled regular expression for one kind of identifier (HIPAA Safe Harbor kinds
that show up in chat traffic) and replaces what it matches with a typed placeholder: `[EMAIL]`,
`[PHONE]`, `[DATE]`, `[ID]`, `[SSN]`, `[ADDRESS]`, `[URL]`, `[IP]`, `[NAME]`. Rules run in order,
so the more specific kinds claim text first (an email before a URL's bare domain, an SSN before a
phone number). Rules keyed on a cue ("MRN", "my name is", "Dr.") replace only the value after the
cue and keep the cue, so the text still reads ("MRN [ID]", "Dr. [NAME]").

Rules are RE2 expressions (google-re2), which match in time linear in the text whatever the text:
a backtracking engine (Python's `re`) took tens of seconds on one 20 kB message, holding the GIL.
RE2 has no lookarounds, so a rule that must not start inside a token names the characters that
may not come right before it (`not_after`, one character checked in Python), and a rule that must
not stop inside one matches the character after it (outside its `value` group, so it is kept).
Name rules are Unicode-aware ("José García", "Zoë O’Connor", "María de la Cruz").

False positives cost too: the logged text trains and evaluates the model, so ages ("45-year-old"),
durations, doses and vitals ("140/90") have no rule that matches them, and names need a cue and a
capitalised word ("I'm Daniel", not "I'm worried" or "I'm 45"). Names without a cue are not found.
`redact_record` applies the rules to every string of a record that a client sent or a model wrote
(messages, choices, parameters, keys of free-form objects included), except a base64 `data:` URL.
`clinicloop store redaction-recall` measures recall and retention on `data/phi_cases.jsonl`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import re2

from clinicloop.store.records import TurnRecord

# Character classes (RE2 syntax; `\d`, `\w`, `\s` and `\b` are ASCII in RE2, so Unicode text
# uses `\p{..}` classes).
_LETTER = r"\p{L}\p{M}"  # a letter, or a combining mark of a decomposed one ("e" + U+0301)
_WORD = r"\p{L}\p{M}\p{N}_"
_SPACE = r"\s\p{Z}"
_UPPER = r"\p{Lu}"
_LOWER = r"[\p{Ll}\p{M}]"
_CAP = rf"{_UPPER}{_LOWER}+"  # a capitalised word: "Maple", "Bogotá"

# A capitalised name word: "Jane", "José", "O'Brien", "McDonald", "Lopez-Garcia"; not "HIV" or "I".
_NAME_WORD = rf"{_UPPER}(?:{_LOWER}*['’]{_UPPER})?{_LOWER}+(?:-?{_CAP})*"
# Lower-case particles inside a name: "María de la Cruz", "Ludwig van Beethoven", "García y Vega".
_PARTICLE = r"(?:d[aeiou]|de[lns]|della|dos|das|la|le|van|von|der|ter|bin|ibn|al|el|y)"
# Up to three words, with an optional middle initial or particles: "Jane Q. Public".
_NAME = (
    rf"(?P<value>{_NAME_WORD}"
    rf"(?:[ \t]+(?:{_UPPER}\.[ \t]+)?(?:{_PARTICLE}[ \t]+){{0,2}}{_NAME_WORD}){{0,2}})"
)
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
_CITY_STATE_ZIP = rf"\b{_CAP}(?:[ \t]{_CAP}){{0,2}},[ \t]*[A-Z]{{2}}[ \t]+\d{{5}}(?:-\d{{4}})?\b"
_HEX4 = r"[0-9A-Fa-f]{1,4}"
_EMAIL_LABEL = rf"[{_LETTER}\p{{N}}-]+"  # a domain label: "example", "españa", "xn--bcher-kva"
# What may follow a number so that it ends there (matched, and kept): not another digit.
_NUMBER_END = r"(?:\D|$)"
# RE2's default memory budget (8 MiB) makes its DFA give up on the larger Unicode rules and fall
# back to the (still linear, but slower) NFA.
_OPTIONS = re2.Options()
_OPTIONS.max_mem = 64 << 20


class Rule:
    """One kind of PHI: an RE2 pattern, run over the text's UTF-8 bytes (RE2's own encoding, so
    no offsets are converted per match), and the checks RE2 cannot express. `example` is text it
    redacts: the tests check that it does, and build hostile text for the rule from it."""

    def __init__(self, label: str, example: str, pattern: str, *, not_after: str | None = None,
                 accept: Callable[[str], bool] | None = None) -> None:
        self.label = label
        self.example = example
        self.placeholder = f"[{label}]".encode()
        self.regex = re2.compile(pattern.encode(), _OPTIONS)
        self.value = self.regex.groupindex.get(b"value", 0)  # the group replaced; 0: the match
        # Characters that may not come right before the replaced text: it would start inside a
        # token. (Rules with a cue have none; in the others the replaced text starts the match.)
        self.not_after = None if not_after is None else re.compile(f"[{not_after}]")
        self._ascii_not_after = frozenset(
            b for b in range(128) if self.not_after is not None and self.not_after.match(chr(b)))
        # A last word on the replaced text ("I'm Catholic" has a name cue but no name).
        self.accept = accept

    def apply(self, text: bytes) -> bytes:
        pieces: list[bytes] = []
        done = 0
        for match in self.regex.finditer(text):
            start, end = match.span(self.value)
            if start < 0 or self._starts_inside_token(text, start) or (
                    self.accept is not None and not self.accept(text[start:end].decode())):
                continue
            pieces.append(text[done:start])
            pieces.append(self.placeholder)
            done = end
        pieces.append(text[done:])
        return b"".join(pieces)

    def _starts_inside_token(self, text: bytes, start: int) -> bool:
        """Whether the one character before `start` is one of `not_after`: a check of at most
        4 bytes, never a scan."""
        if self.not_after is None or start == 0:
            return False
        if text[start - 1] < 0x80:
            return text[start - 1] in self._ascii_not_after
        first = start - 1
        while first > start - 4 and text[first] & 0xC0 == 0x80:  # back to the character's lead
            first -= 1
        return self.not_after.match(text[first:start].decode()) is not None


def _is_name(value: str) -> bool:
    return value.split()[0] not in _NOT_NAMES


def _has_digit(value: str) -> bool:
    token = value.split(maxsplit=1)[0]
    return any(digit in token for digit in "0123456789")


def _rules() -> list[Rule]:
    # Words that are an id's cue by themselves, and words that are one only with a suffix
    # ("patient ID", "policy #") or a colon ("Policy: ..."); "patient 45" is no id.
    id_suffix = r"(?:[ \t]+(?:id|number|no\.|no\b|num|#)|[ \t]*#)"
    id_cue = (
        r"(?i:\b(?:(?:MRN|medicare|medicaid|ID)\b" + id_suffix + "?"
        r"|(?:medical[ \t]+record|record|chart|patient|member(?:ship)?|subscriber|policy"
        r"|insurance|group|account|acct|claim|case|rx|prescription|licen[cs]e)"
        r"(?:" + id_suffix + r"|[ \t]*:))"
        r"(?:[ \t]*(?:is\b|was\b|=|:|#))*[ \t]*)"
    )
    # Dates with one separator used twice ("2024-03-14", "14/03/2024"): one alternative per
    # separator, RE2 having no backreferences.
    dates = "|".join(
        rf"\d{{4}}{sep}\d{{1,2}}{sep}\d{{1,2}}"
        rf"(?:[T ]\d{{2}}:\d{{2}}(?::\d{{2}}(?:\.\d+)?)?(?:Z|[+-]\d{{2}}:?\d{{2}})?)?"
        rf"|\d{{1,2}}{sep}\d{{1,2}}{sep}(?:\d{{4}}|\d{{2}})"
        for sep in ("/", r"\.", "-")
    )
    not_url = rf"{_SPACE}<>\"'"
    return [
        Rule(
            "EMAIL", "jane.doe84@example.com",
            rf"[{_WORD}.%+-]+@{_EMAIL_LABEL}(?:\.{_EMAIL_LABEL})*\.[{_LETTER}]{{2,}}",
            not_after=r"\w.%+-",
        ),
        Rule(
            "URL", "https://mychart.example.org/p/1",
            rf"(?:\b(?:https?|ftp)://|\bwww\.)[^{not_url}\]]*[^{not_url}\].,;:!?)]",
        ),
        Rule(
            "URL", "portal.example.com/visits",
            rf"(?i:(?:[{_LETTER}\p{{N}}-]+\.)+(?:com|org|net|edu|gov|io)\b"
            rf"(?:/[^{not_url}]*[^{not_url}.,;:!?)])?)",
            not_after=r"\w.-",
        ),
        Rule(
            "IP", "fe80::1ff:fe23:4567:890a",
            rf"(?P<value>(?:(?:{_HEX4}:){{7}}{_HEX4}"
            rf"|{_HEX4}(?::{_HEX4})*::(?:{_HEX4}(?::{_HEX4})*)?|::{_HEX4}(?::{_HEX4})*)"
            rf"(?::\d{{1,3}}(?:\.\d{{1,3}}){{3}})?)(?:[^0-9A-Za-z_:]|$)",
            not_after=r"\w:",
        ),
        # Not part of a longer dotted number ("version 1.2.3.4.5"); a full stop may end it.
        Rule(
            "IP", "192.168.14.201",
            r"(?P<value>(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d))"
            r"\.*(?:[^\d.]|$)",
            not_after=r"\d.",
        ),
        Rule("SSN", "123-45-6789", r"(?P<value>\d{3}-\d{2}-\d{4})(?:[^\d-]|$)", not_after=r"\d-"),
        # Dotted, and not part of a longer dotted number ("build 10.123.45.6789"); a full stop
        # may end it.
        Rule(
            "SSN", "123.45.6789", r"(?P<value>\d{3}\.\d{2}\.\d{4})(?:[^\d.-]|\.(?:\D|$)|$)",
            not_after=r"\d.-",
        ),
        Rule(
            "SSN", "SSN is 123 45 6789",
            r"(?i:\b(?:SSN|SS#|social[ \t]+security)(?:[ \t]+(?:number|no\.|#))?"
            r"(?:[ \t]*(?:is\b|:|#))*[ \t]*)(?P<value>\d{3}[ .-]?\d{2}[ .-]?\d{4})" + _NUMBER_END,
        ),
        # An id is an upper-case token of 4+ characters with a digit after a cue: "MRN 00482913",
        # "member ID: XJH-448-2291"; "Patient: 45-year-old" is no id.
        Rule(
            "ID", "MRN: 00482913",
            id_cue + r"(?P<value>[A-Z0-9][A-Z0-9-]{2,}[A-Z0-9](?:[ \t]\d{3,})*)\b",
            accept=_has_digit,
        ),
        Rule(
            "DATE", "March 14, 1962",
            rf"\b{_MONTH}\.?[ \t]+{_DAY}(?:,?[ \t]+(?:19|20)\d{{2}}\b)?"
            rf"|\b{_DAY}(?:[ \t]+of)?[ \t]+{_MONTH}\b\.?(?:,?[ \t]+(?:19|20)\d{{2}}\b)?"
            rf"|\b{_MONTH}\.?(?:[ \t]+of)?,?[ \t]+(?:19|20)\d{{2}}\b",
        ),
        Rule(
            "DATE", "2024-03-14T10:30:00Z",
            rf"(?P<value>{dates}|(?:0?[1-9]|1[0-2])/(?:19|20)\d{{2}})(?:[^\d/]|$)",
            not_after=r"\d/.-",
        ),
        Rule(
            "PHONE", "+1 (555) 867-5309 ext 12",
            r"(?P<value>(?:\+1[ .-]?|\b1[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}"
            r"(?:[ \t]*(?:x|ext\.?|extension)[ \t]*\d{1,5})?)" + _NUMBER_END,
            not_after=r"\w+",
        ),
        Rule(
            "PHONE", "+44 20 7946 0958",
            r"(?P<value>\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4})"
            + _NUMBER_END,
            not_after=r"\w",
        ),
        Rule(
            "PHONE", "call me on 8675309",
            r"(?i:\b(?:phone|tel|telephone|cell|mobile|fax|pager|call|text|number)\b[^\d\n]{0,20})"
            r"(?P<value>\d{3}[ .-]?\d{4}|\d{10})" + _NUMBER_END,
        ),
        Rule(
            "ADDRESS", "1420 N. Maple Avenue, Apt 3B, Springfield, IL 62704",
            rf"\b\d{{1,6}}[A-Z]?[ \t]+(?:(?:[NSEW]\.?|North|South|East|West)[ \t]+)?"
            rf"(?:(?:{_CAP}|\d{{1,3}}(?:st|nd|rd|th))[ \t]+){{1,4}}{_STREET_SUFFIX}\b\.?"
            r"(?:,?[ \t]*(?:Apt|Apartment|Suite|Ste|Unit|#)\.?[ \t]*#?[A-Za-z0-9-]+)?"
            rf"(?:,[ \t]*{_CITY_STATE_ZIP})?",
        ),
        Rule(
            "ADDRESS", "PO Box 7781",
            r"(?i:\b(?:P\.?[ \t]?O\.?|post[ \t]+office)[ \t]*box[ \t]+\d+\b)",
        ),
        Rule("ADDRESS", "Springfield, IL 62704", _CITY_STATE_ZIP),
        Rule(
            "ADDRESS", "zip code: 62704",
            r"(?i:\bzip(?:[ \t]*code)?(?:[ \t]*(?:is\b|:))*[ \t]*)(?P<value>\d{5}(?:-\d{4})?)\b",
        ),
        # Titles first, so "I'm Dr. Lee" leaves "Dr" to the stop list below.
        Rule(
            "NAME", "Dr. Okonkwo",
            r"\b(?:Mr|Mrs|Ms|Mx|Dr|Miss|Prof|Doctor)\.?[ \t]+" + _NAME,
            accept=_is_name,
        ),
        Rule(
            "NAME", "My name is José García",
            r"(?i:\b(?:name(?:'s|’s|[ \t]+is)|I'm|I’m|I[ \t]+am|call[ \t]+me"
            r"|(?:hi|hello|hey)[,!]?[ \t]+(?:this[ \t]+is|it's|it’s|it[ \t]+is)"
            r"|my[ \t]+(?:son|daughter|wife|husband|partner|mother|father|mom|mum|dad|brother"
            r"|sister|child|baby|grandson|granddaughter|grandmother|grandfather),?)[ \t]+)"
            + _NAME,
            accept=_is_name,
        ),
        Rule(
            "NAME", "Patient: Samuel O'Brien",
            r"(?i:\b(?:patient|pt|(?:full[ \t]+|patient[ \t]+)?name)[ \t]*:[ \t]*)" + _NAME,
            accept=_is_name,
        ),
        # A sign-off: the name alone on the rest of the line ("Best,\nGretchen").
        Rule(
            "NAME", "Best,\nGretchen",
            r"(?i:\b(?:thanks|thank[ \t]+you|regards|best|sincerely|cheers)[,!.]?[ \t]*\n?[ \t]*)"
            + _NAME
            + r"[ \t]*[.!]?[ \t]*(?:\n|$)",
            accept=_is_name,
        ),
    ]


RULES = _rules()


def redact(text: str) -> str:
    """Replace every PHI span found in `text` with its typed placeholder. A lone surrogate, which
    is no character and which no store can encode, becomes "?"."""
    data = text.encode("utf-8", "replace")
    for rule in RULES:
        data = rule.apply(data)
    return data.decode()


# A base64 `data:` URL (an image part) is a payload, not text: rewriting it would corrupt it.
_DATA_URL = re2.compile(r"data:[\w.+-]+/[\w.+-]+;base64,[A-Za-z0-9+/=\s]*")


def _redact_string(text: str) -> str:
    return text if _DATA_URL.fullmatch(text) else redact(text)


def redact_tree(value: Any) -> Any:
    """A copy of a JSON-like value with every string in it redacted, dictionary keys included
    (a free-form object's keys are text a client chose). Iterative, so no nesting is too deep.
    Two keys that redact to the same text keep one of their values."""
    root: list[Any] = [None]
    stack: list[tuple[Any, Any, Any]] = [(value, root, 0)]  # (value, its copy's container, slot)
    while stack:
        item, container, slot = stack.pop()
        if isinstance(item, str):
            container[slot] = _redact_string(item)
        elif isinstance(item, dict):
            copy: dict[Any, Any] = {}
            container[slot] = copy
            for key, child in item.items():
                new_key = _redact_string(key) if isinstance(key, str) else key
                copy[new_key] = None
                stack.append((child, copy, new_key))
        elif isinstance(item, list | tuple):
            items: list[Any] = [None] * len(item)
            container[slot] = items
            stack.extend((child, items, i) for i, child in enumerate(item))
        else:
            container[slot] = item
    return root[0]


def redact_json_text(text: str) -> str:
    """`text` redacted; when it is a JSON object or array (a tool call's arguments, a tool's
    result), each string in it is redacted with its key in front as the cue a rule needs
    (`"patient": "Ana Ruiz"` reads as `patient: Ana Ruiz`), keys included, and the JSON is
    written again if anything was redacted."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json reads
        return redact(text)
    if not isinstance(value, dict | list):
        return redact(text)
    stack: list[Any] = [value]
    changed = False
    while stack:
        item = stack.pop()
        slots = list(item.items()) if isinstance(item, dict) else list(enumerate(item))
        if isinstance(item, dict):
            item.clear()
        for key, child in slots:
            new_key = redact(key) if isinstance(item, dict) else key
            new = child
            if isinstance(child, str):
                cued = redact(f"{new_key}: {child}") if isinstance(new_key, str) else ""
                new = cued.removeprefix(f"{new_key}: ") if cued.startswith(f"{new_key}: ") \
                    else redact(child)
            elif isinstance(child, dict | list):
                stack.append(child)
            changed = changed or new_key != key or new != child
            item[new_key] = new
    # Unchanged, the text is kept as written (a reply's arguments read back the same).
    return json.dumps(value, ensure_ascii=False) if changed else text


def _redact_calls(calls: Any) -> Any:
    """Tool calls (OpenAI's shape) with every string redacted, the arguments as JSON text."""
    if not isinstance(calls, list):
        return redact_tree(calls)
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        copy = redact_tree(call)
        if isinstance(arguments, str):
            copy["function"]["arguments"] = redact_json_text(arguments)
        out.append(copy)
    return out


def _redact_message(message: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = redact_tree(message)
    # A participant name on a user/assistant message is a person's name; on a tool message it
    # names the function, which is not PHI.
    if isinstance(message.get("name"), str) and message.get("role") not in ("tool", "function"):
        out["name"] = "[NAME]"
    if "tool_calls" in message:
        out["tool_calls"] = _redact_calls(message["tool_calls"])
    if message.get("role") == "tool" and isinstance(message.get("content"), str):
        out["content"] = redact_json_text(message["content"])
    return out


def redact_record(record: TurnRecord) -> TurnRecord:
    """A copy of `record` with every string a client sent or a model wrote redacted: messages
    (every field, nested content parts, tool calls and results included; JSON arguments and
    results with their keys as cues), responses and their calls, reasoning, error and
    request parameters (`stop`, `chat_template_kwargs`, schemas, tools)."""
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
                        "tool_calls": None
                        if c.tool_calls is None
                        else _redact_calls(c.tool_calls),
                    }
                )
                for c in record.choices
            ],
            "params": redact_tree(record.params),
            "error": None if record.error is None else redact(record.error),
        }
    )
