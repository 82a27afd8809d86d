"""The Hugging Face Trainer with the few behaviours loraforge changes, each in a small named override.

- ``training_step``: hands each micro-batch loss to the non-finite guard (checked once per optimizer step), and
  applies `logging_nan_inf_filter` on the device.
- ``_track_num_input_tokens``, ``log``: tokens seen are counted on the device and read when logged or saved.
  Together with the filter above, a micro-batch ends without a host sync, so the host prepares the next one while
  the GPU still computes (the Trainer's own bookkeeping waits for the GPU twice per micro-batch).
- ``_save_checkpoint``: checks the free disk space, writes each checkpoint into a staging folder and renames it
  when complete; a full disk ends the run with one message and no partial checkpoint.
- ``train``: a resume from a checkpoint at the run's last step trains nothing (see ``_finish_from``).
- ``create_optimizer``: LoRA+ parameter groups when ``loraplus_lr_ratio`` is set.
- ``compute_loss``: on the fast path, asks the model for no logits while training (the fused loss, given as
  the Trainer's ``compute_loss_func``, works from the final hidden states).
- ``get_batch_samples`` (+ ``training_step``, ``floating_point_ops``, ``_track_num_input_tokens``): token-budget
  batching regroups one optimizer step's samples into packed micro-batches (see :mod:`.token_batching`).
- ``floating_point_ops``, ``_clip_grad_norm``, ``_get_grad_norm``: the same numbers with the parameters counted
  and listed once, not at every micro-batch and step (each walk of an 8B PEFT model's module tree costs the host
  ~25 ms); the non-finite guard reuses the clipped norm.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import Seq2SeqTrainer
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput

from ..disk import disk_full_guard, ensure_free_space, folder_bytes
from ..errors import TrainingError
from .callbacks import NonFiniteGuard, ThroughputTracker, trainable_parameters
from .checkpoint import STAGING, last_step, newest_checkpoint, read_state
from .token_batching import can_repack, counted_inputs, is_empty_slot, repack_step

logger = logging.getLogger(__name__)

# Checkpoint files that the final model folder does not get (the optimizer and the rest of the training state).
_RESUME_ONLY = ("optimizer.pt", "scheduler.pt", "scaler.pt", "training_args.bin", "trainer_state.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "qwen.tiktoken")


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
        self._flops_params: tuple | None = None
        self._tokens_pending: torch.Tensor | None = None  # tokens seen, counted on the device (see flush_token_count)
        self._nan_inf_filter: bool | None = None  # decided at the first training step
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
        """The Trainer's count (6 x tokens x non-embedding parameters) with the parameter count taken once: the
        Trainer walks the whole module tree twice per micro-batch for it."""
        inputs = counted_inputs(inputs)
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if main_input not in inputs or not hasattr(self.model, "num_parameters"):
            return 0
        if self._flops_params is None or self._flops_params[0] is not self.model:
            self._flops_params = (self.model, self.model.num_parameters(exclude_embeddings=True))
        return 6 * inputs[main_input].numel() * self._flops_params[1]

    def _clip_grad_norm(self, model):
        """Gradient clipping over the trainable parameters, listed once (the Trainer lists all parameters of the
        model at every step; frozen ones have no gradient to clip); the non-finite guard checks the norm it
        computed. Other setups keep the Trainer's own."""
        norm = self._trainable_grad_norm(model, self.args.max_grad_norm)
        return super()._clip_grad_norm(model) if norm is None else norm

    def _get_grad_norm(self, model, grad_norm=None):
        # without clipping the Trainer still measures the norm for the log: the same, over the listed parameters
        if grad_norm is None:
            grad_norm = self._trainable_grad_norm(model, float("inf"))
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def _trainable_grad_norm(self, model, max_norm: float):
        """``clip_grad_norm_`` over :func:`trainable_parameters` (handed to the guard), or None where the Trainer's
        own handling is needed (DeepSpeed, FSDP, mixed device meshes, a Trainer without these hooks)."""
        from accelerate.utils import DistributedType

        mixed = getattr(self, "_has_mixed_mesh_grads", None)
        if self.accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_GPU) or \
                mixed is None or mixed(model):
            return None
        norm = self.accelerator.clip_grad_norm_(trainable_parameters(model), max_norm)
        if self.guard is not None:
            self.guard.note_grad_norm(norm)
        return norm

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.compute_loss_func is not None and model.training and "input_ids" in inputs:
            from ..models.fast.loss import no_logits

            inputs = {**inputs, "logits_to_keep": no_logits(inputs["input_ids"])}
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if is_empty_slot(inputs):  # a slot of a repacked step: its samples ran in a packed micro-batch
            return torch.zeros((), device=self.args.device)
        self._take_over_nan_inf_filter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.guard is not None:
            self.guard.note_loss(loss)
        if self._nan_inf_filter:
            # the Trainer's `logging_nan_inf_filter`, on the device: a non-finite loss is logged as the mean of the
            # losses since the last log, exactly as the Trainer does, without its host sync at every micro-batch
            fill = self._tr_loss / (1 + self.state.global_step - self._globalstep_last_logged)
            loss = torch.where(torch.isfinite(loss), loss, fill.to(loss.dtype))
        return loss

    def _take_over_nan_inf_filter(self) -> None:
        """The Trainer applies `logging_nan_inf_filter` with ``bool(torch.isnan(loss))`` after every micro-batch:
        a host sync that leaves the GPU idle while the host prepares the next micro-batch. Where this Trainer keeps
        its running loss as a device tensor (``_tr_loss``, transformers 5), the same filter runs on the device in
        :meth:`training_step` instead, and the Trainer's own check is turned off."""
        if self._nan_inf_filter is None:
            own = bool(self.args.logging_nan_inf_filter) and isinstance(getattr(self, "_tr_loss", None), torch.Tensor)
            self._nan_inf_filter = own and hasattr(self, "_globalstep_last_logged")
            if self._nan_inf_filter:
                self.args.logging_nan_inf_filter = False  # applied here, on the device

    def _track_num_input_tokens(self, inputs):
        """Tokens seen, counted on the device and added to ``state.num_input_tokens_seen`` when something reads
        it (a log, a checkpoint, the end of training): the Trainer's ``.item()`` at every micro-batch waits for
        the GPU. Several processes keep the Trainer's count (a collective every rank takes together)."""
        inputs = counted_inputs(inputs)  # the original micro-batch: tokens_seen equals `off`'s
        mode = self.args.include_num_input_tokens_seen
        name = getattr(self.model, "main_input_name", "input_ids")
        if self.args.world_size > 1 or mode in ("no", False, None) or not hasattr(inputs, "get") \
                or name not in inputs:
            return super()._track_num_input_tokens(inputs)
        if mode != "non_padding":
            self.state.num_input_tokens_seen += inputs[name].numel()
            return None
        mask = inputs.get("attention_mask")
        if not isinstance(mask, torch.Tensor):  # the Trainer counts by the pad id here
            return super()._track_num_input_tokens(inputs)
        count = mask.sum()
        self._tokens_pending = count if self._tokens_pending is None else self._tokens_pending + count
        return None

    def flush_token_count(self) -> None:
        """Add the tokens counted on the device to ``state.num_input_tokens_seen`` (one host sync)."""
        if self._tokens_pending is not None:
            pending, self._tokens_pending = self._tokens_pending, None
            self.state.num_input_tokens_seen += int(pending.item())

    def log(self, logs, *args, **kwargs):
        self.flush_token_count()
        return super().log(logs, *args, **kwargs)

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

    def train(self, resume_from_checkpoint=None, **kwargs):
        """Train; a full disk at any write (logs, checkpoints) ends the run with one message naming the folder.

        A resumed run reports the training loss of the whole run, and one resumed from its last step trains nothing.
        """
        state = read_state(resume_from_checkpoint) if isinstance(resume_from_checkpoint, str) else None
        total = last_step(state, self.args) if state else None
        if total is not None and int(state.get("global_step") or 0) >= total and not (
                self.is_deepspeed_enabled or self.is_fsdp_enabled):  # those load weights after preparing: train
            return self._finish_from(resume_from_checkpoint, total)
        out = self.args.output_dir
        with disk_full_guard(out, self.save_bytes(final=False), what="write the training logs and checkpoints",
                             error=TrainingError, hint=self._space_hint(), cleanup=[Path(out) / STAGING]):
            try:
                result = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
            except BaseException as err:
                # training ended, with an error: let callbacks close the progress bar (so the error starts on a
                # line of its own) and put the signal handlers back
                try:
                    self.callback_handler.on_train_end(self.args, self.state, self.control)
                except Exception:  # noqa: BLE001 - the first error is the one to report
                    logger.debug("on_train_end after an error failed", exc_info=True)
                if isinstance(err, KeyboardInterrupt):  # a second Ctrl-C / SIGTERM: say what is kept
                    newest = newest_checkpoint(out)
                    logger.warning("stopped at once at step %d; %s. Continue with: resume_from_checkpoint=auto",
                                   self.state.global_step, f"{newest} is the newest complete checkpoint" if newest
                                   else f"{out} holds no checkpoint yet, so that starts over")
                raise
            finally:
                try:
                    self.flush_token_count()
                except Exception:  # noqa: BLE001 - after a failed run (a CUDA error, say) the first error is the one
                    logger.debug("tokens seen not flushed", exc_info=True)
        run_loss = self._run_loss()
        if resume_from_checkpoint and math.isfinite(run_loss):
            # Hugging Face averages over this session's steps only; report the whole run's, as without the stop
            result = TrainOutput(result.global_step, run_loss, {**result.metrics, "train_loss": run_loss})
        return result

    def _finish_from(self, checkpoint: str, total: int) -> TrainOutput:
        """The run was stopped after saving its last checkpoint but before writing its model: nothing is left to
        train (Hugging Face would take one more step, past max_steps), so load that checkpoint and return its
        metrics; the caller then writes the outputs exactly as at the end of an uninterrupted run."""
        self._load_from_checkpoint(checkpoint)  # the Trainer's own loader: adapters, full or sharded weights
        self.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
        logger.info("%s is the run's last step (%d of %d): nothing left to train; writing the outputs from it",
                    checkpoint, self.state.global_step, total)
        metrics = {"epoch": self.state.epoch, "total_flos": self.state.total_flos, "train_loss": self._run_loss()}
        written = Path(self.args.output_dir) / "train_results.json"
        try:
            earlier = json.loads(written.read_text(encoding="utf-8")) if written.is_file() else {}
        except ValueError:
            earlier = {}
        if isinstance(earlier, dict) and earlier.get("epoch") == metrics["epoch"]:
            metrics.update(earlier)  # the stopped run got as far as writing its metrics: keep them exactly
        return TrainOutput(self.state.global_step, metrics["train_loss"], metrics)

    def _run_loss(self) -> float:
        """Mean training loss over the whole run, from the logged losses (each weighted by the steps it covers)."""
        total = steps = 0.0
        last = 0
        for row in self.state.log_history:
            if "loss" in row and "step" in row:
                total += row["loss"] * (row["step"] - last)
                steps += row["step"] - last
                last = row["step"]
        return total / steps if steps else float("nan")

    def save_bytes(self, *, final: bool) -> int:
        """Bytes the next checkpoint (or, with ``final``, the final model folder) will take on disk: the newest
        checkpoint's size when there is one, else the weights, Adam's two moments and the tokenizer files."""
        newest = newest_checkpoint(self.args.output_dir)
        if newest is not None:
            files = [p for p in newest.rglob("*") if p.is_file()]
            if final:
                files = [p for p in files if p.name not in _RESUME_ONLY and not p.name.startswith("rng_state")]
            return sum(p.stat().st_size for p in files)
        model = self.model
        params = list(model.parameters())
        trainable = [p for p in params if p.requires_grad]
        saved = trainable if hasattr(model, "peft_config") else params  # a PEFT model saves only its adapter
        size = sum(p.numel() * p.element_size() for p in saved)
        if not final and not self.args.save_only_model:
            size += sum(8 * p.numel() for p in trainable)  # Adam's two fp32 moments
        source = Path(str(getattr(self.processing_class, "name_or_path", "") or ""))
        if source.is_dir():
            size += sum(folder_bytes(source / name) for name in _TOKENIZER_FILES)
        return size

    def _space_hint(self) -> str:
        newest = newest_checkpoint(self.args.output_dir)
        kept = f"; {newest.name} and the checkpoints before it are kept" if newest is not None else ""
        return ("free some space or set `output_dir` on a disk with room, then run the same command with "
                f"`resume_from_checkpoint: auto` to continue{kept}")

    @contextmanager
    def saving(self, folder: str | Path, what: str, *, final: bool, cleanup: Sequence[str | Path]) -> Iterator[None]:
        """Check the free space before a save, and turn a disk that fills up during it into one message (after
        removing the partial files in ``cleanup``; complete checkpoints are never touched)."""
        needed = self.save_bytes(final=final)
        hint = self._space_hint()
        if self.args.should_save:
            # margin: file-system blocks of a dozen files, and an estimate that may be a little short
            ensure_free_space(folder, needed, what=what, error=TrainingError, hint=hint,
                              margin=64 * 1024 + needed // 20)
        with disk_full_guard(folder, needed, what=what, error=TrainingError, hint=hint, cleanup=cleanup):
            yield

    def _get_output_dir(self, trial):
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING) if self._staging else run_dir

    def _save_checkpoint(self, model, trial):
        """Write ``output_dir/.staging/checkpoint-N`` then rename it to ``output_dir/checkpoint-N``.

        A crash while saving leaves only the staging folder, which the next run removes, so every
        ``checkpoint-N`` folder is complete and resume always finds a usable one.
        """
        self.flush_token_count()  # the saved state has every token seen so far
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._staging = True
        try:
            with self.saving(run_dir, f"save {name}", final=False, cleanup=[run_dir / STAGING]):
                super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()
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
