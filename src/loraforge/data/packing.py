"""Packing whole examples into sequences of at most `cutoff_len` tokens (all in NumPy, no per-token Python).

- `packing: true`: examples share a sequence and attend to each other; positions run on across the sequence.
- `neat_packing: true`: position ids restart at 0 for every example. With no 2D attention mask in the batch
  (see :mod:`.collator`), transformers derives the sequence boundaries from the position ids: sdpa/eager/flex
  build a block-diagonal causal mask (`masking_utils.find_packed_sequence_indices`) and flash-attention runs
  its varlen kernel (`_is_packed_sequence`, batch of one flattened row). So examples never see each other.

In both modes the first label of every example is -100: the last token of the previous example must not be
trained to predict it. That makes a neatly packed batch's loss equal to the token-weighted mean of the
examples' separate losses.
"""

from __future__ import annotations

import bisect

import numpy as np

from .encoding import IGNORE_INDEX, Encoded


def assign_bins(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing: put each example (longest first) in the fullest sequence that still has room."""
    order = np.argsort(-lengths, kind="stable")
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin id), sorted
    for i in order.tolist():
        size = int(lengths[i])
        k = bisect.bisect_left(free, (size, -1))
        if k == len(free) or size > capacity:
            bins.append([i])
            room = capacity - size
            if room > 0:
                bisect.insort(free, (room, len(bins) - 1))
            continue
        room, b = free.pop(k)
        bins[b].append(i)
        if room - size > 0:
            bisect.insort(free, (room - size, b))
    return bins


def pack(enc: Encoded, cutoff_len: int, *, neat: bool) -> tuple[Encoded, np.ndarray]:
    """Pack ``enc``'s examples into sequences of <= ``cutoff_len`` tokens; returns (packed, position_ids)."""
    lengths = enc.lengths
    bins = assign_bins(lengths, cutoff_len)
    order = np.fromiter((i for b in bins for i in b), np.int64, len(lengths))
    seg_lens = lengths[order]
    total = int(seg_lens.sum())
    seg_out_start = np.cumsum(seg_lens) - seg_lens
    gather = np.repeat(enc.offsets[:-1][order] - seg_out_start, seg_lens) + np.arange(total)
    ids = enc.ids[gather]
    labels = enc.labels[gather]
    labels[seg_out_start[seg_lens > 0]] = IGNORE_INDEX
    row_lens = np.array([int(lengths[b].sum()) for b in bins], np.int64)
    row_offsets = np.concatenate([[0], np.cumsum(row_lens)]).astype(np.int64)
    if neat:
        positions = np.arange(total) - np.repeat(seg_out_start, seg_lens)
    else:
        positions = np.arange(total) - np.repeat(row_offsets[:-1], row_lens)
    packed = Encoded(ids=ids, labels=labels, offsets=row_offsets, full_lengths=row_lens.copy(),
                     kept=np.arange(len(bins)), errors=[], no_label=[])
    return packed, positions.astype(np.int32)


def chunk_stream(enc: Encoded, block: int) -> Encoded:
    """Pre-training: concatenate every text and cut the stream into blocks of ``block`` tokens (the last may be
    shorter)."""
    total = len(enc.ids)
    starts = np.arange(0, total, block, dtype=np.int64)
    offsets = np.concatenate([starts, [total]]).astype(np.int64) if total else np.zeros(1, np.int64)
    lengths = np.diff(offsets)
    return Encoded(ids=enc.ids, labels=enc.labels.copy(), offsets=offsets, full_lengths=lengths,
                   kept=np.arange(len(lengths)), errors=[], no_label=[])


def truncate(enc: Encoded, cutoff_len: int) -> Encoded:
    """Cut each example to at most ``cutoff_len`` tokens (pre-training text without packing)."""
    lengths = np.minimum(enc.lengths, cutoff_len)
    out_start = np.cumsum(lengths) - lengths
    gather = np.repeat(enc.offsets[:-1] - out_start, lengths) + np.arange(int(lengths.sum()))
    return Encoded(ids=enc.ids[gather], labels=enc.labels[gather],
                   offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), full_lengths=enc.full_lengths,
                   kept=enc.kept, errors=enc.errors, no_label=enc.no_label)
