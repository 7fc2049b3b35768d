"""Incremental text post-processing shared by streamed and non-streamed responses.

Both response modes feed generated text through these, piece by piece, so a stop string or a
`</think>` tag split across tokens is found the same way in both and the streamed deltas join to the
non-streamed text. Each class holds back only the tail that could still turn into a match.
"""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def _partial_suffix(text: str, needle: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `needle`."""
    for n in range(min(len(text), len(needle) - 1), 0, -1):
        if needle.startswith(text[-n:]):
            return n
    return 0


class StopMatcher:
    """Cuts the text at the first stop string; the stop string itself is never released."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Return (text safe to release, whether a stop string was hit)."""
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return buf[: min(hits)], True
        hold = max((_partial_suffix(buf, s) for s in self.stops), default=0)
        self._held = buf[len(buf) - hold:]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out


class ReasoningSplitter:
    """Splits output into reasoning (before `</think>`) and content (after it).

    `in_reasoning=True` when the prompt already opened the think block (thinking_mode on);
    otherwise output is reasoning only if it starts with `<think>`. Whitespace around the tags is
    dropped, as chat templates put newlines there.
    """

    def __init__(self, in_reasoning: bool) -> None:
        self._state = "reasoning_start" if in_reasoning else "undecided"
        self._held = ""

    def push(self, text: str) -> tuple[str, str]:
        """Return (reasoning, content) safe to release."""
        self._held += text
        reasoning = content = ""
        while self._held:
            if self._state == "undecided":
                if self._held.startswith(THINK_OPEN):
                    self._held = self._held[len(THINK_OPEN):]
                    self._state = "reasoning_start"
                elif THINK_OPEN.startswith(self._held):
                    break
                else:
                    self._state = "content"
            elif self._state == "reasoning":
                end = self._held.find(THINK_CLOSE)
                if end >= 0:
                    reasoning += self._held[:end].rstrip()
                    self._held = self._held[end + len(THINK_CLOSE):]
                    self._state = "content_start"
                    continue
                # Hold a possible partial tag and trailing whitespace that may precede the tag.
                keep = len(self._held) - _partial_suffix(self._held, THINK_CLOSE)
                keep = len(self._held[:keep].rstrip())
                reasoning += self._held[:keep]
                self._held = self._held[keep:]
                break
            elif self._state in ("reasoning_start", "content_start"):
                self._held = self._held.lstrip()
                if self._held:
                    self._state = self._state.removesuffix("_start")
            else:
                content += self._held
                self._held = ""
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        if self._state.startswith("reasoning"):
            return held.strip(), ""
        return "", held if self._state in ("undecided", "content") else held.lstrip()
