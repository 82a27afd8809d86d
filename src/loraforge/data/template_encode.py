"""Rendered turns -> token ids and labels: tokenize, truncate to ``cutoff_len`` turn by turn, mask prompts.

The whole conversation is tokenized as one string (so the ids equal ``apply_chat_template(..., tokenize=True)``
token for token), and the character offsets of the tokens assign each token to its prompt or answer segment.
Tokenizers without offsets (slow ones) fall back to tokenizing segment by segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .render import Turn

IGNORE_INDEX = -100


@dataclass
class TurnIds:
    """Token ids of one turn; the last ``tail`` prompt tokens close the message (end of turn, generation
    prompt) and survive truncation."""

    prompt: list[int]
    answer: list[int]
    tail: int = 0


def _segments(turns: Sequence[Turn]) -> list[str]:
    out: list[str] = []
    for turn in turns:
        out += [turn.prompt, turn.answer or ""]
    return out


def _split_by_offsets(tokenizer: Any, texts: list[str], ids: Sequence[int],
                      offsets: Sequence[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """(token, start character) of each segment: a token goes to the segment its first character lies in.

    A token that spans the end of a prompt (e.g. the "\\n" closing a generation prompt merged with a "\\n"
    opening the answer) is split there and its two halves tokenized alone, so every prompt is a token prefix
    of the sequence, exactly as generation will see it. Any other boundary-spanning token goes to the earlier
    segment.
    """
    ends: list[int] = []
    pos = 0
    for text in texts:
        pos += len(text)
        ends.append(pos)
    full = "".join(texts)
    out: list[list[tuple[int, int]]] = [[] for _ in texts]
    seg, last = 0, len(texts) - 1
    for token, (start, end) in zip(ids, offsets):
        while seg < last and start >= ends[seg]:
            seg += 1
        if seg % 2 == 0 and seg < last and start < ends[seg] < end:
            cut = ends[seg]
            out[seg] += [(t, start) for t in tokenizer(full[start:cut], add_special_tokens=False)["input_ids"]]
            seg += 1
            while seg < last and cut >= ends[seg]:
                seg += 1
            out[seg] += [(t, cut) for t in tokenizer(full[cut:end], add_special_tokens=False)["input_ids"]]
            continue
        out[seg].append((token, start))
    return out


def tokenize_turns(tokenizer: Any, turns: Sequence[Turn]) -> list[TurnIds]:
    """The token ids of each turn."""
    return tokenize_many(tokenizer, [turns])[0]


def tokenize_many(tokenizer: Any, conversations: Sequence[Sequence[Turn]]) -> list[list[TurnIds]]:
    """:func:`tokenize_turns` for many conversations with one batched tokenizer call (fast tokenizers)."""
    all_texts = [_segments(turns) for turns in conversations]
    if not getattr(tokenizer, "is_fast", False):
        return [[_slow_turn(tokenizer, turn) for turn in turns] for turns in conversations]
    enc = tokenizer(["".join(texts) for texts in all_texts], add_special_tokens=False,
                    return_offsets_mapping=True, return_attention_mask=False)
    out = []
    for turns, texts, ids, offsets in zip(conversations, all_texts, enc["input_ids"], enc["offset_mapping"]):
        segs = _split_by_offsets(tokenizer, texts, ids, offsets)
        result, pos = [], 0
        for k, turn in enumerate(turns):
            prompt_end = pos + len(turn.prompt)
            tail_start = prompt_end - turn.tail
            prompt, answer = segs[2 * k], segs[2 * k + 1]
            result.append(TurnIds([t for t, _ in prompt], [t for t, _ in answer],
                                  sum(1 for _, start in prompt if start >= tail_start) if turn.tail else 0))
            pos = prompt_end + len(turn.answer or "")
        out.append(result)
    return out


def _slow_turn(tokenizer: Any, turn: Turn) -> TurnIds:
    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False) if text else []

    prompt = encode(turn.prompt)
    tail = len(encode(turn.prompt[len(turn.prompt) - turn.tail:])) if turn.tail else 0
    return TurnIds(prompt, encode(turn.answer or ""), min(tail, len(prompt)))


def share_budget(prompt_len: int, answer_len: int, budget: int) -> tuple[int, int]:
    """How many prompt and answer tokens of one turn fit in ``budget``: the longer side is shortened first.

    An answer that takes less than half the budget is kept whole (the prompt is cut); else a prompt that takes
    less than half is kept whole (the answer is cut); else both are cut in proportion to their lengths. This is
    the rule LLaMA-Factory applies, so truncated examples match between the two tools.
    """
    if budget <= 0:
        return 0, 0
    if 2 * answer_len < budget:
        answer_keep = answer_len
    elif 2 * prompt_len < budget:
        answer_keep = budget - prompt_len
    else:
        answer_keep = int(budget * answer_len / (prompt_len + answer_len))
    answer_keep = min(answer_keep, answer_len)
    return min(budget - answer_keep, prompt_len), answer_keep


def _shorten_prompt(turn: TurnIds, keep: int) -> list[int]:
    """The first ``keep`` tokens of the prompt, but with its closing tail (end of turn, generation prompt)."""
    if keep >= len(turn.prompt):
        return list(turn.prompt)
    tail = min(turn.tail, keep)
    return turn.prompt[:keep - tail] + turn.prompt[len(turn.prompt) - tail:]


def build_example(turns: Sequence[TurnIds], *, cutoff_len: int, train_on_prompt: bool = False,
                  mask_history: bool = False) -> tuple[list[int], list[int]]:
    """Concatenate the turns into (input_ids, labels) of at most ``cutoff_len`` tokens.

    Turns are taken in order until the budget is spent, each shortened with :func:`share_budget`: a prompt
    loses the end of its message text but keeps its closing tokens (end of turn and generation prompt), an
    answer loses its end. With ``mask_history`` the last turns are taken first and only the last answer is
    trained. Prompt tokens are -100 unless ``train_on_prompt``.
    """
    order = list(range(len(turns)))
    if mask_history:
        order.reverse()
    kept: dict[int, tuple[list[int], list[int], list[int], list[int]]] = {}
    total = 0
    for rank, k in enumerate(order):
        if total >= cutoff_len:
            break
        turn = turns[k]
        n_prompt, n_answer = share_budget(len(turn.prompt), len(turn.answer), cutoff_len - total)
        prompt, answer = _shorten_prompt(turn, n_prompt), turn.answer[:n_answer]
        total += n_prompt + n_answer
        prompt_labels = list(prompt) if train_on_prompt else [IGNORE_INDEX] * n_prompt
        answer_labels = [IGNORE_INDEX] * n_answer if mask_history and rank != 0 else list(answer)
        kept[k] = (prompt, answer, prompt_labels, answer_labels)
    input_ids: list[int] = []
    labels: list[int] = []
    for k in sorted(kept):
        prompt, answer, prompt_labels, answer_labels = kept[k]
        input_ids += prompt + answer
        labels += prompt_labels + answer_labels
    return input_ids, labels
