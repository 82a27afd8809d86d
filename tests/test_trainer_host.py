"""The Trainer overrides that spare the host a walk of the module tree: the same numbers as the Trainer's own."""

from __future__ import annotations

import torch
from transformers import Seq2SeqTrainingArguments, Trainer

from fast_models import tiny_model
from loraforge.train.callbacks import NonFiniteGuard, trainable_parameters
from loraforge.train.trainer import LoraforgeTrainer


def _trainer(tmp_path, model):
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), report_to="none", max_grad_norm=0.5, use_cpu=True)
    return LoraforgeTrainer(model=model, args=args)


def test_flops_count_equals_the_trainers_and_counts_parameters_once(tmp_path, monkeypatch):
    model = tiny_model("qwen3")
    trainer = _trainer(tmp_path, model)
    inputs = {"input_ids": torch.ones(2, 7, dtype=torch.long)}
    want = Trainer.floating_point_ops(trainer, inputs)
    calls = []
    count = model.num_parameters
    monkeypatch.setattr(model, "num_parameters", lambda **kw: calls.append(kw) or count(**kw))
    assert trainer.floating_point_ops(inputs) == want == 6 * 14 * count(exclude_embeddings=True)
    assert trainer.floating_point_ops({"input_ids": torch.ones(1, 3, dtype=torch.long)}) == 6 * 3 * count(
        exclude_embeddings=True)
    assert len(calls) == 1
    assert trainer.floating_point_ops({"labels": torch.ones(1, 3)}) == 0  # no main input: the Trainer's 0


def test_clipping_over_trainable_parameters_equals_the_trainers(tmp_path):
    grads = {}
    for own in (True, False):
        torch.manual_seed(0)
        model = tiny_model("qwen3")
        trainer = _trainer(tmp_path, model)
        model(input_ids=torch.randint(0, 100, (2, 9)), labels=torch.randint(0, 100, (2, 9))).loss.mul(50).backward()
        norm = trainer._clip_grad_norm(model) if own else Trainer._clip_grad_norm(trainer, model)
        grads[own] = (float(norm), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert grads[True][0] == grads[False][0] > 0.5  # clipped
    assert all(torch.equal(a, b) for a, b in zip(grads[True][1], grads[False][1], strict=True))


def test_unclipped_grad_norm_for_the_log_equals_the_trainers(tmp_path):
    torch.manual_seed(0)
    model = tiny_model("qwen3")
    trainer = _trainer(tmp_path, model)
    model(input_ids=torch.randint(0, 100, (2, 9)), labels=torch.randint(0, 100, (2, 9))).loss.backward()
    before = [p.grad.clone() for p in trainable_parameters(model)]
    assert float(trainer._get_grad_norm(model)) == float(Trainer._get_grad_norm(trainer, model)) > 0
    assert all(torch.equal(a, p.grad) for a, p in zip(before, trainable_parameters(model), strict=True))


def test_trainable_parameters_are_listed_once_per_model():
    model = tiny_model("qwen3")
    first = trainable_parameters(model)
    assert first is trainable_parameters(model)
    assert [id(p) for p in first] == [id(p) for p in model.parameters() if p.requires_grad]
    guard = NonFiniteGuard(3, uses_grad_scaler=False)
    for p in first:
        p.grad = torch.zeros_like(p)
    assert bool(guard._grads_finite(model))
    first[0].grad[0] = float("nan")
    assert not bool(guard._grads_finite(model))


def test_guard_checks_the_norm_clipping_computed_instead_of_its_own(tmp_path, monkeypatch):
    from types import SimpleNamespace

    model = tiny_model("qwen3")
    guard = NonFiniteGuard(5, uses_grad_scaler=False)
    trainer = _trainer(tmp_path, model)
    trainer.guard = guard
    model(input_ids=torch.randint(0, 100, (2, 9)), labels=torch.randint(0, 100, (2, 9))).loss.backward()
    monkeypatch.setattr(NonFiniteGuard, "_grads_finite", staticmethod(lambda m: 1 / 0))  # must not be needed
    state = SimpleNamespace(global_step=0)
    trainer._clip_grad_norm(model)
    guard.on_pre_optimizer_step(None, state, None, model=model)
    assert guard.total_skipped == 0 and all(p.grad is not None for p in trainable_parameters(model))
    guard.note_grad_norm(torch.tensor(float("nan")))
    guard.on_pre_optimizer_step(None, state, None, model=model)
    assert guard.total_skipped == 1 and all(p.grad is None for p in trainable_parameters(model))
    monkeypatch.undo()  # no clipping this step: the guard computes the norms itself
    for p in trainable_parameters(model):
        p.grad = torch.full_like(p, float("inf"))
    guard.on_pre_optimizer_step(None, state, None, model=model)
    assert guard.total_skipped == 2


def test_tokens_seen_are_counted_without_a_sync_and_read_when_logged(tmp_path, monkeypatch):
    """Each micro-batch's non-padding tokens are summed on the device (no ``.item()``); a log (or a checkpoint, or
    the end of training) brings them to ``state.num_input_tokens_seen``: the Trainer's own total."""
    trainer = _trainer(tmp_path, tiny_model("qwen3"))
    assert trainer.args.include_num_input_tokens_seen in ("non_padding", "no", False, True, "all")
    trainer.args.include_num_input_tokens_seen = "non_padding"
    masks = [torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]), torch.tensor([[1, 1, 1, 1]])]

    def no_item(self):
        raise AssertionError("a host sync while counting tokens")

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "item", no_item)
        for mask in masks:
            trainer._track_num_input_tokens({"input_ids": torch.ones_like(mask), "attention_mask": mask})
    assert trainer.state.num_input_tokens_seen == 0
    trainer.log({"loss": 1.0})
    assert trainer.state.num_input_tokens_seen == 9
    want = Trainer(model=trainer.model, args=trainer.args)
    for mask in masks:
        Trainer._track_num_input_tokens(want, {"input_ids": torch.ones_like(mask), "attention_mask": mask})
    assert want.state.num_input_tokens_seen == 9
    trainer.args.include_num_input_tokens_seen = "all"
    trainer._track_num_input_tokens({"input_ids": torch.ones(2, 5, dtype=torch.long)})
    assert trainer.state.num_input_tokens_seen == 19  # counted on the host at once: no device count to flush


def test_nan_inf_filter_runs_on_the_device_as_the_trainer_runs_it(tmp_path, monkeypatch):
    """`logging_nan_inf_filter`: a non-finite micro-batch loss counts as the mean logged loss so far, as in the
    Trainer, computed on the device; the Trainer's own (host-syncing) check is off; the guard still sees the NaN."""
    trainer = _trainer(tmp_path, tiny_model("qwen3"))
    trainer.guard = NonFiniteGuard(3, uses_grad_scaler=False)
    trainer._tr_loss = torch.tensor(6.0)
    trainer._globalstep_last_logged = 0
    trainer.state.global_step = 2
    losses = iter([torch.tensor(float("nan")), torch.tensor(1.5)])
    monkeypatch.setattr(Trainer, "training_step", lambda self, model, inputs, n=None: next(losses))
    assert trainer.args.logging_nan_inf_filter
    assert trainer.training_step(trainer.model, {"input_ids": torch.ones(1, 2, dtype=torch.long)}).item() == 2.0
    assert not trainer.args.logging_nan_inf_filter  # applied by training_step from now on
    assert not bool(trainer.guard._loss_ok)  # the step will be skipped
    assert trainer.training_step(trainer.model, {"input_ids": torch.ones(1, 2, dtype=torch.long)}).item() == 1.5


def _adam_run(guarded: bool, steps: list[str], skip_steps: tuple[int, ...] = ()):
    """AdamW (fused) over one parameter for ``steps`` ("ok" or "nan" losses); with ``guarded`` the guard decides,
    else the steps in ``skip_steps`` are simply not taken (the reference of an exact skip)."""
    from types import SimpleNamespace

    param = torch.nn.Parameter(torch.linspace(-1, 1, 6))
    model = torch.nn.Module()
    model.p = param
    opt = torch.optim.AdamW([param], lr=0.1, weight_decay=0.1, fused=True)
    guard = NonFiniteGuard(max_consecutive=3, uses_grad_scaler=False)
    for step, kind in enumerate(steps):
        param.grad = torch.full_like(param, float("nan")) if kind == "nan" else torch.cos(param.detach() * (step + 1))
        if guarded:
            guard.note_loss(torch.tensor(float("nan") if kind == "nan" else 1.0))
            guard.note_grad_norm(torch.linalg.vector_norm(param.grad))
            guard.on_pre_optimizer_step(None, SimpleNamespace(global_step=step), None, model=model, optimizer=opt)
            assert param.grad is not None  # nothing read back: the optimizer's own kernel skips
            opt.step()
        elif step not in skip_steps:
            opt.step()
    return guard, param, opt


def test_guard_skips_on_the_device_with_an_optimizer_that_takes_found_inf():
    """With fused AdamW the guard hands the flag to the optimizer (``found_inf``): a non-finite step leaves the
    weights, the moments and the step count exactly as if it had not run, and it is counted one step later
    without a host sync before the step."""
    steps = ["ok", "nan", "ok", "ok"]
    guard, param, opt = _adam_run(True, steps)
    _, ref, ref_opt = _adam_run(False, steps, skip_steps=(1,))
    assert torch.equal(param.detach(), ref.detach())
    state, ref_state = opt.state[param], ref_opt.state[ref]
    assert all(torch.equal(state[k], ref_state[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert float(state["step"]) == 3
    guard.on_train_end(None, None, None)
    assert guard.total_skipped == 1 and guard.skipped_steps == [2] and not hasattr(opt, "found_inf")


def test_guard_on_the_device_counts_late_and_still_stops_after_consecutive_skips():
    from types import SimpleNamespace

    import pytest

    from loraforge.errors import TrainingError

    guard, _, _ = _adam_run(True, ["ok", "nan"])
    assert guard.total_skipped == 0  # step 2's flag is read at the next step (or log, or the end)
    guard.on_log(None, None, None)
    assert guard.total_skipped == 1
    with pytest.raises(TrainingError, match="3 consecutive steps .steps 1, 2, 3."):
        _adam_run(True, ["nan", "nan", "nan", "ok"])
    guard, param, opt = _adam_run(True, ["nan", "nan", "nan"])  # the third comes to light at the end
    with pytest.raises(TrainingError, match="3 consecutive"):
        guard.on_train_end(None, None, None)
    # an optimizer without found_inf (foreach AdamW): the flag is read before the step, the gradients dropped
    holder = torch.nn.Module()
    holder.p = param
    plain = torch.optim.AdamW([param], lr=0.1, foreach=True)
    guard = NonFiniteGuard(3, uses_grad_scaler=False)
    param.grad = torch.ones_like(param)
    guard.note_loss(torch.tensor(float("nan")))
    guard.on_pre_optimizer_step(None, SimpleNamespace(global_step=0), None, model=holder, optimizer=plain)
    assert guard.total_skipped == 1 and param.grad is None and not hasattr(plain, "found_inf")
