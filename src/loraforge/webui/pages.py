"""API routes of the Data page (the `loraforge data` handlers) and of the jobs (Train, Evaluate, Export)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse

from ..errors import ConfigError, DataError
from . import forms
from .clicall import run_cli

if TYPE_CHECKING:
    from .app import State


def _path(state: "State", value: Any, what: str) -> str:
    text = str(value or "").strip()
    if not text:
        raise ConfigError([f"{what} is empty: type a path (relative to {state.cwd})"])
    return str((state.cwd / text).resolve())


def data_routes(app: FastAPI, state: "State") -> None:
    """`/api/data/*`: the datasets of a dataset_info.json and the four `loraforge data` subcommands."""
    from .app import advisory, runnable

    @app.post("/api/data/datasets")
    @advisory
    def datasets(body: dict):
        from ..data.registry import INFO_FILE, read_dataset_info, resolve_dataset_dir

        values = runnable(body.get("values") or {}, body.get("source"), state.cwd)
        folder = resolve_dataset_dir(str(values.get("dataset_dir") or "data"), state.cwd)
        info = read_dataset_info(folder)
        if not info:
            raise DataError(f"{folder / INFO_FILE} does not exist or is empty",
                            hint="register a data file below, or set `dataset_dir` to the folder holding it")
        rows = []
        for name, entry in info.items():
            entry = entry if isinstance(entry, dict) else {}
            target = folder / str(entry.get("file_name", ""))
            rows.append({"name": name, "file_name": entry.get("file_name") or entry.get("hf_hub_url"),
                         "formatting": entry.get("formatting", "alpaca"), "exists": target.exists(),
                         "bytes": target.stat().st_size if target.is_file() else None})
        return {"dataset_dir": str(folder), "datasets": rows}

    @app.post("/api/data/preview")
    def preview(body: dict):
        path = state.scratch_yaml(body.get("values") or {}, body.get("source"))
        args = ["data", "preview", str(path), "--index", str(int(body.get("index") or 0)),
                "--split", str(body.get("split") or "train")]
        return run_cli(args, tty=True).to_dict()

    @app.post("/api/data/check")
    def check(body: dict):
        path = state.scratch_yaml(body.get("values") or {}, body.get("source"))
        return run_cli(["data", "check", str(path), "--show", "20"]).to_dict()

    @app.post("/api/data/register")
    def register(body: dict):
        args = ["data", "register", str(body.get("name") or "").strip() or "unnamed",
                _path(state, body.get("file"), "the data file"), "--formatting", str(body.get("formatting")),
                "--dataset_dir", _path(state, body.get("dataset_dir") or "data", "dataset_dir")]
        return run_cli(args).to_dict()

    @app.post("/api/data/convert")
    def convert(body: dict):
        args = ["data", "convert", _path(state, body.get("input"), "the input .jsonl file"),
                _path(state, body.get("output"), "the output .json file"), "--to", str(body.get("to") or "sharegpt")]
        if body.get("limit") not in (None, ""):
            args += ["--limit", str(int(body["limit"]))]
        return run_cli(args).to_dict()

    @app.post("/api/template/check")
    @advisory
    def template_check(body: dict):
        """Does the chosen template render like the tokenizer's own chat template? (None: yes or unknown)."""
        from ..config import load_config
        from ..data.template_match import describe_mismatch
        from ..data.templates import resolve_template
        from ..models.loader import load_tokenizer

        values = runnable(body.get("values") or {}, body.get("source"), state.cwd)
        cfg = load_config(values, purpose="data", build_training_args=False, check_environment=False)
        if not cfg.data.template:
            return {"warning": None, "template": None}
        tokenizer = load_tokenizer(cfg.model)
        template = resolve_template(cfg.data, tokenizer)
        return {"warning": describe_mismatch(template, tokenizer), "template": template.name}


def job_cli_args(kind: str, body: dict) -> list[str]:
    """Extra command-line arguments of a job, as the page's buttons ask for them."""
    if kind == "train" and body.get("resume"):
        return ["resume_from_checkpoint=true"]
    if kind == "eval":
        return ["--compare", str(body.get("variants") or "base")]
    if kind == "export":
        args = ["--dry-run"] if body.get("dry_run") else []
        return args + (["--overwrite"] if body.get("overwrite") else [])
    return []


def _output_dir(kind: str, values: dict[str, Any]) -> str | None:
    if kind == "export":
        return values.get("export_dir")
    return values.get("output_dir") or "saves/run"


def job_routes(app: FastAPI, state: "State") -> None:
    """`/api/jobs/*`: start a train/predict/eval/export job, follow it, stop it, read its results."""
    from .app import runnable

    @app.post("/api/jobs/{kind}")
    def start(kind: str, body: dict):
        values = runnable(body.get("values") or {}, body.get("source"), state.cwd)
        problems = forms.validate(values, kind)  # what `loraforge KIND` would refuse, refused before it starts
        if problems:
            raise ConfigError(problems, source="the page's config")
        args = job_cli_args(kind, body)
        return state.jobs.start(kind, forms.dump_yaml(values), args, output_dir=_output_dir(kind, values),
                                title=str(body.get("title") or ""))

    @app.get("/api/jobs")
    def jobs():
        return state.jobs.list()

    @app.get("/api/jobs/{job_id}/status")
    def status(job_id: str):
        return state.jobs.status(job_id)

    @app.post("/api/jobs/{job_id}/stop")
    def stop(job_id: str):
        return state.jobs.stop(job_id)

    @app.get("/api/jobs/{job_id}/results")
    def results(job_id: str):
        """Metrics of a finished predict/eval job, the comparison rows of eval --compare, an export's files."""
        job = state.jobs.status(job_id, log_lines=0)
        out = Path(job["output_dir"] or ".")
        found: dict[str, Any] = {"kind": job["kind"], "output_dir": str(out)}
        for key, path in (("metrics", out / "predict_results.json"), ("comparison", out / "compare" / "comparison.json"),
                          ("train", out / "all_results.json")):
            if path.is_file():
                found[key] = json.loads(path.read_text(encoding="utf-8"))
        found["chart"] = (out / "compare" / "comparison.png").is_file()
        if job["kind"] == "export" and out.is_dir():
            found["files"] = [[p.name, p.stat().st_size] for p in sorted(out.iterdir()) if p.is_file()]
        return found

    @app.get("/api/jobs/{job_id}/chart.png")
    def chart(job_id: str):
        job = state.jobs.status(job_id, log_lines=0)
        path = Path(job["output_dir"] or ".") / "compare" / "comparison.png"
        if not path.is_file():
            return JSONResponse({"error": f"{path} does not exist (the comparison has not finished)"}, 404)
        return FileResponse(path, headers={"Cache-Control": "no-store"})
