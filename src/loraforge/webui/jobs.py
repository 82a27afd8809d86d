"""Long jobs (train, predict, eval --compare, export) run as their own processes, one folder each.

A job folder holds ``job.json`` (the command line and where it runs), ``run.yaml`` (the config it runs),
``log.txt`` (its output), ``child.pid`` and, once it ended, ``rc``. Everything the page shows is read back from
these files and from the training's own ``trainer_log.jsonl``, so a reloaded page or a restarted UI reattaches
to a running job with nothing kept in memory.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import LoraforgeError

KINDS = ("train", "predict", "eval", "export")
STOPPED_RC = 130  # `loraforge train` after Ctrl-C / SIGINT: a resumable checkpoint was saved


class JobError(LoraforgeError):
    """A job cannot be started or stopped (unknown id, already running, ...)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a finished child of this UI stays a zombie until reaped; it is not running
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return True


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def read_trainer_log(output_dir: Path, since: float = 0.0) -> list[dict[str, Any]]:
    """The rows of ``trainer_log.jsonl`` (one per logging step), ignoring a file left by an older run."""
    path = output_dir / "trainer_log.jsonl"
    try:
        if path.stat().st_mtime < since:
            return []
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the line being written right now
    return rows


def tail(path: Path, max_lines: int = 200) -> list[str]:
    """The last lines of a log, with progress-bar redraws (carriage returns) collapsed to their last state."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 256 * 1024))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    lines = [line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r")
             for line in text.split("\n")]
    return [line for line in lines if line.strip()][-max_lines:]


def error_message(lines: list[str]) -> str | None:
    """The CLI's own error message (``loraforge: error: ...`` and its fix lines), else the last traceback lines."""
    for i, line in enumerate(lines):
        if line.startswith("loraforge: error:"):
            return "\n".join(lines[i:])
    if any(line.startswith("Traceback") for line in lines):
        return "\n".join(lines[-12:])
    return None


class JobManager:
    """Start, stop and describe jobs under ``jobs_dir``; ``cwd`` is where their relative paths are read."""

    def __init__(self, jobs_dir: str | Path, cwd: str | Path | None = None):
        self.jobs_dir = Path(jobs_dir)
        self.cwd = Path(cwd or os.getcwd()).resolve()
        self.python = sys.executable
        self.cli = [self.python, "-m", "loraforge.cli"]  # `loraforge`, in this Python (tests put a stand-in here)
        self._runners: dict[str, subprocess.Popen] = {}

    # starting ---------------------------------------------------------------------------------------------------
    def start(self, kind: str, config_text: str, cli_args: list[str], *, output_dir: str | None = None,
              title: str = "") -> dict[str, Any]:
        """Write the job folder and launch ``loraforge KIND run.yaml ARGS`` through the detached runner."""
        if kind not in KINDS:
            raise JobError(f"unknown job kind {kind!r}; expected one of {', '.join(KINDS)}")
        running = [j for j in self.list() if j["kind"] == kind and j["state"] == "running"]
        if running and kind == "train":
            raise JobError(f"training job {running[0]['id']} is still running",
                           hint="stop it (or wait for it) before starting another one")
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{secrets.token_hex(2)}"
        folder = self.jobs_dir / job_id
        folder.mkdir(parents=True)
        config = folder / "run.yaml"
        config.write_text(config_text, encoding="utf-8")
        argv = [*self.cli, kind, str(config), *cli_args]
        out = str((self.cwd / output_dir).resolve()) if output_dir else None
        job = {"id": job_id, "kind": kind, "argv": argv, "cwd": str(self.cwd), "config": str(config),
               "output_dir": out, "created": time.time(), "title": title,
               "command": " ".join(["loraforge", kind, str(config), *cli_args])}
        (folder / "job.json").write_text(json.dumps(job, indent=2, ensure_ascii=False), encoding="utf-8")
        # its own session: the job outlives the page, the UI and a Ctrl-C in the UI's terminal
        self._runners[job_id] = subprocess.Popen(
            [self.python, "-m", "loraforge.webui.runner", str(folder)], cwd=self.cwd, start_new_session=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        (folder / "runner.pid").write_text(str(self._runners[job_id].pid))
        return self.status(job_id)

    def stop(self, job_id: str) -> dict[str, Any]:
        """Ask the job to stop: training saves a resumable checkpoint first (a second stop ends it at once)."""
        folder = self._folder(job_id)
        pid = _read_int(folder / "child.pid")
        if pid is None or (folder / "rc").exists() or not _alive(pid):
            raise JobError(f"job {job_id} is not running")
        os.kill(pid, signal.SIGINT)
        (folder / "stop_requested").write_text(str(time.time()))
        return self.status(job_id)

    # reading ----------------------------------------------------------------------------------------------------
    def _folder(self, job_id: str) -> Path:
        folder = self.jobs_dir / job_id
        if "/" in job_id or job_id.startswith(".") or not (folder / "job.json").is_file():
            raise JobError(f"no job {job_id!r} in {self.jobs_dir}")
        return folder

    def _state(self, job_id: str, folder: Path) -> tuple[str, int | None]:
        runner = self._runners.get(job_id)
        if runner is not None:
            runner.poll()  # reap it, so a finished runner is not mistaken for a running one
        rc = _read_int(folder / "rc")
        if rc is not None:
            return ("finished" if rc == 0 else "stopped" if rc == STOPPED_RC else "failed"), rc
        pid = _read_int(folder / "runner.pid")
        if pid is not None and _alive(pid):
            return "running", None
        return "lost", None  # killed hard (e.g. the machine rebooted): no exit status was written

    def status(self, job_id: str, *, log_lines: int = 200) -> dict[str, Any]:
        """Everything the page shows about a job: state, exit code, log tail, error, and training progress."""
        folder = self._folder(job_id)
        job = json.loads((folder / "job.json").read_text(encoding="utf-8"))
        state, rc = self._state(job_id, folder)
        lines = tail(folder / "log.txt", log_lines)
        out: dict[str, Any] = {k: job.get(k) for k in ("id", "kind", "config", "output_dir", "created", "title",
                                                          "command")}
        out.update(state=state, rc=rc, log=lines, stop_requested=(folder / "stop_requested").exists())
        if state == "failed":
            out["error"] = error_message(lines) or f"the job ended with exit status {rc}; see the log"
        elif state == "lost":
            out["error"] = "the job's process is gone without an exit status (killed?); see the log"
        if job["kind"] == "train" and job.get("output_dir"):
            out["progress"] = training_progress(Path(job["output_dir"]), job["created"])
        return out

    def list(self) -> list[dict[str, Any]]:
        """Every job, newest first (without logs)."""
        if not self.jobs_dir.is_dir():
            return []
        out = []
        for folder in sorted(self.jobs_dir.iterdir(), reverse=True):
            if (folder / "job.json").is_file():
                status = self.status(folder.name, log_lines=0)
                status.pop("log", None)
                out.append(status)
        return out


def training_progress(output_dir: Path, since: float) -> dict[str, Any]:
    """Loss curve and the newest step's progress, ETA and tokens/s from ``trainer_log.jsonl``."""
    rows = read_trainer_log(output_dir, since - 1)
    last = rows[-1] if rows else {}
    return {
        "loss": [[r["current_steps"], r["loss"]] for r in rows if "loss" in r],
        "eval_loss": [[r["current_steps"], r["eval_loss"]] for r in rows if "eval_loss" in r],
        "step": last.get("current_steps", 0), "total": last.get("total_steps"),
        "percentage": last.get("percentage", 0.0), "eta": last.get("remaining_time"),
        "elapsed": last.get("elapsed_time"), "tokens_per_second": last.get("tokens_per_second"),
        "lr": last.get("lr"),
        "checkpoints": sorted((p.name for p in output_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
                              key=lambda n: int(n.split("-")[1]) if n.split("-")[1].isdigit() else 0),
        "finished": (output_dir / "all_results.json").is_file(),
    }
