"""`loraforge predict` and `loraforge eval`: argument parsing only; the work is in predict.py and compare.py."""

from __future__ import annotations

import argparse
import json

OVERRIDES_HELP = "Any config key as key=value (e.g. eval_dataset=my_eval max_new_tokens=128 predict_batch_size=16)."


def _print_metrics(metrics: dict) -> None:
    width = max(map(len, metrics), default=0)
    for key, value in metrics.items():
        print(f"  {key:<{width}}  {value}")


def cmd_predict(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..data.templates import known_template_names
    from .predict import run_predict

    cfg = load_config(args.config, args.overrides, purpose="predict", template_names=known_template_names())
    metrics = run_predict(cfg)
    print(f"predictions and metrics written to {cfg.training.output_dir}")
    _print_metrics(metrics)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..data.templates import known_template_names

    cfg = load_config(args.config, args.overrides, purpose="eval", template_names=known_template_names())
    if not args.compare:
        from .predict import run_predict

        metrics = run_predict(cfg)
        print(f"predictions and metrics written to {cfg.training.output_dir}")
        _print_metrics(metrics)
        return 0
    from .compare import comparison_markdown, parse_variants, run_compare

    chosen = args.compare if isinstance(args.compare, str) else args.variants
    variants = parse_variants(chosen if chosen is not None else cfg.generation.compare, cfg)
    rows = run_compare(cfg, variants)
    print(comparison_markdown(rows))
    print(f"comparison written to {cfg.training.output_dir}/compare/comparison.{{md,json,png}}")
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    return 0


def register(sub) -> None:
    """Add the `predict` and `eval` subcommands."""
    p = sub.add_parser("predict", help="Generate answers for the eval set and score them (BLEU, ROUGE, ...).",
                       description="Batched greedy generation over the eval set. Writes "
                       "<output_dir>/generated_predictions.jsonl as it goes (a rerun resumes), then "
                       "predict_results.json and all_results.json. " + OVERRIDES_HELP)
    p.add_argument("config", help="YAML config (model_name_or_path, adapter_name_or_path, eval_dataset, output_dir).")
    p.set_defaults(func=cmd_predict, accepts_overrides=True)

    p = sub.add_parser("eval", help="Score a model on the eval set; --compare runs several variants side by side.",
                       description="Without --compare, the same as predict. With --compare, runs the eval set "
                       "through each variant (base, adapters, exported models) and writes "
                       "<output_dir>/compare/comparison.md, .json and .png with scores and load memory. "
                       + OVERRIDES_HELP)
    p.add_argument("config", help="YAML config of the base model and eval set.")
    p.add_argument("--compare", nargs="?", const=True, default=False, metavar="VARIANTS",
                   help="Compare variants instead of scoring one model; optionally the variants themselves "
                   "(same syntax as --variants), e.g. --compare base,saves/run")
    p.add_argument("--variants", default=None,
                   help="Comma-separated [label=]target[:4bit|:8bit] where target is `base`, an adapter folder or "
                   "a model folder (default: `compare:` from the config, else base and adapter_name_or_path).")
    p.add_argument("--json", action="store_true", help="Also print the comparison rows as JSON.")
    p.set_defaults(func=cmd_eval, accepts_overrides=True)
