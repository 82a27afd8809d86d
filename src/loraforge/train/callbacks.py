"""Trainer callbacks: the jsonl log, the progress bar, graceful interrupts, and the non-finite guard."""

from __future__ import annotations

import json
import logging
import math
import signal
import time
import weakref
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from ..errors import TrainingError

logger = logging.getLogger(__name__)


def _fmt_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


_TRAINABLE: "weakref.WeakKeyDictionary[torch.nn.Module, list[torch.nn.Parameter]]" = weakref.WeakKeyDictionary()


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of ``model`` that train, listed once per model: walking the module tree of a PEFT-wrapped
    8B model takes ~25 ms of host time, and the step needs this list more than once (gradient clipping, the
    non-finite guard). Which parameters train is fixed before training starts."""
    params = _TRAINABLE.get(model)
    if params is None:
        params = _TRAINABLE[model] = [p for p in model.parameters() if p.requires_grad]
    return params


class ThroughputTracker:
    """Elapsed time and tokens/s since this process started training (resume-aware), and the seconds the
    training loop waited for its next batches (``data_wait_s``, added by ``LoraforgeTrainer.get_batch_samples``)."""

    def __init__(self) -> None:
        self.start_time = time.time()
        self.start_step = 0
        self.start_tokens = 0
        self.data_wait_s = 0.0

    def begin(self, state) -> None:
        self.start_time = time.time()
        self.start_step = state.global_step
        self.start_tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        self.data_wait_s = 0.0

    def elapsed(self) -> float:
        return time.time() - self.start_time

    def tokens_per_second(self, state) -> float:
        tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0) - self.start_tokens
        return tokens / max(self.elapsed(), 1e-6)

    def remaining(self, state) -> float:
        done = state.global_step - self.start_step
        if done <= 0:
            return float("nan")
        return self.elapsed() / done * (state.max_steps - state.global_step)


class JsonlLogCallback(TrainerCallback):
    """Append one JSON line per logging step to ``output_dir/trainer_log.jsonl`` (main process only)."""

    def __init__(self, output_dir: str, tracker: ThroughputTracker, guard: "NonFiniteGuard | None" = None):
        self.path = Path(output_dir) / "trainer_log.jsonl"
        self.tracker = tracker
        self.guard = guard

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if state.global_step == 0 and self.path.exists():
                self.path.unlink()  # a fresh run starts a fresh log; a resumed run appends
            elif self.path.exists():
                self._keep_until(state.global_step)

    def _keep_until(self, step: int) -> None:
        """Drop the rows a killed run logged after the checkpoint it resumes from (they are trained and logged
        again), and a last line cut short by the kill, so the log has each step once."""
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("current_steps", 0) <= step:
                kept.append(line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(self.path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "train_loss" in logs:
            return  # the final summary (train_loss, total_flos) is not a step; it goes to train_results.json
        row = {
            "current_steps": state.global_step,
            "total_steps": state.max_steps,
            "loss": logs.get("loss"),
            "eval_loss": logs.get("eval_loss"),
            "lr": logs.get("learning_rate"),
            "epoch": round(state.epoch, 4) if state.epoch is not None else None,
            "grad_norm": logs.get("grad_norm"),
            "tokens_seen": int(getattr(state, "num_input_tokens_seen", 0) or 0),
            "tokens_per_second": round(self.tracker.tokens_per_second(state), 2),
            "percentage": round(100 * state.global_step / max(state.max_steps, 1), 2),
            "data_wait_s": round(self.tracker.data_wait_s, 3),  # cumulative; its share of elapsed_time should be ~0
            "elapsed_time": _fmt_seconds(self.tracker.elapsed()),
            "remaining_time": _fmt_seconds(r) if not math.isnan(r := self.tracker.remaining(state)) else None,
        }
        if self.guard is not None:
            row["skipped_nonfinite"] = self.guard.total_skipped
        row = {k: v for k, v in row.items() if v is not None}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


class ProgressBarCallback(TrainerCallback):
    """A tqdm bar with ETA, loss and tokens/s. Replaces HF's ProgressCallback (which shows neither)."""

    def __init__(self, tracker: ThroughputTracker):
        self.tracker = tracker
        self.bar = None
        self.last_loss = None
        self.last_rate: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.tracker.begin(state)
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True,
                            unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
            post = {}
            if self.last_rate is not None:
                post["tok/s"] = f"{self.last_rate:.0f}"
            if self.last_loss is not None:
                post["loss"] = f"{self.last_loss:.4f}"
            self.bar.set_postfix(post, refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.last_loss = logs["loss"]
            # tokens seen are counted on the device and brought to the host when a step is logged
            self.last_rate = self.tracker.tokens_per_second(state)
        if self.bar is not None and logs and "eval_loss" in logs:
            self.bar.write(f"step {state.global_step}: eval_loss {logs['eval_loss']:.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class InterruptCallback(TrainerCallback):
    """Ctrl-C / SIGTERM: finish the current step, save a resumable checkpoint, then stop.

    A second signal stops at once (the newest complete checkpoint is still there).
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame):  # noqa: ARG002 - signal API
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        logger.warning("%s received: saving a checkpoint after this step (press Ctrl-C again to stop now)",
                       self.received)

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. a notebook worker): keep default handling
                pass

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class NonFiniteGuard(TrainerCallback):
    """Skip optimizer updates whose loss or gradient norm is not finite; stop after several in a row.

    The trainer hands over every micro-batch loss (``note_loss``); their finiteness is folded into one flag on
    the device. How a step is skipped depends on the optimizer:

    - An optimizer that takes a skip flag on the device (torch's fused Adam/AdamW/SGD, ``optim:
      adamw_torch_fused``, the default: ``_step_supports_amp_scaling``) gets it as ``found_inf``, the attribute
      its step reads for loss scaling: the update of a non-finite step is skipped by its own kernel (weights,
      moments and step counts untouched), with no host sync. The flag is copied to the host in the background
      and read at the next step (or log, or the end of training): the count, the warning and the stop after
      ``max_consecutive`` come one step later.
    - Any other optimizer: the flag is read before the step (one host sync per optimizer step), and the
      gradients of trainable parameters are dropped when it is set, so the optimizer leaves the weights alone.

    With fp16 loss scaling an inf gradient is normal (the scaler skips the step and lowers the scale, and owns
    ``found_inf``), so only a non-finite loss counts there, read before the step.
    """

    def __init__(self, max_consecutive: int, uses_grad_scaler: bool):
        self.max_consecutive = max(1, max_consecutive)
        self.uses_grad_scaler = uses_grad_scaler
        self.total_skipped = 0
        self.consecutive = 0
        self.skipped_steps: list[int] = []
        self._loss_ok: torch.Tensor | bool = True
        self._grad_norm: torch.Tensor | None = None
        self._pending: list[tuple[int, torch.Tensor, object]] = []  # (step, "skipped" flag, its copy's event)
        self._flagged: object = None  # the optimizer whose found_inf the guard sets

    def note_loss(self, loss: torch.Tensor) -> None:
        """Fold one micro-batch loss into the step's finiteness flag (it stays on the device: no sync)."""
        self._loss_ok = torch.isfinite(loss.detach()).all() & self._loss_ok

    def note_grad_norm(self, norm: torch.Tensor) -> None:
        """The step's total gradient norm as gradient clipping computed it: the guard checks it instead of
        computing the norms of every gradient a second time."""
        self._grad_norm = norm

    @staticmethod
    def _grads_finite(model) -> torch.Tensor | bool:
        grads = [p.grad for p in trainable_parameters(model) if p.grad is not None]
        if not grads:
            return True
        norms = torch._foreach_norm(grads) if hasattr(torch, "_foreach_norm") else [g.norm() for g in grads]
        return torch.isfinite(torch.stack([n.float() for n in norms]).sum())

    def _skip_target(self, optimizer) -> torch.optim.Optimizer | None:
        """The torch optimizer (under accelerate's wrapper) when its step takes ``found_inf``; else None."""
        if self.uses_grad_scaler or type(optimizer).__name__ == "DeepSpeedOptimizerWrapper":
            return None  # the scaler owns found_inf; DeepSpeed steps inside its engine
        inner = optimizer if isinstance(optimizer, torch.optim.Optimizer) else getattr(optimizer, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer) and getattr(inner, "_step_supports_amp_scaling", False):
            return inner
        return None

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        ok, norm = self._loss_ok, self._grad_norm
        self._grad_norm = None
        self._loss_ok = True
        if not self.uses_grad_scaler and model is not None:
            ok = (torch.isfinite(norm) if isinstance(norm, torch.Tensor) else self._grads_finite(model)) & ok
        step = state.global_step + 1
        self._settle(wait=False)
        target = self._skip_target(optimizer)
        if target is not None:
            target.__dict__.pop("found_inf", None)  # last step's flag
        if target is not None and isinstance(ok, torch.Tensor):
            skipped = ~ok.reshape(())
            target.found_inf = skipped.float()  # the fused kernel skips the update on the device
            self._flagged = target
            if skipped.is_cuda:
                flag = torch.empty((), dtype=torch.bool, pin_memory=True)
                flag.copy_(skipped, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            else:
                flag, event = skipped, None
            self._pending.append((step, flag, event))
            return
        bad = not bool(ok)  # the one host sync of the step
        if bad:
            for p in model.parameters():
                p.grad = None  # the optimizer skips parameters without gradients
        self._record(step, bad)

    def _settle(self, wait: bool) -> None:
        """Count the steps whose flag has reached the host (all of them with ``wait``)."""
        while self._pending:
            step, flag, event = self._pending[0]
            if event is not None:
                if not wait and not event.query():
                    return
                event.synchronize()
            self._pending.pop(0)
            self._record(step, bool(flag))

    def _record(self, step: int, bad: bool) -> None:
        if not bad:
            self.consecutive = 0
            return
        self.total_skipped += 1
        self.consecutive += 1
        self.skipped_steps.append(step)
        logger.warning("step %d: non-finite loss or gradient norm, update skipped (%d skipped so far)",
                       step, self.total_skipped)
        if self.consecutive >= self.max_consecutive:
            self._pending.clear()
            raise TrainingError(
                f"the loss or gradient norm was non-finite at {self.consecutive} consecutive steps "
                f"(steps {', '.join(map(str, self.skipped_steps[-self.consecutive:]))}); training stopped",
                hint="lower learning_rate, use bf16 instead of fp16, check the data for empty or huge samples, "
                "or resume from the last checkpoint (resume_from_checkpoint: true)")

    def on_log(self, args, state, control, **kwargs):
        self._settle(wait=False)  # the Trainer has just read the loss: the flags before it are on the host

    def on_save(self, args, state, control, **kwargs):
        self._settle(wait=True)

    def on_train_end(self, args, state, control, **kwargs):
        target, self._flagged = self._flagged, None
        if target is not None:
            target.__dict__.pop("found_inf", None)  # the optimizer steps normally outside this run
        self._settle(wait=True)
