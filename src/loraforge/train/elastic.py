"""torchrun with one clear message when a rank fails: ``python -m loraforge.train.elastic TORCHRUN_ARGS``.

torchrun's elastic agent already stops the whole group when one worker exits with an error or is killed (it
notices within a fraction of a second, sends SIGTERM to the others and SIGKILL 30 s later), so a dead rank never
leaves the others waiting until ``ddp_timeout``. What it prints, though, is its own traceback wrapped around a
table. This entry point runs the same torchrun (``torch.distributed.run.run`` on the same arguments) and turns
the :class:`ChildFailedError` into one message naming the rank that failed first, its exit code or signal, and
its error (which every loraforge worker writes into the error file torchrun gives it, see
:func:`record_worker_error`).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from ..errors import LoraforgeError

# what a signal usually means for a training process, said once in the message
_SIGNAL_HINTS = {
    "SIGKILL": "killed outright: most often the kernel's out-of-memory killer (host RAM; see `dmesg`), or a "
               "scheduler's hard limit",
    "SIGSEGV": "a crash in native code (CUDA driver, NCCL, bitsandbytes or a compiled kernel)",
    "SIGBUS": "a crash in native code; in containers often too little shared memory (/dev/shm)",
    "SIGABRT": "aborted by native code (e.g. NCCL's watchdog after a collective timed out, or a CUDA error)",
    "SIGTERM": "stopped from outside (a scheduler or a person)",
}


def record_worker_error(err: BaseException) -> None:
    """Write ``err`` into the error file torchrun gave this worker (TORCHELASTIC_ERROR_FILE), if any.

    loraforge's CLI turns its own errors into a message instead of a traceback, so torchrun's ``@record``
    decorator would never see them; recording here lets the launcher quote the error of the failed rank.
    """
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    try:
        ErrorHandler().record_exception(err)
    except OSError:  # never hide the real error behind a failure to write its report
        pass


def _error_text(message: Any) -> tuple[str, str]:
    """(one-line error, traceback) from a ProcessFailure message: a dict written by ErrorHandler, or a string."""
    if isinstance(message, dict):
        text = str(message.get("message") or "").strip()
        trace = str((message.get("extraInfo") or {}).get("py_callstack") or "")
        return text, trace
    text = str(message or "").strip()
    if text.startswith("To enable traceback see"):  # torchrun's filler when no error file was written
        text = ""
    return text, ""


# errors a rank gets because a peer died mid-collective: consequences, not the cause
_PEER_LOST = ("DistBackendError", "Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "ProcessGroupNCCL", "NCCL communicator was aborted", "Gloo connectFullMesh failed", "watchdog")


def _consequence(failure: Any) -> bool:
    """True for a rank that failed because of another: stopped by torchrun (SIGTERM) or lost its peer."""
    if failure.exitcode == -signal.SIGTERM:
        return True
    text, _ = _error_text(failure.message)
    return any(mark in text for mark in _PEER_LOST)


def _first(failures: dict[int, Any]) -> int:
    """The rank that failed first: ranks that only followed another one come last, then the earlier timestamp
    (one-second resolution), then the lower rank."""
    return min(failures, key=lambda r: (_consequence(failures[r]), failures[r].timestamp, r))


def failure_report(failures: dict[int, Any], world_size: int | None = None) -> str:
    """One message for a failed torchrun job: which rank failed first, how, and what it said.

    ``failures`` maps global rank -> ``ProcessFailure`` (torchrun's ``ChildFailedError.failures``): ranks that
    had already failed when torchrun noticed; the others were stopped by torchrun and are not listed.
    """
    rank = _first(failures)
    first = failures[rank]
    code = first.exitcode
    if code < 0:
        sig = first.signal_name()
        how = f"was killed by signal {sig} ({-code})"
        hint = _SIGNAL_HINTS.get(sig)
    else:
        how, hint = f"exited with code {code}", None
    lines = [f"training stopped: rank {rank} (local rank {first.local_rank}, pid {first.pid}) {how}"]
    if hint:
        lines.append(f"  {sig}: {hint}")
    text, trace = _error_text(first.message)
    if text:
        lines.append(f"  its error: {text}")
    ours = tuple(f"{c.__name__}:" for c in (LoraforgeError, *LoraforgeError.__subclasses__()))
    if trace and not text.startswith(ours):  # loraforge's own errors already say what to do: no traceback
        tail = [line for line in trace.strip().splitlines() if line.strip()][-8:]
        lines.append("  where (last lines of its traceback):")
        lines += [f"    {line}" for line in tail]
    others = sorted(r for r in failures if r != rank and failures[r].exitcode != -signal.SIGTERM)
    if others:
        lines.append(f"  rank(s) {', '.join(map(str, others))} failed too, within the same second (usually "
                     f"because rank {rank} was gone)")
    stopped = "the other ranks were stopped by torchrun" if world_size is None else (
        f"torchrun stopped the other {max(world_size - 1 - len(others), 0)} rank(s)")
    lines.append(f"  {stopped}; the full output of every rank is above (lines prefixed [rankN])")
    return "\n".join(lines)


def exit_code(failures: dict[int, Any]) -> int:
    """The exit code to return for a failed job: the first failure's, or 128 + signal like a shell."""
    code = failures[_first(failures)].exitcode
    return 128 - code if code < 0 else (code or 1)


def main(argv: list[str] | None = None) -> int:
    """Run torchrun with ``argv`` (its usual arguments); on a worker failure print one message, return its code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as err:
        world = None
        try:
            world = int(str(args.nproc_per_node)) * int(str(args.nnodes).split(":")[-1])
        except ValueError:
            pass
        print(f"loraforge: error: {failure_report(err.failures, world)}", file=sys.stderr, flush=True)
        return exit_code(err.failures)
    except SignalException as err:  # Ctrl-C or a scheduler's SIGTERM: the workers got it too and stopped
        name = signal.Signals(err.sigval).name
        print(f"loraforge: torchrun stopped by {name}; the workers save a checkpoint when they can (resume with "
              "resume_from_checkpoint=true)", file=sys.stderr)
        return 128 + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
