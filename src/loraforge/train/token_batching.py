"""Token-budget batching: run the samples of one optimizer step in as few packed micro-batches as a budget allows.

The user's ``per_device_train_batch_size`` x ``gradient_accumulation_steps`` decides *which samples make one
optimizer step*. With short samples, running them as separate padded micro-batches of 2 leaves the GPU waiting on
kernel launches. :func:`repack_step` takes the padded micro-batches the Trainer fetched for one optimizer step and
regroups the same samples, in the same order (greedy fill), into packed micro-batches of at most ``budget`` tokens
(a sample longer than the budget runs alone).

A packed micro-batch is one flattened row, the format shared with the fast path and neat packing:
``input_ids``/``labels``/``position_ids`` of shape [1, T], position ids restarting at 0 for every sample, no
``attention_mask``, ``use_cache=False``, and the variable-length attention arguments transformers understands
(``cu_seq_lens_q``/``cu_seq_lens_k``: int32 [n + 1]; ``max_length_q``/``max_length_k``: ints). sdpa/eager build a
block-diagonal causal mask from the restarting position ids; flash-attention and the fast path read cu_seq_lens.
So no sample attends to another. The first label of every sample is set to -100: in the padded layout it is never
a target (the loss shifts labels by one), and here it would otherwise be predicted from the previous sample.

Why the Trainer loop stays exact: the stock ``_run_epoch`` counts micro-batches, not optimizer steps — the
accumulation boundary (``do_sync_step``), ``epoch``, resume's ``skip_first_batches`` and the per-micro-batch
collectives of ``_track_num_input_tokens`` all follow that count. :func:`repack_step` therefore returns as many
elements as it received: ``n - k`` empty slots first, then the ``k`` packed micro-batches. Empty slots run no
forward or backward (see ``LoraforgeTrainer.training_step``); the last element is always a real micro-batch, so
DDP's gradient all-reduce (outside ``no_sync``) still happens on the last backward of the step. Every element
remembers the original micro-batch it stands for (:class:`StepSlot.counted`), so tokens seen and FLOPs are counted
exactly as with ``off``. ``num_items_in_batch`` is computed by the Trainer from the original batches and passed
unchanged, so each packed micro-batch's loss is its summed token loss divided by the step's token count: the sum
over the step is the same token mean as ``off``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..data.encoding import IGNORE_INDEX

# keys of a padded micro-batch (data.collator.PaddingCollator) that repacking understands
PADDED_KEYS = frozenset({"input_ids", "attention_mask", "labels"})


class StepSlot(dict):
    """One element of a repacked optimizer step: a packed micro-batch's model inputs, or empty (a slot that
    keeps the Trainer's per-micro-batch counters); ``counted`` is the original padded micro-batch it stands for
    when tokens seen and FLOPs are counted."""

    def __init__(self, inputs: Any = (), counted: dict[str, Any] | None = None):
        super().__init__(inputs)  # the Trainer rebuilds mappings as type(data)(items): keep that call valid
        self.counted = counted if counted is not None else dict(self)


def is_empty_slot(inputs: Any) -> bool:
    """True for a slot of a repacked step that runs no forward/backward."""
    return isinstance(inputs, StepSlot) and not inputs


def counted_inputs(inputs: Any) -> Any:
    """The inputs the Trainer's bookkeeping (tokens seen, FLOPs) should count: the original micro-batch."""
    return inputs.counted if isinstance(inputs, StepSlot) else inputs


def greedy_groups(lengths: list[int], budget: int) -> list[tuple[int, int]]:
    """Split samples (in order) into ranges ``[start, end)`` of at most ``budget`` tokens, filling each greedily.

    A sample longer than the budget gets a range of its own. Order is kept so that the step's samples, and
    therefore its floating-point sums, follow the ``off`` order as closely as possible.
    """
    groups: list[tuple[int, int]] = []
    start, used = 0, 0
    for i, n in enumerate(lengths):
        if i > start and used + n > budget:
            groups.append((start, i))
            start, used = i, 0
        used += n
    if lengths:
        groups.append((start, len(lengths)))
    return groups


def split_to(groups: list[tuple[int, int]], lengths: list[int], count: int) -> list[tuple[int, int]]:
    """Split groups (the one with the most tokens first, at its token midpoint) until there are ``count``.

    Under DDP every rank must run the same number of forward passes: each forward broadcasts the module buffers
    (``broadcast_buffers``), so a rank with fewer packed micro-batches would pair its collectives wrongly.
    """
    groups = list(groups)
    while len(groups) < count:
        splittable = [g for g in groups if g[1] - g[0] > 1]
        if not splittable:
            break
        start, end = max(splittable, key=lambda g: sum(lengths[g[0]:g[1]]))
        half = sum(lengths[start:end]) / 2
        cut = min(range(start + 1, end), key=lambda c: abs(sum(lengths[start:c]) - half))
        k = groups.index((start, end))
        groups[k:k + 1] = [(start, cut), (cut, end)]
    return groups


def can_repack(batches: list[dict[str, Any]]) -> bool:
    """Repack only padded micro-batches as PaddingCollator writes them (anything else keeps its own layout)."""
    return bool(batches) and all(isinstance(b, dict) and set(b) == PADDED_KEYS for b in batches)


def pack_range(ids: torch.Tensor, labels: torch.Tensor, lengths: list[int]) -> dict[str, Any]:
    """One packed micro-batch from the concatenated tokens of consecutive samples of the given ``lengths``."""
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    total = starts[-1] + lengths[-1]
    labels = labels.clone()
    labels[torch.tensor(starts, device=labels.device)] = IGNORE_INDEX  # no target across a sample boundary
    positions = torch.cat([torch.arange(n) for n in lengths])  # built on the host: no device sync needed
    cu = torch.tensor(starts + [total], dtype=torch.int32)
    longest = max(lengths)
    device = ids.device
    return {
        "input_ids": ids.view(1, -1),
        "labels": labels.view(1, -1),
        "position_ids": positions.view(1, -1).to(device, non_blocking=True),
        "use_cache": False,  # a KV cache would switch off transformers' packed-sequence detection
        "cu_seq_lens_q": cu.to(device, non_blocking=True),
        "cu_seq_lens_k": cu.to(device, non_blocking=True),
        "max_length_q": longest,
        "max_length_k": longest,
    }


def repack_step(batches: list[dict[str, Any]], budget: int,
                sync_count: Callable[[int], int] | None = None) -> list[StepSlot]:
    """The micro-batches of one optimizer step, regrouped into packed micro-batches of <= ``budget`` tokens.

    Returns ``len(batches)`` elements: empty slots first, then the packed micro-batches (see the module
    docstring for why the count and the order matter to the Trainer loop). When samples longer than the budget
    would need more micro-batches than the step has, the step runs its original padded micro-batches.
    ``sync_count`` (DDP) maps this rank's number of packed micro-batches to the largest over all ranks; every
    rank then runs that many, so their forward passes (and collectives) pair up.
    """
    counted = [{k: b[k] for k in ("input_ids", "attention_mask")} for b in batches]
    masks = [b["attention_mask"].bool() for b in batches]
    # one host sync per optimizer step: the sample lengths decide the grouping
    lengths = torch.cat([m.sum(1) for m in masks]).tolist()
    groups = greedy_groups(lengths, budget)
    count = sync_count(len(groups)) if sync_count is not None else len(groups)
    groups = split_to(groups, lengths, count)
    if count > len(batches):
        return [StepSlot(b, c) for b, c in zip(batches, counted)]
    ids = torch.cat([b["input_ids"][m] for b, m in zip(batches, masks)])  # real tokens, sample after sample
    labels = torch.cat([b["labels"][m] for b, m in zip(batches, masks)])
    packed, offset = [], 0
    for start, end in groups:
        size = sum(lengths[start:end])
        packed.append(pack_range(ids[offset:offset + size], labels[offset:offset + size], lengths[start:end]))
        offset += size
    inputs = [{}] * (len(batches) - len(packed)) + packed
    return [StepSlot(x, c) for x, c in zip(inputs, counted)]
