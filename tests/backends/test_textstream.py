"""Stop strings and the reasoning split must give the same text however the output is chunked."""

import pytest

from clinicloop.backends.textstream import ReasoningSplitter, StopMatcher


def _chunkings(text: str):
    yield [text]
    yield list(text)
    yield [text[i:i + 3] for i in range(0, len(text), 3)]


def _stop_run(stops, pieces):
    m = StopMatcher(stops)
    out = ""
    for p in pieces:
        released, hit = m.push(p)
        out += released
        if hit:
            return out, True
    return out + m.flush(), False


@pytest.mark.parametrize("text,stops,expected,hit", [
    ("hello world. bye", ["."], "hello world", True),
    ("abc END def", ["END", "de"], "abc ", True),
    ("no stop here", ["STOP"], "no stop here", False),
    ("ends with partial ST", ["STOP"], "ends with partial ST", False),
    ("x\n\nUser: y", ["\n\nUser:"], "x", True),
])
def test_stop_matcher_any_chunking(text, stops, expected, hit):
    for pieces in _chunkings(text):
        assert _stop_run(stops, pieces) == (expected, hit)


def _split_run(in_reasoning, pieces):
    s = ReasoningSplitter(in_reasoning)
    reasoning = content = ""
    for p in pieces:
        r, c = s.push(p)
        reasoning, content = reasoning + r, content + c
    r, c = s.flush()
    return reasoning + r, content + c


@pytest.mark.parametrize("in_reasoning,text,expected", [
    (True, "chest pain is a red flag\n</think>\n\nCall 911 now.", (
        "chest pain is a red flag", "Call 911 now.")),
    (False, "<think>\nthink a bit\n</think>\n\nRest and fluids.",
     ("think a bit", "Rest and fluids.")),
    (False, "Rest and fluids.", ("", "Rest and fluids.")),
    (False, "<thin", ("", "<thin")),
    (True, "never closes  ", ("never closes", "")),
    (True, "a < b </thi but not closed", ("a < b </thi but not closed", "")),
])
def test_reasoning_split_any_chunking(in_reasoning, text, expected):
    for pieces in _chunkings(text):
        assert _split_run(in_reasoning, pieces) == expected
