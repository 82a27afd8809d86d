"""Streaming filters: stop strings and reasoning splitting give the same result whatever the chunking."""

from __future__ import annotations

import pytest

from loraforge.serve.text import ReasoningSplitter, StopStringFilter


def _chunks(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def _run_stop(text: str, stops: list[str], size: int) -> tuple[str, bool]:
    f = StopStringFilter(stops)
    out = "".join(f.feed(c) for c in _chunks(text, size)) + f.flush()
    return out, f.stopped


@pytest.mark.parametrize("size", [1, 2, 3, 7, 100])
def test_stop_strings_cut_at_first_occurrence(size):
    assert _run_stop("Hello world. END more END", ["END"], size) == ("Hello world. ", True)
    assert _run_stop("a\n\nUser: b", ["\nUser:", "zzz"], size) == ("a\n", True)
    # a partial match that never completes is emitted in full at the end
    assert _run_stop("ends with EN", ["END"], size) == ("ends with EN", False)
    assert _run_stop("no stops", [], size) == ("no stops", False)


def test_stop_filter_holds_back_only_a_possible_prefix():
    f = StopStringFilter(["STOP"])
    assert f.feed("abc ST") == "abc "
    assert f.feed("Xy") == "STXy"
    assert f.feed("S") == ""
    assert f.feed("TOP tail") == ""
    assert f.stopped and f.flush() == ""


def _run_split(text: str, size: int, in_reasoning: bool = False) -> tuple[str, str, bool]:
    s = ReasoningSplitter("<think>", "</think>", in_reasoning=in_reasoning)
    pieces = []
    for c in _chunks(text, size):
        pieces += s.feed(c)
    pieces += s.flush()
    reasoning = "".join(t for k, t in pieces if k == "reasoning")
    content = "".join(t for k, t in pieces if k == "content")
    return reasoning, content, s.saw_reasoning


@pytest.mark.parametrize("size", [1, 2, 5, 1000])
def test_reasoning_split_qwen3_shape(size):
    text = "<think>\nLet me add 2 and 2.\n</think>\n\nThe answer is 4."
    assert _run_split(text, size) == ("Let me add 2 and 2.\n", "The answer is 4.", True)


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_reasoning_split_without_think_block(size):
    assert _run_split("Plain answer <b>", size) == ("", "Plain answer <b>", False)
    assert _run_split("<thin", size) == ("", "<thin", False)  # an unfinished tag at the end is text


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_reasoning_split_prompt_opened_block(size):
    # templates that put <think> in the prompt: the output starts inside the reasoning
    assert _run_split("\nhmm\n</think>\n\nok", size, in_reasoning=True) == ("hmm\n", "ok", True)


def test_reasoning_split_unclosed_reasoning_stays_reasoning():
    assert _run_split("<think>still thinking </thi", 3) == ("still thinking </thi", "", True)
