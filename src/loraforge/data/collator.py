"""Batch collators: right padding (labels -100), and the neat-packing collator that keeps examples apart.

Neat packing relies on transformers' own packed-sequence support instead of a hand-made 4D mask: the batch
carries ``position_ids`` that restart per example and **no** ``attention_mask``. transformers then
- sdpa / eager / flex: `masking_utils.find_packed_sequence_indices` turns the position ids into a
  block-diagonal causal mask (it does so for any batch size, only when ``attention_mask`` is None);
- flash-attention 2/3: `_is_packed_sequence` reads cu_seqlens from the position ids, but only for a batch of
  one row, so for flash-attention the collator flattens the batch into one row (as
  `DataCollatorWithFlattening` does).
Padding then costs nothing: pad tokens form their own "example" (positions restart at 0) with labels -100.

transformers skips that packed-sequence detection whenever a KV cache exists, and a model whose config says
`use_cache: true` creates one in every forward, training included. The neat collator therefore puts
``use_cache=False`` in each batch: without it the examples silently attend to each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from .encoding import IGNORE_INDEX


def _as_lists(features: Sequence[dict[str, Any]], key: str) -> list[list[int]]:
    return [list(f[key]) for f in features]


@dataclass
class PaddingCollator:
    """Pad input_ids with the pad token, attention_mask with 0 and labels with -100, to the longest example.

    Packed (not neat) batches also carry ``position_ids``, which continue through the padding.
    """

    pad_token_id: int
    label_pad_token_id: int = IGNORE_INDEX
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        ids = _as_lists(features, "input_ids")
        labels = _as_lists(features, "labels")
        width = max(len(x) for x in ids)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.tensor([x + [self.pad_token_id] * (width - len(x)) for x in ids], dtype=torch.long),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], dtype=torch.long),
            "labels": torch.tensor([y + [self.label_pad_token_id] * (width - len(y)) for y in labels],
                                   dtype=torch.long),
        }
        if "position_ids" in features[0]:
            pos = _as_lists(features, "position_ids")
            batch["position_ids"] = torch.tensor(
                [p + list(range(p[-1] + 1, p[-1] + 1 + width - len(p))) for p in pos], dtype=torch.long)
        return batch


@dataclass
class NeatPackingCollator:
    """Packed rows whose examples must not attend to each other: position ids restart per example and no
    attention mask is passed. ``flatten=True`` puts the whole batch in one row (needed by flash-attention)."""

    pad_token_id: int
    flatten: bool = False
    label_pad_token_id: int = IGNORE_INDEX

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        ids = _as_lists(features, "input_ids")
        labels = _as_lists(features, "labels")
        pos = (_as_lists(features, "position_ids") if "position_ids" in features[0]
               else [list(range(len(x))) for x in ids])  # an unpacked row is one example
        if self.flatten:
            return {"input_ids": torch.tensor([[t for x in ids for t in x]], dtype=torch.long),
                    "labels": torch.tensor([[t for y in labels for t in y]], dtype=torch.long),
                    "position_ids": torch.tensor([[t for p in pos for t in p]], dtype=torch.long),
                    "use_cache": False}
        width = max(len(x) for x in ids)
        return {
            "use_cache": False,
            "input_ids": torch.tensor([x + [self.pad_token_id] * (width - len(x)) for x in ids], dtype=torch.long),
            "labels": torch.tensor([y + [self.label_pad_token_id] * (width - len(y)) for y in labels],
                                   dtype=torch.long),
            # the padding is one more "example": positions restart at 0, so nothing real attends to it
            "position_ids": torch.tensor([p + list(range(width - len(p))) for p in pos], dtype=torch.long),
        }


def _flash_attention_possible(flash_attn: str) -> bool:
    if flash_attn == "fa2":
        return True
    if flash_attn != "auto":
        return False
    try:
        from transformers.utils import is_flash_attn_2_available

        return bool(is_flash_attn_2_available())
    except ImportError:
        return False


def build_collator(cfg, tokenizer):
    """The collator for ``cfg``: neat packing, or padding (plain and packed datasets)."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    # LLaMA-Factory's ignore_pad_token_for_loss: false trains the model to predict padding too
    label_pad = IGNORE_INDEX if cfg.data.ignore_pad_token_for_loss else pad_id
    if cfg.data.neat_packing:
        return NeatPackingCollator(pad_token_id=pad_id, flatten=_flash_attention_possible(cfg.model.flash_attn),
                                   label_pad_token_id=label_pad)
    return PaddingCollator(pad_token_id=pad_id, label_pad_token_id=label_pad)
