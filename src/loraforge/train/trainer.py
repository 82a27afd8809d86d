"""The Hugging Face Trainer with the few behaviours loraforge changes, each in a small named override.

- ``training_step``: tells the non-finite guard when a micro-batch loss is NaN/inf.
- ``_save_checkpoint``: writes each checkpoint into a staging folder and renames it when complete.
- ``create_optimizer``: LoRA+ parameter groups when ``loraplus_lr_ratio`` is set.
- ``compute_loss``: on the fast path, asks the model for no logits while training (the fused loss, given as
  the Trainer's ``compute_loss_func``, works from the final hidden states).
- ``get_batch_samples`` (+ ``training_step``, ``floating_point_ops``, ``_track_num_input_tokens``): token-budget
  batching regroups one optimizer step's samples into packed micro-batches (see :mod:`.token_batching`).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import Seq2SeqTrainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .callbacks import NonFiniteGuard, ThroughputTracker
from .checkpoint import STAGING
from .token_batching import can_repack, counted_inputs, is_empty_slot, repack_step

logger = logging.getLogger(__name__)


class LoraforgeTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer + non-finite guard + atomic checkpoints + LoRA+ optimizer groups + token-budget batching."""

    def __init__(self, *args, guard: NonFiniteGuard | None = None, loraplus: dict | None = None,
                 micro_batch_tokens: int | None = None, tracker: ThroughputTracker | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.guard = guard
        self.tracker = tracker
        self.loraplus = loraplus
        self._staging = False
        self.micro_batch_tokens = micro_batch_tokens
        # the fast path's loss (compute_loss_func) divides by num_items_in_batch as the model's own loss does
        if micro_batch_tokens and not (self.model_accepts_loss_kwargs or self.compute_loss_func is not None):
            # without num_items_in_batch each micro-batch is averaged on its own: regrouping would reweight tokens
            logger.warning("micro_batch_tokens: off (the model's forward does not take num_items_in_batch)")
            self.micro_batch_tokens = None

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of one optimizer step; with a token budget, the same samples regrouped."""
        start = time.perf_counter()
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.tracker is not None:  # the dataloader's next() calls: time the GPU may sit waiting for data
            self.tracker.data_wait_s += time.perf_counter() - start
        if self.micro_batch_tokens and can_repack(batch_samples):
            sync = self._most_micro_batches if self.args.world_size > 1 else None
            batch_samples = repack_step(batch_samples, self.micro_batch_tokens, sync)
        return batch_samples, num_items_in_batch  # counted on the original batches: the token mean of `off`

    def _most_micro_batches(self, count: int) -> int:
        """The largest number of packed micro-batches any rank needs this step (all ranks run that many)."""
        local = torch.tensor(count, device=self.args.device, dtype=torch.int64)
        return int(self.accelerator.gather(local).max())

    def floating_point_ops(self, inputs):
        return super().floating_point_ops(counted_inputs(inputs))

    def _track_num_input_tokens(self, inputs):
        # a private Trainer hook: counting the original micro-batch keeps tokens_seen equal to `off`
        return super()._track_num_input_tokens(counted_inputs(inputs))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.compute_loss_func is not None and model.training and "input_ids" in inputs:
            from ..models.fast.loss import no_logits

            inputs = {**inputs, "logits_to_keep": no_logits(inputs["input_ids"])}
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if is_empty_slot(inputs):  # a slot of a repacked step: its samples ran in a packed micro-batch
            return torch.zeros((), device=self.args.device)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.guard is not None and not torch.isfinite(loss).all():
            self.guard.mark_nonfinite_loss()
        return loss

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.loraplus:
            from ..models.adapters import loraplus_param_groups

            groups = loraplus_param_groups(
                self.model, lr=self.args.learning_rate, ratio=self.loraplus["ratio"],
                weight_decay=self.args.weight_decay, embedding_lr=self.loraplus["embedding_lr"])
            optim_cls, optim_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            optim_kwargs.pop("lr", None)
            self.optimizer = optim_cls(groups, **optim_kwargs)
            logger.info("LoRA+: lora_B learning rate = %g x %g", self.args.learning_rate, self.loraplus["ratio"])
            return self.optimizer
        return super().create_optimizer(model) if model is not None else super().create_optimizer()

    def _get_output_dir(self, trial):
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING) if self._staging else run_dir

    def _save_checkpoint(self, model, trial):
        """Write ``output_dir/.staging/checkpoint-N`` then rename it to ``output_dir/checkpoint-N``.

        A crash while saving leaves only the staging folder, which the next run removes, so every
        ``checkpoint-N`` folder is complete and resume always finds a usable one.
        """
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged, final = run_dir / STAGING / name, run_dir / name
        if self.args.should_save and staged.exists():
            if final.exists():
                shutil.rmtree(final)
            os.replace(staged, final)
            if self.state.best_model_checkpoint and STAGING in self.state.best_model_checkpoint:
                self.state.best_model_checkpoint = self.state.best_model_checkpoint.replace(
                    os.sep + STAGING, "")
            self._rotate(run_dir)
            shutil.rmtree(run_dir / STAGING, ignore_errors=True)
            logger.info("checkpoint saved: %s", final)
        self.accelerator.wait_for_everyone()

    def _rotate(self, run_dir: Path) -> None:
        from transformers.trainer_utils import rotate_checkpoints

        rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
