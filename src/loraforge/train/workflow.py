"""The visible training flow: config -> tokenizer/template -> data -> model -> Trainer -> outputs.

Read this file top to bottom to know everything `loraforge train` does.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import RunConfig
from ..errors import TrainingError
from .callbacks import InterruptCallback, JsonlLogCallback, NonFiniteGuard, ProgressBarCallback, ThroughputTracker
from .checkpoint import FINAL_STAGING, finished_run, publish, resolve_resume
from .distributed import keep_single_device
from .resume_world import GlobalBatch, check_resume

logger = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    output_dir: Path
    metrics: dict
    interrupted: bool = False
    checkpoint: str | None = None


def _print_block(title: str, lines: list[str]) -> None:
    logger.info("%s\n%s", title, "\n".join(f"  {line}" for line in lines))


def _print_estimate(cfg: RunConfig) -> None:
    """Before loading weights: will this fit on the detected GPU(s)?"""
    try:
        from ..estimate import detect_gpus, estimate_for_config
    except ImportError:
        return
    gpus = detect_gpus()
    if not gpus:
        return
    try:
        est = estimate_for_config(cfg, gpu=cfg.model.estimate_gpu)
    except Exception as err:  # noqa: BLE001 - the estimate is advice; never block training on it
        logger.info("memory estimate unavailable: %s", err)
        return
    _print_block("memory estimate (per GPU):", est.summary_lines())
    if not est.fits:
        logger.warning("this run will probably NOT fit in GPU memory. Cheapest changes that would fit:\n%s",
                       "\n".join(f"  - {s}" for s in est.suggestions) or "  (none found)")


def write_run_config(cfg: RunConfig, output_dir: Path) -> None:
    """The resolved config, loadable by `loraforge train`, so every output folder says how it was made."""
    data = cfg.to_dict()
    tmp = output_dir / "run_config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    tmp.replace(output_dir / "run_config.yaml")


def write_model_card(cfg: RunConfig, output_dir: Path, metrics: dict, summary_lines: list[str]) -> None:
    f, m, d = cfg.finetuning, cfg.model, cfg.data
    lines = [
        f"# {output_dir.name}", "",
        f"Fine-tuned from `{m.model_name_or_path}` with [loraforge](https://github.com/loraforge/loraforge) "
        f"({f.finetuning_type}{', QLoRA ' + str(m.quantization_bit) + '-bit' if m.quantization_bit else ''}).", "",
        "## Training", "",
        f"- datasets: `{d.dataset}`; template: `{d.template or d.prompt_template and 'plain-text prompt' or 'auto'}`; "
        f"cutoff_len {d.cutoff_len}",
        *[f"- {line}" for line in summary_lines],
        "", "## Results", "", "```json", json.dumps(metrics, indent=2), "```", "",
        "## Use", "", "```bash",
        f"loraforge chat run_config.yaml adapter_name_or_path={output_dir}" if f.finetuning_type == "lora"
        else f"loraforge chat run_config.yaml model_name_or_path={output_dir}",
        "```", "",
    ]
    (output_dir / "README.md").write_text("\n".join(lines), encoding="utf-8")


def run_train(cfg: RunConfig, *, extra_callbacks: list | None = None) -> TrainOutcome:
    """Train as ``cfg`` says and write every output into ``cfg.training.output_dir``."""
    from transformers import set_seed
    from transformers.trainer_callback import ProgressCallback

    from ..data.collator import build_collator
    from ..data.loader import build_datasets
    from ..data.templates import resolve_template
    from ..models.fast import apply_fast_path, plan_fast_path
    from ..models.fast.loss import FusedCausalLMLoss
    from ..models.loader import load_model, load_tokenizer, summarize_model
    from .plotting import plot_loss
    from .checkpoint_policy import apply_checkpoint_plan, plan_checkpointing
    from .token_budget import plan_token_batching
    from .trainer import LoraforgeTrainer

    args = cfg.training
    # one process = one GPU (or one model split over them): never torch.nn.DataParallel over the visible GPUs
    keep_single_device(args, split_model=cfg.model.quantization_device_map == "auto")
    output_dir = Path(args.output_dir)
    finished = finished_run(args)  # resuming a run that already ended: say so, change nothing, exit 0
    if finished:
        logger.info(finished)
        return TrainOutcome(output_dir, _read_json(output_dir / "all_results.json"))
    resume = resolve_resume(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    if resume:  # on any number of GPUs, as long as the global batch is the checkpoint's
        check_resume(resume, args)
    output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed)
    _print_estimate(cfg)

    # 1. tokenizer and template: the saved tokenizer renders exactly what training used
    tokenizer = load_tokenizer(cfg.model)
    template = resolve_template(cfg.data, tokenizer)
    if template.apply_to_tokenizer(tokenizer):  # the template added special tokens: grow the embeddings
        cfg.model.resize_vocab = True

    # 2. data: every dropped row is counted and reported; too many bad rows already raised a DataError
    # (one process per node builds the cache, or one in all when the nodes share its file system)
    with args.main_process_first(local=not cfg.data.data_shared_file_system, desc="dataset preprocessing"):
        bundle = build_datasets(cfg, tokenizer, template, purpose="train")
    _print_block("data:", bundle.report.lines(cutoff_len=cfg.data.cutoff_len))

    # 3. model: quantization, adapters, gradient checkpointing; the fast path's modules where covered
    plan = plan_fast_path(cfg)
    model = load_model(cfg, tokenizer, is_trainable=True, fast_path=plan.enabled)
    fast = apply_fast_path(model, plan)
    loss_func = FusedCausalLMLoss(model) if plan.fused_loss else None
    if fast.enabled and args.ddp_find_unused_parameters is None:
        # The fast path's checkpoint recomputes each layer inside backward (reentrant), so DDP must not mark the
        # layer's LoRA weights "unused" after forward; every adapter weight of a covered dense model is used.
        args.ddp_find_unused_parameters = False
    pissa_init_dir = None
    if cfg.finetuning.pissa_init and cfg.finetuning.pissa_convert and args.should_save:
        from ..models.adapters import save_pissa_initial

        pissa_init_dir = save_pissa_initial(model, str(output_dir))  # the reference for conversion at the end
    summary = summarize_model(model)
    token_batching = plan_token_batching(cfg, model, args)  # the same optimizer steps, fewer packed micro-batches
    # which layers recompute in backward (checkpoint_layers), for the largest micro-batch this run can form
    checkpointing = plan_checkpointing(cfg, model, args, token_batching.largest_micro_batch(args, cfg.data.cutoff_len))
    still_checkpointed = apply_checkpoint_plan(model, checkpointing)
    fast.offloaded = min(fast.offloaded, still_checkpointed)
    world = max(args.world_size, 1)
    effective = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
    summary_lines = summary.lines() + [
        f"effective batch size: {args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} "
        f"accumulation x {world} process(es) = {effective}",
        f"precision: {'bf16' if args.bf16 else 'fp16' if args.fp16 else 'fp32'}",
        checkpointing.line,
        fast.summary(),
        token_batching.line,
    ]
    _print_block("model:", summary_lines)

    # 4. trainer
    tracker = ThroughputTracker()
    guard = NonFiniteGuard(cfg.finetuning.max_nonfinite_steps, uses_grad_scaler=bool(args.fp16))
    interrupt = InterruptCallback()
    callbacks = [ProgressBarCallback(tracker), JsonlLogCallback(str(output_dir), tracker, guard), guard, interrupt,
                 GlobalBatch.for_args(args)]  # recorded in each checkpoint, for resuming on another GPU count
    loraplus = None
    if cfg.finetuning.loraplus_lr_ratio:
        loraplus = {"ratio": cfg.finetuning.loraplus_lr_ratio, "embedding_lr": cfg.finetuning.loraplus_lr_embedding}
    metric_kwargs = {}
    if cfg.finetuning.compute_accuracy:  # eval_accuracy from argmax ids, never whole logits
        from ..evaluate.accuracy import accuracy_metrics, argmax_logits

        metric_kwargs = {"compute_metrics": accuracy_metrics, "preprocess_logits_for_metrics": argmax_logits}
    if loss_func is not None:
        callbacks.append(loss_func.callback())  # its hook runs after those of DeepSpeed's wrapping
    trainer = LoraforgeTrainer(
        model=model, args=args, train_dataset=bundle.train, eval_dataset=bundle.eval,
        data_collator=build_collator(cfg, tokenizer), processing_class=tokenizer,
        callbacks=callbacks + list(extra_callbacks or []), guard=guard, loraplus=loraplus, **metric_kwargs,
        compute_loss_func=loss_func, micro_batch_tokens=token_batching.budget, tracker=tracker,
    )
    trainer.remove_callback(ProgressCallback)
    if args.should_save:
        write_run_config(cfg, output_dir)

    # 5. train
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(result.metrics)
    metrics["skipped_nonfinite_steps"] = guard.total_skipped
    if cfg.finetuning.include_effective_tokens_per_second:  # non-padding tokens trained per second, per process
        runtime = metrics.get("train_runtime") or 0.0
        seen = trainer.state.num_input_tokens_seen / world  # the state sums all processes
        metrics["effective_tokens_per_sec"] = round(seen / runtime, 3) if runtime > 0 else 0.0
    import torch

    if torch.cuda.is_available():
        metrics["train_peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    if interrupt.received:
        ckpt = str(output_dir / f"checkpoint-{trainer.state.global_step}")
        logger.warning("stopped by %s at step %d; checkpoint %s. Continue with: resume_from_checkpoint=auto",
                       interrupt.received, trainer.state.global_step, ckpt)
        return TrainOutcome(output_dir, metrics, interrupted=True, checkpoint=ckpt)

    # 6. outputs: weights/adapter + tokenizer, metrics, plot, card, predictions; trainer_state.json last, as the
    # mark of a finished run (see checkpoint.finished_run). The model goes into a staging folder first, then is
    # moved file by file: a crash never leaves a half-written adapter. A full disk ends with one message.
    staging = output_dir / FINAL_STAGING
    with trainer.saving(output_dir, "save the final model", final=True, cleanup=[staging]):
        trainer.save_model(str(staging))
        if pissa_init_dir:  # pissa_convert: store a plain LoRA (rank 2r) that applies to the original weights
            model.save_pretrained(str(staging), path_initial_model_for_weight_conversion=pissa_init_dir)
        trainer.accelerator.wait_for_everyone()
        if args.should_save:
            publish(staging, output_dir)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        if bundle.eval is not None and (args.eval_strategy != "no" or args.do_eval):
            eval_metrics = trainer.evaluate()
            trainer.log_metrics("eval", eval_metrics)
            trainer.save_metrics("eval", eval_metrics)
            metrics.update(eval_metrics)
        if args.should_save:
            if cfg.finetuning.plot_loss:
                image = plot_loss(output_dir)
                if image:
                    logger.info("loss plot: %s", image)
            write_model_card(cfg, output_dir, metrics, summary_lines)
        if args.do_predict and trainer.is_world_process_zero():  # one predictions file, written by rank 0
            from ..evaluate.predict import run_predict

            fast.restore()  # generate() needs the standard modules (KV cache, padding masks)
            run_predict(cfg, model=trainer.model, tokenizer=tokenizer)
        trainer.save_state()
    if guard.total_skipped:
        logger.warning("%d update(s) skipped because of non-finite loss/gradients (steps %s)",
                       guard.total_skipped, ", ".join(map(str, guard.skipped_steps)))
    logger.info("done: %s", os.path.abspath(output_dir))
    return TrainOutcome(output_dir, metrics)


def _flag(value) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("true", "1", "yes", "on")


def predict_only(config: str | None, overrides: list[str] | None) -> bool:
    """True when CONFIG asks `train` for predictions only, the way LLaMA-Factory runs evaluation
    (``llamafactory-cli train predict.yaml``): ``do_predict: true`` with ``do_train: false``, or with ``do_train``
    unset and no ``dataset`` (HF's ``do_train`` defaults to false there; loraforge's to true when there is data)."""
    from ..config.parser import parse_overrides, read_yaml

    raw = read_yaml(config) if config else {}
    raw.update(parse_overrides(overrides))
    if not _flag(raw.get("do_predict")):
        return False
    do_train = _flag(raw.get("do_train"))
    return do_train is False or (do_train is None and not raw.get("dataset"))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_finished(outcome: TrainOutcome) -> int:
    """Exit code for the CLI: 0 when finished, 130 when interrupted (checkpoint saved)."""
    from .distributed import rank_info

    if outcome.interrupted:
        return 130
    if rank_info().is_main and not (outcome.output_dir / "all_results.json").is_file():  # rank 0 writes it
        raise TrainingError(f"training ended but {outcome.output_dir}/all_results.json was not written")
    return 0
