"""`loraforge data check | convert | register | preview`: look at the data before training on it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ..disk import disk_full_guard
from ..errors import DataError, LoraforgeError


def _config(args: argparse.Namespace):
    from ..config import load_config
    from .templates import known_template_names

    return load_config(args.config, getattr(args, "overrides", []), purpose="data", build_training_args=False,
                       template_names=known_template_names())


def _tokenizer_and_template(cfg):
    """The run's tokenizer and chat template (None for the template when pre-training on plain text)."""
    from ..models.loader import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    if cfg.finetuning.stage == "pt":
        return tokenizer, None
    from .templates import resolve_template

    return tokenizer, resolve_template(cfg.data, tokenizer)


def cmd_check(args: argparse.Namespace) -> int:
    from .loader import build_datasets, load_conversations, split_names

    cfg = _config(args)
    limit = cfg.data.max_bad_ratio
    relaxed = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_bad_ratio=1.0))
    try:
        tokenizer, template = _tokenizer_and_template(cfg)
    except (LoraforgeError, ImportError) as err:
        tokenizer = template = None
        print(f"token statistics skipped: {err}")
    if tokenizer is not None:
        print(f"template: {getattr(template, 'name', 'none (pre-training text)')}, tokenizer: "
              f"{getattr(tokenizer, 'name_or_path', '?')}")
        report = build_datasets(relaxed, tokenizer, template, purpose="data").report
    else:
        from .report import DataReport

        report = DataReport()
        config_dir = Path(cfg.source).resolve().parent if cfg.source else None
        for split, names in (("train", cfg.data.dataset), ("eval", cfg.data.eval_dataset)):
            if split_names(names):
                report.merge(load_conversations(relaxed.data, names, split=split, config_dir=config_dir,
                                                require_answer=cfg.finetuning.stage != "pt")[1])
    for line in report.lines(cutoff_len=cfg.data.cutoff_len, max_problems=args.show):
        print(line)
    failing = [d for d in report.datasets if d.bad_ratio > limit]
    for d in failing:
        print(f"FAIL: {d.name} [{d.split}] has {100 * d.bad_ratio:.1f}% bad rows (max_bad_ratio "
              f"{100 * limit:g}%); training would stop", file=sys.stderr)
    if not failing:
        print("OK: the data is usable for training")
    return 1 if failing else 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_file

    out = Path(args.output).absolute()
    source = Path(args.input)
    # the output is about as large as the input; convert_file removes its temporary file on any error
    with disk_full_guard(out.parent, source.stat().st_size if source.is_file() else None, what=f"write {out.name}",
                         error=DataError, hint="free some space, or write the output to another disk"):
        result = convert_file(args.input, args.output, to=args.to, limit=args.limit)
    print(f"wrote {result.written} rows to {args.output} ({args.to})")
    if result.bad_count:
        print(f"skipped {result.bad_count} bad line(s) of {args.input}:")
        for number, message in result.bad:
            print(f"  line {number}: {message}")
        if result.bad_count > len(result.bad):
            print(f"  ... and {result.bad_count - len(result.bad)} more")
    print("dataset_info.json entry (or run `loraforge data register NAME FILE --formatting ...`):")
    print(json.dumps(result.entry, ensure_ascii=False, indent=2))
    return 0 if result.written else 1


def cmd_register(args: argparse.Namespace) -> int:
    from .infer import infer_entry
    from .registry import write_dataset_info_entry

    entry, ok, problems = infer_entry(args.file, args.formatting, args.dataset_dir)
    path, replaced = write_dataset_info_entry(Path(args.dataset_dir), args.name, entry)
    print(f"{'updated' if replaced else 'added'} {args.name!r} in {path}:")
    print(json.dumps(entry, ensure_ascii=False, indent=2))
    checked = ok + len(problems)
    print(f"checked the first {checked} rows: {ok} convert cleanly")
    for line in problems[:5]:
        print(f"  - {line}")
    return 0


def render_trained(tokenizer, ids: list[int], labels: list[int], *, color: bool) -> str:
    """The decoded text with special tokens, trained spans wrapped in [[ ]] (or highlighted on a terminal)."""
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != -100) != (labels[start] != -100):
            text = tokenizer.decode(ids[start:i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if labels[start] != -100:
                text = f"\033[42;30m{text}\033[0m" if color else f"[[{text}]]"
            out.append(text)
            start = i
    return "".join(out)


def cmd_preview(args: argparse.Namespace) -> int:
    from .encoding import EncodeOptions, UNBOUNDED
    from .loader import load_conversations

    cfg = _config(args)
    names = cfg.data.dataset if args.split == "train" else cfg.data.eval_dataset
    if not names:
        raise DataError(f"no {args.split} dataset in {args.config}", hint="set `dataset` (or `eval_dataset`)")
    pretrain = cfg.finetuning.stage == "pt"
    limited = dataclasses.replace(cfg.data, max_samples=args.index + 1, max_bad_ratio=1.0)
    convs, _ = load_conversations(limited, names, split=args.split, require_answer=not pretrain,
                                  config_dir=Path(cfg.source).resolve().parent if cfg.source else None)
    if args.index >= len(convs):
        raise DataError(f"--index {args.index} is out of range: {len(convs)} usable example(s) in {names}")
    conv = convs[args.index]
    tokenizer, template = _tokenizer_and_template(cfg)
    if template is None:
        ids = tokenizer("\n".join(m.content for m in conv.messages) + (tokenizer.eos_token or ""),
                        add_special_tokens=False)["input_ids"][: cfg.data.cutoff_len]
        labels = list(ids)
        full = len(ids)
    else:
        d = cfg.data
        opts = EncodeOptions(d.cutoff_len, d.train_on_prompt, d.mask_history, d.enable_thinking)
        full = len(template.encode(conv, tokenizer, **opts.kwargs(UNBOUNDED))[0])
        ids, labels = template.encode(conv, tokenizer, **opts.kwargs(d.cutoff_len))
    trained = sum(1 for x in labels if x != -100)
    color = sys.stdout.isatty() and not args.no_color
    print(f"example {args.index} of {names} ({conv.source}), template "
          f"{getattr(template, 'name', 'none (pre-training text)')}")
    print(f"{len(ids)} tokens ({trained} trained)" + (f", truncated from {full}" if full > len(ids) else ""))
    legend = "trained tokens highlighted" if color else "trained tokens in [[ ]]"
    print(f"----- rendered ({legend}) -----")
    print(render_trained(tokenizer, list(ids), list(labels), color=color))
    print("-----")
    if args.tokens:
        for i, (tid, lab) in enumerate(zip(ids, labels)):
            piece = tokenizer.convert_ids_to_tokens(int(tid))
            print(f"{i:5d} {tid:7d} {'T' if lab != -100 else '.'} {piece!r}")
    return 0


def register(sub) -> None:
    """Add `loraforge data ...` to the CLI."""
    parser = sub.add_parser("data", help="Check, convert, register and preview datasets.")
    data = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: parser.print_help() or 1)

    p = data.add_parser("check", help="Read and tokenize the config's datasets without training; print kept/"
                        "dropped rows, the first problems (file, row, field) and token length statistics.")
    p.add_argument("config", help="Training config YAML (its dataset, template and model are used).")
    p.add_argument("--show", type=int, default=5, help="How many problems to list (default 5).")
    p.set_defaults(func=cmd_check, accepts_overrides=True)

    p = data.add_parser("convert", help="Convert JSON Lines (sharegpt `conversations`, openai `messages` or "
                        "alpaca rows) into one JSON file that LLaMA-Factory and loraforge read; streams the input.")
    p.add_argument("input", help="Input .jsonl file (one JSON object per line).")
    p.add_argument("output", help="Output .json file (written atomically).")
    p.add_argument("--to", choices=("sharegpt", "openai", "alpaca"), default="sharegpt",
                   help="Output layout (default sharegpt).")
    p.add_argument("--limit", type=int, default=None, help="Write at most this many rows.")
    p.set_defaults(func=cmd_convert)

    p = data.add_parser("register", help="Add or update a dataset_info.json entry, with columns and tags inferred "
                        "from the file.")
    p.add_argument("name", help="Dataset name to use in `dataset:`.")
    p.add_argument("file", help="The data file (or folder of files of one type).")
    p.add_argument("--formatting", choices=("alpaca", "sharegpt", "openai"), required=True,
                   help="Row layout: alpaca (instruction/input/output), sharegpt (conversations with from/value), "
                        "openai (messages with role/content).")
    p.add_argument("--dataset_dir", "--dataset-dir", default="data",
                   help="Folder holding dataset_info.json (default: data).")
    p.set_defaults(func=cmd_register)

    p = data.add_parser("preview", help="Show one rendered example: the text with special tokens, and which tokens "
                        "are trained.")
    p.add_argument("config", help="Training config YAML.")
    p.add_argument("--index", type=int, default=0, help="Which example (0-based, after dropping bad rows).")
    p.add_argument("--split", choices=("train", "eval"), default="train", help="`dataset` or `eval_dataset`.")
    p.add_argument("--tokens", action="store_true", help="Also list every token id, piece and whether it is trained.")
    p.add_argument("--no-color", action="store_true", help="Mark trained spans with [[ ]] even on a terminal.")
    p.set_defaults(func=cmd_preview, accepts_overrides=True)
