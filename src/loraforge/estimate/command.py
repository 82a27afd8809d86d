"""``loraforge estimate``: will this run fit on my GPUs? (no weights are loaded, works offline)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .architectures import builtin_names
from .gpus import KNOWN_GPUS, gpu_names
from .scenario import METHODS, OPTIM_SHORT, OPTIMIZERS, PRECISIONS

EPILOG = """examples:
  loraforge estimate --model qwen3-8b --method qlora-4 --batch-size 4 --seq-len 2048 --gpu T4
  loraforge estimate examples/qwen3_lora_sft.yaml --gpu A10          # the same YAML as `train`
  loraforge estimate --model qwen3-14b --method qlora-4 --num-gpus 4 --zero 3 --offload-optimizer \\
      --offload-params --batch-size 2 --seq-len 2048 --gpu T10
  loraforge estimate --textbook                                      # the hand-worked 1B figures, explained
  loraforge estimate --list                                          # built-in models and GPUs
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``estimate`` subcommand."""
    p = subparsers.add_parser(
        "estimate", help="estimate GPU memory and host RAM of a training run (fits / does not fit)",
        description="Estimate the per-GPU peak memory of a training step (weights, adapter, gradients, optimizer "
        "states, activations, logits/loss, framework overhead) and host RAM, say whether it fits a GPU, and "
        "list the cheapest changes that make it fit. Reads the same YAML as `train` (plus key=value "
        "overrides) and/or the flags below; flags win. Needs no weights and no network.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="training YAML (optional; the flags alone are enough)")
    p.add_argument("--model", help=f"built-in name ({', '.join(builtin_names())}), a folder or config.json, or a "
                   "hub id already in the local cache")
    p.add_argument("--method", choices=METHODS, help="what is trained (qlora-8/qlora-4: LoRA on a quantized base)")
    p.add_argument("--lora-rank", type=int, help="LoRA rank r (default: config, else 8)")
    p.add_argument("--lora-target", help="LoRA modules: all, or a comma list such as q_proj,v_proj")
    p.add_argument("--batch-size", type=int, help="per-GPU micro-batch (default: config, else 1)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence, i.e. cutoff_len (default: config, else 2048)")
    p.add_argument("--grad-accum", type=int, help="gradient accumulation steps (default: config, else 1)")
    p.add_argument("--gradient-checkpointing", choices=("on", "off"), help="activation checkpointing (default on)")
    p.add_argument("--optim", help=f"optimizer: {', '.join(sorted(OPTIMIZERS))}, or {', '.join(OPTIM_SHORT)}")
    p.add_argument("--precision", choices=PRECISIONS, help="compute precision (default: config, else bf16, or "
                   "fp16 on a GPU without bf16)")
    p.add_argument("--num-gpus", type=int, help="GPUs (one process each)")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="DeepSpeed ZeRO stage")
    p.add_argument("--offload-optimizer", action="store_true", help="ZeRO: optimizer states in host RAM")
    p.add_argument("--offload-params", action="store_true", help="ZeRO-3: parameters in host RAM")
    p.add_argument("--gpu", help=f"GPU for the verdict: {', '.join(gpu_names())} (default: estimate_gpu, then "
                   "the detected GPU)")
    p.add_argument("--gpu-mem", type=float, help="GPU memory in GiB for the verdict (instead of --gpu)")
    p.add_argument("--textbook", action="store_true", help="also show the textbook 1B figures and why the "
                   "realistic numbers differ (default model: llama3.2-1b)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--list", action="store_true", help="list built-in models and known GPUs, then exit")
    p.set_defaults(func=run_estimate, accepts_overrides=True)


def _flag_overrides(args: argparse.Namespace, has_config: bool) -> dict[str, Any]:
    """The config keys the flags stand for (flags win over the YAML and key=value overrides)."""
    out: dict[str, Any] = {}
    if args.model:
        out["model_name_or_path"] = args.model
    if args.method:
        out["finetuning_type"] = "lora" if args.method.startswith("qlora") else args.method
        out["quantization_bit"] = int(args.method[-1]) if args.method.startswith("qlora") else None
    simple = {"lora_rank": args.lora_rank, "lora_target": args.lora_target, "cutoff_len": args.seq_len,
              "per_device_train_batch_size": args.batch_size, "gradient_accumulation_steps": args.grad_accum,
              "nproc_per_node": args.num_gpus}
    out.update({k: v for k, v in simple.items() if v is not None})
    if args.optim:
        out["optim"] = OPTIM_SHORT.get(args.optim.lower(), args.optim)
    if args.gradient_checkpointing:
        out["disable_gradient_checkpointing"] = args.gradient_checkpointing == "off"
    if args.precision:
        out.update(bf16=args.precision in ("bf16", "pure_bf16"), fp16=args.precision == "fp16",
                   pure_bf16=args.precision == "pure_bf16")
    if not has_config:
        out.setdefault("per_device_train_batch_size", 1)
    return out


def _split_config(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """A lone ``key=value`` in the config slot is an override, not a file."""
    overrides = list(getattr(args, "overrides", []) or [])
    config = args.config
    if config and "=" in config and not Path(config).is_file():
        return None, [config] + overrides
    return config, overrides


def build_from_args(args: argparse.Namespace):
    """The :class:`Estimate` (and textbook report, if asked) for parsed arguments."""
    from ..config import load_config, parse_overrides
    from .gpus import find_gpu
    from .result import build_estimate, gpu_for
    from .scenario import scenario_from_config

    config, overrides = _split_config(args)
    raw = parse_overrides(overrides)
    raw.update(_flag_overrides(args, config is not None))
    gpu = gpu_for(args.gpu, args.gpu_mem)
    if config is None:
        if "model_name_or_path" not in raw and args.textbook:
            raw["model_name_or_path"] = "llama3.2-1b"
        if args.precision is None and "bf16" not in raw and "fp16" not in raw:
            no_bf16 = gpu is not None and not gpu.bf16
            raw.update(bf16=not no_bf16, fp16=no_bf16)
    if "model_name_or_path" not in raw and config is None:
        raise ConfigError(["no model: pass --model (a built-in name, a folder or config.json, or a cached hub id) "
                           "or a training YAML"])
    cfg = load_config(config, raw, purpose="estimate", build_training_args=False)
    scenario = scenario_from_config(cfg)
    if args.zero is not None or args.offload_optimizer or args.offload_params:
        stage = args.zero if args.zero is not None else scenario.zero_stage
        scenario = replace(scenario, zero_stage=stage, offload_optimizer=args.offload_optimizer or (
            scenario.offload_optimizer and stage > 0), offload_params=args.offload_params or (
            scenario.offload_params and stage == 3), fast_path=scenario.fast_path and stage == 0)
    if gpu is None and cfg.model.estimate_gpu:
        gpu = find_gpu(cfg.model.estimate_gpu)
    if gpu is None:
        from .gpus import detect_gpus

        detected = detect_gpus()
        gpu = detected[0].as_gpu() if detected else None
    est = build_estimate(scenario, gpu)
    est.notes = cfg.notes + est.notes
    textbook = None
    if args.textbook:
        from .textbook import textbook_report

        textbook = textbook_report(scenario)
    return est, textbook


def _list_lines() -> list[str]:
    from .architectures import BUILTIN_ARCHITECTURES

    lines = ["built-in models (no download needed):"]
    for a in BUILTIN_ARCHITECTURES.values():
        lines.append(f"  {a.name:14s} {a.total_params() / 1e9:6.2f}B  hidden {a.hidden_size}, {a.num_layers} layers, "
                     f"vocab {a.vocab_size}")
    lines.append("known GPUs (memory as PyTorch reports it):")
    lines += [f"  {g.name:8s} {g.memory_gib:7.2f} GiB  {g.description}" for g in KNOWN_GPUS.values()]
    return lines


def run_estimate(args: argparse.Namespace) -> int:
    """Handler of ``loraforge estimate``."""
    if args.list:
        print("\n".join(_list_lines()))
        return 0
    est, textbook = build_from_args(args)
    if args.json:
        out = est.to_dict()
        if textbook is not None:
            out["textbook"] = textbook
        print(json.dumps(out, indent=2))
        return 0
    print("\n".join(est.summary_lines()))
    if textbook is not None:
        from .textbook import textbook_lines

        print()
        print("\n".join(textbook_lines(textbook)))
    return 0
