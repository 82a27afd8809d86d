"""The detached runner of one web-UI job: ``python -m loraforge.webui.runner JOB_DIR``.

It starts the job's command (a plain ``loraforge ...`` command line), sends its output to ``JOB_DIR/log.txt``,
and writes the exit status to ``JOB_DIR/rc`` when it ends. The runner lives in its own session, so closing the
page or restarting the web UI leaves the job running, and a restarted UI still learns how the job ended.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def main(job_dir: str) -> int:
    folder = Path(job_dir)
    job = json.loads((folder / "job.json").read_text(encoding="utf-8"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    with (folder / "log.txt").open("ab") as log:
        try:
            child = subprocess.Popen(job["argv"], cwd=job["cwd"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        except OSError as err:  # the command itself cannot start: say so in the log the page shows
            log.write(f"loraforge: error: cannot start {job['argv'][0]}: {err}\n".encode())
            _write_atomic(folder / "rc", "127")
            return 127
        _write_atomic(folder / "child.pid", str(child.pid))

        def forward(signum, frame):  # noqa: ARG001 - signal API; a signal to the runner reaches the job
            child.send_signal(signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        rc = child.wait()
    _write_atomic(folder / "rc", str(rc if rc >= 0 else 128 - rc))  # killed by signal N -> 128 + N, as a shell
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
