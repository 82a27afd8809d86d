"""Conversations -> token columns, in parallel, without per-token Python work in the parent.

Each worker renders a range of conversations with ``Template.encode`` (or the template's optional batched
``encode_batch``) and returns flat int32 arrays plus lengths, so results cross process boundaries as a few
buffers, and the `datasets.Dataset` is built from Arrow arrays directly.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import TemplateError
from .conversation import Conversation

IGNORE_INDEX = -100
UNBOUNDED = 1 << 30  # a cutoff no example reaches: gives the length before truncation


@dataclass(frozen=True)
class EncodeOptions:
    """The rendering switches passed to ``Template.encode``."""

    cutoff_len: int
    train_on_prompt: bool = False
    mask_history: bool = False
    enable_thinking: bool | None = True

    def kwargs(self, cutoff_len: int) -> dict[str, Any]:
        return {"cutoff_len": cutoff_len, "train_on_prompt": self.train_on_prompt,
                "mask_history": self.mask_history, "enable_thinking": self.enable_thinking}


@dataclass
class Encoded:
    """Token columns of many examples, flat: example ``i`` is ``ids[offsets[i]:offsets[i+1]]``."""

    ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    full_lengths: np.ndarray  # lengths before truncation
    kept: np.ndarray  # indices (into the input conversations) of the examples present here
    errors: list[tuple[int, str]]  # (conversation index, message) that the template refused
    no_label: list[int]  # conversation indices dropped because no token was left to train on

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def to_dataset(self, position_ids: np.ndarray | None = None):
        """A `datasets.Dataset` with input_ids, attention_mask, labels (and position_ids when given), built from
        Arrow list arrays directly (chunked so that no chunk exceeds Arrow's 32-bit list offsets)."""
        import datasets
        import pyarrow as pa

        columns: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        if position_ids is not None:
            columns["position_ids"] = []
        for lo, hi in _row_chunks(self.offsets, MAX_CHUNK_VALUES):
            start, end = int(self.offsets[lo]), int(self.offsets[hi])
            offsets = pa.array((self.offsets[lo:hi + 1] - start).astype(np.int32), pa.int32())
            values = {"input_ids": pa.array(self.ids[start:end], pa.int32()),
                      "attention_mask": pa.array(np.ones(end - start, np.int8), pa.int8()),
                      "labels": pa.array(self.labels[start:end], pa.int32())}
            if position_ids is not None:
                values["position_ids"] = pa.array(position_ids[start:end], pa.int32())
            for key, vals in values.items():
                columns[key].append(pa.ListArray.from_arrays(offsets, vals))
        table = pa.table({k: pa.chunked_array(v, type=pa.list_(v[0].type.value_type)) for k, v in columns.items()}
                         if columns["input_ids"] else {k: pa.array([], pa.list_(pa.int32())) for k in columns})
        return datasets.Dataset(table)


MAX_CHUNK_VALUES = 1 << 30


def _row_chunks(offsets: np.ndarray, max_values: int) -> list[tuple[int, int]]:
    """Row ranges [lo, hi) whose token counts stay below ``max_values``."""
    n = len(offsets) - 1
    chunks, lo = [], 0
    while lo < n:
        hi = int(np.searchsorted(offsets, offsets[lo] + max_values, side="right")) - 1
        hi = min(max(hi, lo + 1), n)
        chunks.append((lo, hi))
        lo = hi
    return chunks


_STATE: dict[str, Any] = {}


def _encode_range(start: int, end: int, convs: Sequence[Conversation] | None = None):
    """Encode conversations [start, end) of the shared list (or ``convs`` when given) in this process."""
    template, tokenizer, opts = _STATE["template"], _STATE["tokenizer"], _STATE["options"]
    convs = _STATE["convs"][start:end] if convs is None else convs
    ids_out: list[list[int]] = []
    labels_out: list[list[int]] = []
    full, kept, errors, no_label = [], [], [], []
    batch = getattr(template, "encode_batch", None)
    try:
        pairs = batch(convs, tokenizer, **opts.kwargs(UNBOUNDED)) if batch else None
    except TemplateError:
        pairs = None  # fall back to one conversation at a time to find the offending one
    for j, conv in enumerate(convs):
        try:
            ids, labels = pairs[j] if pairs is not None else template.encode(conv, tokenizer,
                                                                             **opts.kwargs(UNBOUNDED))
            n = len(ids)
            if n > opts.cutoff_len:
                ids, labels = template.encode(conv, tokenizer, **opts.kwargs(opts.cutoff_len))
        except TemplateError as err:
            errors.append((start + j, err.message))
            continue
        if labels.count(IGNORE_INDEX) == len(labels):  # list.count runs in C
            no_label.append(start + j)
            continue
        ids_out.append(ids)
        labels_out.append(labels)
        full.append(n)
        kept.append(start + j)
    lengths = np.fromiter((len(x) for x in ids_out), np.int64, len(ids_out))
    total = int(lengths.sum())
    flat_ids = np.fromiter(itertools.chain.from_iterable(ids_out), np.int32, total)
    flat_labels = np.fromiter(itertools.chain.from_iterable(labels_out), np.int32, total)
    return (flat_ids, flat_labels, lengths, np.asarray(full, np.int64), np.asarray(kept, np.int64), errors,
            no_label)


def encode_all(convs: Sequence[Conversation], tokenizer, template, options: EncodeOptions, *,
               num_workers: int | None = None, batch_size: int = 1000) -> Encoded:
    """Render and tokenize every conversation; ``num_workers`` > 1 spreads ranges over processes."""
    n = len(convs)
    batch_size = max(1, batch_size)
    ranges = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    workers = min(num_workers or 1, len(ranges))
    _STATE.update(template=template, tokenizer=tokenizer, options=options, convs=convs)
    try:
        if workers <= 1:
            parts = [_encode_range(s, e) for s, e in ranges]
        elif "fork" in mp.get_all_start_methods():
            # Forked workers see the conversations, template and tokenizer without pickling them.
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
                parts = list(pool.map(_encode_range, *zip(*ranges)))
        else:
            with ProcessPoolExecutor(workers, initializer=_STATE.update,
                                     initargs=({"template": template, "tokenizer": tokenizer,
                                                "options": options},)) as pool:
                parts = list(pool.map(_encode_range, *zip(*ranges), [convs[s:e] for s, e in ranges]))
    finally:
        _STATE.clear()
    if not parts:
        empty = np.zeros(0, np.int32)
        return Encoded(empty, empty, np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), [], [])
    lengths = np.concatenate([p[2] for p in parts])
    return Encoded(
        ids=np.concatenate([p[0] for p in parts]), labels=np.concatenate([p[1] for p in parts]),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        full_lengths=np.concatenate([p[3] for p in parts]), kept=np.concatenate([p[4] for p in parts]),
        errors=[e for p in parts for e in p[5]], no_label=[i for p in parts for i in p[6]])


def encode_pretrain(texts: Sequence[str], tokenizer, *, batch_size: int = 1000) -> Encoded:
    """Pre-training text: each text + EOS, tokenized in batched calls; every token is trained."""
    eos = tokenizer.eos_token or ""
    chunks = []
    for s in range(0, len(texts), batch_size):
        out = tokenizer([t + eos for t in texts[s:s + batch_size]], add_special_tokens=False)["input_ids"]
        lengths = np.fromiter((len(x) for x in out), np.int64, len(out))
        chunks.append((np.fromiter(itertools.chain.from_iterable(out), np.int32, int(lengths.sum())), lengths))
    lengths = np.concatenate([c[1] for c in chunks]) if chunks else np.zeros(0, np.int64)
    ids = np.concatenate([c[0] for c in chunks]) if chunks else np.zeros(0, np.int32)
    return Encoded(ids=ids, labels=ids.copy(), offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                   full_lengths=lengths.copy(), kept=np.arange(len(lengths)), errors=[], no_label=[])
