"""A rank that dies stops the whole job with one message naming it (CPU, gloo, real torchrun)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from loraforge.train.elastic import exit_code, failure_report

LAUNCH_VARS = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_ERROR_FILE", "FORCE_TORCHRUN")

# rank 1 fails as asked while rank 0 waits for it in a collective, as a DDP rank would
SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    import torch.distributed as dist
    from loraforge.train.elastic import record_worker_error

    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        mode = sys.argv[1]
        if mode == "exit":
            sys.exit(3)
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            raise RuntimeError("rank one ran out of data")
        except RuntimeError as err:
            record_worker_error(err)  # what `loraforge train` does in a torchrun worker
            raise
    dist.barrier()
    time.sleep(120)  # never reached in time: torchrun stops this rank when rank 1 is gone
""")


def _launch(tmp_path: Path, mode: str) -> subprocess.CompletedProcess:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "loraforge.train.elastic", "--standalone", "--nproc_per_node=2",
                           "--monitor-interval=0.1", str(script), mode], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("mode, code, expected", [
    ("exit", 3, "rank 1 (local rank 1, pid"),
    ("raise", 1, "its error: RuntimeError: rank one ran out of data"),
    ("kill", 128 + signal.SIGKILL, "was killed by signal SIGKILL (9)"),
])
def test_a_dead_rank_stops_the_job_with_one_message(tmp_path, mode, code, expected):
    proc = _launch(tmp_path, mode)
    assert proc.returncode == code, proc.stderr[-3000:]
    report = proc.stderr[proc.stderr.index("loraforge: error: training stopped:"):]
    assert report.startswith("loraforge: error: training stopped: rank 1 ")  # the rank that failed first
    assert expected in report
    assert "torchrun stopped the other" in report or "failed too" in report
    assert "ChildFailedError" not in proc.stderr  # torchrun's own traceback and table are replaced


@dataclass
class _Failure:  # the fields of torchrun's ProcessFailure the report reads
    local_rank: int
    exitcode: int
    message: object = ""
    timestamp: int = 100
    pid: int = 42
    error_file: str = "<N/A>"
    extra: dict = field(default_factory=dict)

    def signal_name(self) -> str:
        return signal.Signals(-self.exitcode).name if self.exitcode < 0 else "<N/A>"


def _recorded(text: str, trace: str = "Traceback ...\n  File x.py, line 1\nValueError: bad") -> dict:
    return {"message": text, "extraInfo": {"py_callstack": trace, "timestamp": "100"}}


def test_report_prefers_the_cause_over_ranks_that_lost_their_peer():
    failures = {0: _Failure(0, 1, _recorded("DistBackendError: Connection closed by peer [127.0.0.1]:1234")),
                3: _Failure(3, -9)}
    text = failure_report(failures, world_size=4)
    assert text.startswith("training stopped: rank 3 (local rank 3, pid 42) was killed by signal SIGKILL (9)")
    assert "out-of-memory killer" in text and "rank(s) 0 failed too" in text
    assert "torchrun stopped the other 2 rank(s)" in text
    assert exit_code(failures) == 137


def test_report_quotes_the_error_and_skips_tracebacks_of_loraforge_errors():
    theirs = failure_report({1: _Failure(1, 1, _recorded("ValueError: bad"))})
    assert "its error: ValueError: bad" in theirs and "where (last lines of its traceback):" in theirs
    ours = failure_report({1: _Failure(1, 2, _recorded("DataError: data/x.json row 3: no `output`"))})
    assert "its error: DataError: data/x.json row 3" in ours and "traceback" not in ours
    plain = failure_report({0: _Failure(0, 5, "To enable traceback see: https://pytorch.org/docs")})
    assert "exited with code 5" in plain and "its error" not in plain and "pytorch.org" not in plain


def test_worker_error_is_written_where_torchrun_reads_it(tmp_path, monkeypatch):
    from loraforge.errors import TrainingError
    from loraforge.train.elastic import record_worker_error

    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    record_worker_error(TrainingError("nothing"))  # outside torchrun: nothing to write, no error
    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    try:
        raise TrainingError("loss is NaN for 5 steps")
    except TrainingError as err:
        record_worker_error(err)
    data = json.loads(path.read_text())
    assert data["message"]["message"] == "TrainingError: loss is NaN for 5 steps"
