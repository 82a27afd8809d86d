"""`loraforge train CONFIG [key=value ...]`."""

from __future__ import annotations

import argparse


def _key_help() -> str:
    """Every accepted config key with its help text, grouped, for `loraforge train --help`."""
    from ..config import all_fields

    groups: dict[str, list[str]] = {}
    for key, entries in all_fields().items():
        group, f, _tp = entries[0]
        help_text = (f.metadata or {}).get("help", "")
        choices = (f.metadata or {}).get("choices")
        default = f.default if not callable(getattr(f, "default_factory", None)) else "[]"
        extra = f" {{{','.join(map(str, choices))}}}" if choices else ""
        groups.setdefault(group, []).append(f"  --{key}{extra}  (default: {default!r})\n      {help_text}")
    out = []
    for group in ("model", "data", "finetuning", "training", "generation", "export"):
        out.append(f"\n{group} arguments:\n" + "\n".join(groups.get(group, [])))
    return "\n".join(out)


class _KeyHelpAction(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.print_help()
        print(_key_help())
        parser.exit()


def cmd_train(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..data.templates import known_template_names
    from .launcher import maybe_relaunch
    from .workflow import check_finished, predict_only, run_train

    if predict_only(args.config, args.overrides):  # LLaMA-Factory's `train predict.yaml`: same as `loraforge predict`
        from ..evaluate.command import cmd_predict

        print("do_predict without training: running `loraforge predict` on the eval set")
        return cmd_predict(args)
    relaunched = maybe_relaunch(args.config, args.overrides)
    if relaunched is not None:
        return relaunched
    try:
        cfg = load_config(args.config, args.overrides, purpose="train", template_names=known_template_names())
        return check_finished(run_train(cfg))
    except Exception as err:
        # in a torchrun worker: leave the error where the launcher reads it, to name this rank in one message
        from .elastic import record_worker_error

        record_worker_error(err)
        raise


def register(sub) -> None:
    p = sub.add_parser(
        "train", add_help=False,
        help="Fine-tune a model (LoRA, QLoRA, freeze, full) from a LLaMA-Factory-style YAML.",
        description="Fine-tune from CONFIG; any key can be overridden with key=value or --key value. "
                    "Chat template: `template: NAME` (a loraforge or LLaMA-Factory name), `template: tokenizer` (the "
                    "model's own Jinja chat template), or unset: the named template that renders exactly like the "
                    "model's own, else the model's own; the log says which. Check what is trained with "
                    "`loraforge data preview CONFIG` (docs/templates.md). "
                    "`do_predict: true` with `do_train: false` (or no `dataset`) runs `loraforge predict` instead, "
                    "as LLaMA-Factory's predict configs expect.",
        epilog="example: loraforge train examples/quickstart.yaml max_steps=20 learning_rate=2e-4",
    )
    p.add_argument("-h", "--help", action=_KeyHelpAction, help="show this help and every config key")
    p.add_argument("config", help="YAML config file (LLaMA-Factory key names)")
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="key=value",
                   help="override config keys: key=value or --key value")
    p.set_defaults(func=cmd_train, accepts_overrides=True)
