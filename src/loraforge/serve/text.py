"""Incremental text filters for streamed generation: stop strings and reasoning/answer splitting.

Both hold back only the few characters that could be the start of a marker, so streamed text appears as soon
as it is certain and the concatenated stream always equals the non-streamed result.
"""

from __future__ import annotations

from typing import Sequence


def _partial_suffix(text: str, markers: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``markers``."""
    best = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:k]):
                best = k
                break
    return best


class StopStringFilter:
    """Cuts the text at the first occurrence of any stop string (the stop string itself is not emitted)."""

    def __init__(self, stops: Sequence[str] | None):
        self.stops = [s for s in (stops or []) if s]
        self.stopped = False
        self._buffer = ""

    def feed(self, text: str) -> str:
        """Add streamed text; return the part that is certain not to belong to a stop string."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        self._buffer += text
        hits = [i for i in (self._buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self._buffer, self.stopped = self._buffer[:min(hits)], "", True
            return out
        keep = _partial_suffix(self._buffer, self.stops)
        out = self._buffer[:len(self._buffer) - keep]
        self._buffer = self._buffer[len(self._buffer) - keep:]
        return out

    def flush(self) -> str:
        """The held-back text at the end of the stream."""
        out, self._buffer = ("" if self.stopped else self._buffer), ""
        return out


class ReasoningSplitter:
    """Splits ``<think>reasoning</think>answer`` as it streams into ("reasoning", text) and ("content", text).

    ``in_reasoning`` is for templates whose prompt already opens the reasoning block; ``detect=False`` treats
    everything as the answer (the prompt closed the block already, or the model has no thinking mode). Newlines
    right after the opening tag and right after the closing tag are dropped (Qwen3 writes
    ``<think>\\n...\\n</think>\\n\\n``).
    """

    MAX_LEADING_SPACE = 32  # whitespace held while waiting to see whether a reasoning block opens

    def __init__(self, open_tag: str = "<think>", close_tag: str = "</think>", *, in_reasoning: bool = False,
                 detect: bool = True):
        self.open_tag, self.close_tag = open_tag, close_tag
        self.state = "reasoning" if in_reasoning else ("start" if detect else "content")
        self.saw_reasoning = in_reasoning
        self._skip_newlines = in_reasoning
        self._buffer = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        """Add streamed text; return the (kind, text) pieces that are certain."""
        self._buffer += text
        out: list[tuple[str, str]] = []
        while True:
            if self._skip_newlines:
                self._buffer = self._buffer.lstrip("\n")
                if not self._buffer:
                    return out
                self._skip_newlines = False
            if self.state == "start":
                head = self._buffer.lstrip()
                if head.startswith(self.open_tag):
                    self._buffer = head[len(self.open_tag):]
                    self.state, self.saw_reasoning, self._skip_newlines = "reasoning", True, True
                    continue
                waiting = head or len(self._buffer) <= self.MAX_LEADING_SPACE
                if waiting and self.open_tag.startswith(head):  # still possibly the opening tag
                    return out
                self.state = "content"
            if self.state == "reasoning":
                idx = self._buffer.find(self.close_tag)
                if idx >= 0:
                    if idx:
                        out.append(("reasoning", self._buffer[:idx]))
                    self._buffer = self._buffer[idx + len(self.close_tag):]
                    self.state, self._skip_newlines = "content", True
                    continue
                keep = _partial_suffix(self._buffer, [self.close_tag])
                if len(self._buffer) > keep:
                    out.append(("reasoning", self._buffer[:len(self._buffer) - keep]))
                self._buffer = self._buffer[len(self._buffer) - keep:]
                return out
            if self._buffer:
                out.append(("content", self._buffer))
            self._buffer = ""
            return out

    def flush(self) -> list[tuple[str, str]]:
        """Whatever is held back at the end of the stream (e.g. an unfinished tag), as plain text."""
        text, self._buffer = self._buffer, ""
        if not text:
            return []
        return [("reasoning" if self.state == "reasoning" else "content", text)]
