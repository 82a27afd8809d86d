"""The one entry point. Subcommands only parse their arguments and call into the packages.

Each command module exposes ``register(subparsers)`` and imports heavy libraries (torch, transformers)
inside its handler, so ``loraforge version`` and ``--help`` stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from . import __version__
from .errors import LoraforgeError

# command module -> registered subcommands (in --help order)
COMMAND_MODULES = (
    "loraforge.train.command",      # train
    "loraforge.data.command",       # data check | convert | register | preview
    "loraforge.evaluate.command",   # predict, eval
    "loraforge.serve.command",      # chat, api
    "loraforge.export.command",     # export
    "loraforge.estimate.command",   # estimate
    "loraforge.envinfo",            # env, version
    "loraforge.webui.command",      # webui
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraforge",
        description="Fine-tune LLMs with LoRA/QLoRA from one YAML file. "
        "Run `loraforge COMMAND --help` for a command's arguments.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"loraforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:  # a command whose module fails to import is a broken install: never hidden
        importlib.import_module(name).register(sub)
    return parser


def _setup_logging() -> None:
    level = os.environ.get("LORAFORGE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="[loraforge] %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from .models.quantization import quiet_bitsandbytes_logs

    quiet_bitsandbytes_logs()  # an optional hub kernel note on AVX512-BF16 CPUs; a per-forward 8-bit cast note


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one clear message and exit non-zero without a traceback."""
    _setup_logging()
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    if rest and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    # `key=value` / `--key value` overrides: declared as a REMAINDER positional, or left over by argparse
    args.overrides = list(getattr(args, "overrides", None) or []) + (rest if getattr(args, "accepts_overrides", False) else [])
    try:
        return int(args.func(args) or 0)
    except LoraforgeError as err:
        print(f"loraforge: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("loraforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
