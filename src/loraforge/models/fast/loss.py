"""The causal-LM loss of the fast path without full-vocabulary logits.

The Trainer's documented ``compute_loss_func`` hook receives the model outputs and the labels; the model is
called with ``logits_to_keep`` selecting no position, so it never builds the [tokens, vocab] logits (151,936
words x 4 bytes x tokens for Qwen). The final hidden states come from a forward hook on the decoder's final
norm, and :func:`loraforge.kernels.cross_entropy.linear_cross_entropy` computes the loss chunk by chunk.

The result equals transformers' ``ForCausalLMLoss``: labels shifted by one, ``-100`` ignored, summed and divided
by ``num_items_in_batch`` (the token count of the whole optimizer step) when given, else the token mean.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from ...kernels.cross_entropy import linear_cross_entropy

IGNORE_INDEX = -100


class FusedCausalLMLoss:
    """A ``compute_loss_func`` for the Trainer; :meth:`close` removes its hook."""

    def __init__(self, model: Any):
        from . import decoder_of

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.head = base.get_output_embeddings()
        if getattr(self.head, "bias", None) is not None:
            raise ValueError("the fused loss expects an output layer without bias")
        self._hidden: torch.Tensor | None = None
        self._norm = decoder_of(model).norm
        self._handle = self._norm.register_forward_hook(self._capture)

    def rehook(self) -> None:
        """Hook the final norm again, after every hook added since: DeepSpeed ZeRO-3 replaces each module's output
        with one whose backward first gathers the module's partitioned weights, and the loss must build on that
        output (not the raw one, whose backward would meet the released, empty norm weight)."""
        self._handle.remove()
        self._handle = self._norm.register_forward_hook(self._capture)

    def callback(self) -> Any:
        """A TrainerCallback that calls :meth:`rehook` once the Trainer has wrapped the model (train begin)."""
        from transformers import TrainerCallback

        loss = self

        class _Rehook(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                loss.rehook()

        return _Rehook()

    def _capture(self, _module: Any, _inputs: Any, output: torch.Tensor) -> None:
        self._hidden = output

    def __call__(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        hidden, self._hidden = self._hidden, None
        if hidden is None:
            raise RuntimeError("the fused loss saw no final hidden states (was the model's final norm replaced?)")
        width = hidden.shape[-1]
        target = labels[..., 1:].to(hidden.device).reshape(-1)
        states = hidden[..., :-1, :].reshape(-1, width)
        with _gathered(self.head.weight) as weight:  # the gradient of `states` is computed in this call
            if states.dtype != weight.dtype and weight.dtype in (torch.float16, torch.bfloat16):
                states = states.to(weight.dtype)  # what autocast does to the output layer's input (fp32 norms)
            loss = linear_cross_entropy(states, weight, target, ignore_index=IGNORE_INDEX, reduction="sum")
        if num_items_in_batch is None:
            return loss / (target != IGNORE_INDEX).sum().clamp(min=1)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        return loss / num_items_in_batch

    def close(self) -> None:
        self._handle.remove()


@contextlib.contextmanager
def _gathered(weight: torch.Tensor) -> Iterator[torch.Tensor]:
    """The whole output weight: DeepSpeed ZeRO-3 keeps only a shard of it outside the module's own forward, so
    it is gathered (read-only) for the loss and released after; any other weight is used as it is."""
    if getattr(weight, "ds_id", None) is None:
        yield weight
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
        yield weight


def no_logits(input_ids: torch.Tensor) -> torch.Tensor:
    """A ``logits_to_keep`` value that keeps no position (the loss needs only the hidden states)."""
    return torch.zeros(0, dtype=torch.long, device=input_ids.device)
