"""The trained spans of an encoded example, as text: shared by the template tests."""

from __future__ import annotations

from loraforge.data.encoding import IGNORE_INDEX


def spans(tok, input_ids, labels) -> list[str]:
    """Each run of trained tokens decoded; a trained label must equal its input token."""
    out, cur = [], []
    for token, label in zip(input_ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            cur.append(token)
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    return out + ([tok.decode(cur)] if cur else [])
