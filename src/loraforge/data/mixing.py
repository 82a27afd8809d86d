"""Mixing several datasets (concat / interleave), sampling `num_samples`, and holding out `val_size`.

The interleave strategies follow `datasets.interleave_datasets`: `interleave_under` stops when the first
dataset runs out (undersampling the others), `interleave_over` goes on until every dataset has been seen in
full, restarting the exhausted ones (oversampling). All randomness comes from one seed.
"""

from __future__ import annotations

import math
from typing import Sequence, TypeVar

import numpy as np

from ..errors import DataError

T = TypeVar("T")
STRATEGIES = ("concat", "interleave_under", "interleave_over")


def parse_probs(text: str | None, count: int) -> list[float] | None:
    """``"0.7,0.3"`` -> [0.7, 0.3], checked against the number of datasets."""
    if not text:
        return None
    try:
        probs = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise DataError(f"`interleave_probs: {text}` must be comma-separated numbers such as 0.7,0.3") from None
    if len(probs) != count:
        raise DataError(f"`interleave_probs` has {len(probs)} value(s) for {count} dataset(s)",
                        hint="give one probability per dataset in `dataset`, in the same order")
    if any(p < 0 for p in probs) or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
        raise DataError(f"`interleave_probs: {text}` must be non-negative and sum to 1 (sum is {sum(probs):g})")
    return probs


def mix(parts: Sequence[Sequence[T]], strategy: str = "concat", probs: list[float] | None = None,
        seed: int = 42) -> list[T]:
    """Combine the datasets in ``parts`` with ``strategy``; see the module docstring."""
    if strategy not in STRATEGIES:
        raise DataError(f"`mix_strategy: {strategy}` is not one of {', '.join(STRATEGIES)}")
    parts = [list(p) for p in parts]
    if len(parts) == 1 or strategy == "concat":
        return [x for p in parts for x in p]
    if any(not p for p in parts):
        raise DataError("cannot interleave an empty dataset; remove it from `dataset` or use `mix_strategy: concat`")
    oversample = strategy == "interleave_over"
    if oversample and probs and min(probs) <= 0:
        raise DataError("`mix_strategy: interleave_over` needs every `interleave_probs` value > 0 (a dataset never "
                        "drawn is never exhausted)")
    positions = [0] * len(parts)
    seen_all = [False] * len(parts)
    out: list[T] = []
    rng = np.random.default_rng(seed)
    step = 0
    while True:
        if oversample and all(seen_all) and (probs or step % len(parts) == 0):
            return out  # round robin finishes its last cycle, as `datasets` does
        i = int(rng.choice(len(parts), p=probs)) if probs else step % len(parts)
        step += 1
        out.append(parts[i][positions[i]])
        positions[i] += 1
        if positions[i] == len(parts[i]):
            seen_all[i] = True
            if not oversample:
                return out
            positions[i] = 0


def sample_to(items: Sequence[T], n: int, seed: int = 42) -> list[T]:
    """`num_samples`: a random subset of ``n`` items, or every item plus random repeats when ``n`` is larger."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(items))[:n]
    if n > len(items):
        idx = np.concatenate([idx, rng.choice(len(items), n - len(items))])
    return [items[int(i)] for i in idx]


def split_eval(items: Sequence[T], val_size: float, seed: int = 42) -> tuple[list[T], list[T]]:
    """Shuffle and hold out ``val_size`` (a share in (0, 1) or a count >= 1); returns (train, eval)."""
    n = len(items)
    n_eval = int(val_size) if val_size >= 1 else math.ceil(val_size * n)
    if n_eval <= 0:
        return list(items), []
    if n_eval >= n:
        raise DataError(f"`val_size: {val_size:g}` holds out {n_eval} of {n} examples and leaves none to train on",
                        hint="use a smaller val_size, or a separate `eval_dataset`")
    perm = np.random.default_rng(seed).permutation(n)
    return [items[int(i)] for i in perm[n_eval:]], [items[int(i)] for i in perm[:n_eval]]
