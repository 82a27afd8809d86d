"""Run a quick ``loraforge`` command in this process and hand its output to the page.

The Data page's check, preview, register and convert are the CLI's own handlers, parsed by the CLI's own
parser: the page shows exactly what the terminal would, errors included. Their printed output and the loraforge
log lines are captured; a lock keeps two requests from writing into each other's capture.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
from dataclasses import dataclass, field

from ..errors import LoraforgeError

_LOCK = threading.Lock()


class _TerminalBuffer(io.StringIO):
    """Captured stdout that says it is a terminal, so `data preview` marks trained tokens with colour codes
    (unambiguous, unlike ``[[ ]]`` which a row's text may contain); the page turns them into highlights."""

    def isatty(self) -> bool:
        return True


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname.lower()}: {record.getMessage()}")


@dataclass
class CliResult:
    """What a command printed, its exit code, its error message (as the CLI prints it), and its log lines."""

    rc: int
    output: str
    error: str | None = None
    log: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"rc": self.rc, "output": self.output, "error": self.error, "log": self.log}


def run_cli(argv: list[str], *, tty: bool = False) -> CliResult:
    """Parse ``argv`` with the CLI's parser and run its handler; a user error becomes ``error``, not a crash."""
    from ..cli import build_parser

    parser = build_parser()
    with _LOCK:
        out = _TerminalBuffer() if tty else io.StringIO()
        err = io.StringIO()
        handler = _Collect()
        logger = logging.getLogger("loraforge")
        logger.addHandler(handler)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    args, rest = parser.parse_known_args(argv)
                    args.overrides = list(getattr(args, "overrides", None) or []) + rest
                    rc = int(args.func(args) or 0)
                    message = None
                except LoraforgeError as error:
                    rc, message = error.exit_code, f"loraforge: error: {error}"
                except SystemExit as exit_:  # argparse refused the arguments; its message is on stderr
                    rc, message = int(exit_.code or 2), None
        finally:
            logger.removeHandler(handler)
    printed_err = err.getvalue().strip()
    if message is None and rc != 0 and printed_err:
        message = printed_err
    elif printed_err:
        handler.lines.append(printed_err)
    return CliResult(rc, out.getvalue(), message, handler.lines)
