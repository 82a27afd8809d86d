"""The web UI server: one static page plus a JSON API over the same functions the CLI calls.

Quick actions (config validation, data check/preview/register/convert, the memory estimate, the template check)
run in this process; long ones (train, predict, eval --compare, export) are ``loraforge`` commands run as jobs
(:mod:`.jobs`); chat streams from :mod:`.chat`. Every user error comes back as ``{"error": message}`` with the
CLI's own wording, which the page shows.
"""

from __future__ import annotations

import base64
import functools
import logging
import secrets
import traceback
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from ..errors import LoraforgeError
from . import forms
from .chat import ChatModels
from .jobs import JobManager
from .pages import data_routes, job_routes

STATIC = Path(__file__).parent / "static"
logger = logging.getLogger(__name__)


class State:
    """What the server keeps: where it runs, its job manager and its loaded chat models."""

    def __init__(self, cwd: Path, state_dir: Path):
        self.cwd = cwd
        self.state_dir = state_dir
        self.jobs = JobManager(state_dir / "jobs", cwd)
        self.chat = ChatModels()

    def scratch_yaml(self, values: dict[str, Any], source: str | None = None) -> Path:
        """The page's current config written to a file, for the CLI handlers that read a config path."""
        path = self.state_dir / "scratch" / f"page-{secrets.token_hex(4)}.yaml"
        forms.save_yaml(path, runnable(values, source, self.cwd))
        return path


def runnable(values: dict[str, Any], source: str | None, cwd: Path) -> dict[str, Any]:
    """The page's values as a config that runs from a job folder.

    A relative ``dataset_dir`` is read from the working directory, then from the config's folder; the job's
    copy of the config lives elsewhere, so a folder found only beside the loaded YAML is made absolute.
    """
    out = forms.values_from_form(values)
    d = out.get("dataset_dir")
    if isinstance(d, str) and d and d != "ONLINE" and not Path(d).is_absolute() and not (cwd / d).is_dir() and source:
        beside = (cwd / source).resolve().parent / d
        if beside.is_dir():
            out["dataset_dir"] = str(beside)
    return out


def advisory(fn):
    """For the panels the page refreshes by itself (estimate, template check, dataset list): a user error is
    their answer (shown in the panel), not a failed request, which a browser would log as a console error."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LoraforgeError as err:
            return {"error": f"loraforge: error: {err}", "advisory": True}
    return wrapper


def _basic_auth_ok(header: str | None, password: str) -> bool:
    if not header or not header.lower().startswith("basic "):
        return False
    try:
        _user, _, given = base64.b64decode(header[6:]).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    return secrets.compare_digest(given.encode(), password.encode())


def create_app(cwd: str | Path | None = None, *, state_dir: str | Path | None = None,
               password: str | None = None) -> FastAPI:
    """Build the app. ``password`` (any user name) guards every route with HTTP basic auth."""
    root = Path(cwd or Path.cwd()).resolve()
    state = State(root, Path(state_dir or root / ".loraforge-webui").resolve())
    forms.form_schema()  # imports transformers (the training fields) now, not on the page's first request
    app = FastAPI(title="loraforge web UI", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ui = state

    if password:
        @app.middleware("http")
        async def require_password(request: Request, call_next):
            if not _basic_auth_ok(request.headers.get("authorization"), password):
                return Response("password required", status_code=401,
                                headers={"WWW-Authenticate": 'Basic realm="loraforge"'})
            return await call_next(request)

    @app.exception_handler(LoraforgeError)
    async def user_error(request: Request, err: LoraforgeError):  # noqa: ARG001 - FastAPI signature
        return JSONResponse({"error": f"loraforge: error: {err}"}, status_code=400)

    @app.exception_handler(Exception)
    async def bug(request: Request, err: Exception):  # noqa: ARG001
        logger.error("web UI request failed:\n%s", traceback.format_exc())
        return JSONResponse({"error": f"internal error: {type(err).__name__}: {err} (the traceback is in the "
                                      "terminal running `loraforge webui`)"}, status_code=500)

    @app.get("/")
    def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/static/{name}")
    def static(name: str):
        path = STATIC / name
        if "/" in name or not path.is_file():
            return JSONResponse({"error": f"no such file {name}"}, status_code=404)
        return FileResponse(path, headers={"Cache-Control": "no-store"})

    @app.get("/api/schema")
    def schema():
        from ..data.templates import template_names
        from ..estimate import gpu_names
        from ..models.builtin import BUILTIN_MODELS

        configs = sorted(str(p.relative_to(root)) for p in root.glob("examples/*.yaml"))
        return {"groups": forms.form_schema(), "configs": configs, "templates": template_names(),
                "models": sorted(BUILTIN_MODELS), "gpus": gpu_names(), "cwd": str(root)}

    @app.post("/api/config/load")
    def load(body: dict):
        path = str(body.get("path") or "")
        return {"path": path, "values": forms.load_yaml_for_form(root / path)}

    @app.post("/api/config/render")
    @advisory
    def render(body: dict):
        """YAML text, equivalent command line and every validation problem of the page's values."""
        values = forms.values_from_form(body.get("values") or {})
        source = body.get("source") or None
        source_values = forms.load_yaml_for_form(root / source) if source and (root / source).is_file() else None
        return {"yaml": forms.dump_yaml(values),
                "command": forms.command_line("train", values, source, source_values),
                "problems": forms.validate(values, "train", source=None)}

    @app.post("/api/config/save")
    def save(body: dict):
        values = forms.values_from_form(body.get("values") or {})
        path = forms.save_yaml(root / str(body.get("path") or ""), values)
        return {"path": str(path), "yaml": path.read_text(encoding="utf-8"),
                "problems": forms.validate(values, "train")}

    @app.post("/api/estimate")
    @advisory
    def estimate(body: dict):
        from ..config import load_config
        from ..estimate import estimate_for_config

        values = forms.values_from_form(body.get("values") or {})
        cfg = load_config(values, purpose="estimate", build_training_args=False, check_environment=False)
        est = estimate_for_config(cfg, gpu=body.get("gpu") or None)
        return {"lines": est.summary_lines(), "fits": est.fits, "needed_gib": round(est.needed_gib, 2),
                "gpu": est.gpu.name if est.gpu else None,
                "gpu_gib": est.gpu.memory_gib if est.gpu else None}

    data_routes(app, state)
    job_routes(app, state)

    @app.post("/api/chat/load")
    def chat_load(body: dict):
        return state.chat.load(str(body.get("slot")), runnable(body.get("values") or {}, body.get("source"), root))

    @app.post("/api/chat/unload")
    def chat_unload(body: dict):
        return state.chat.unload(str(body.get("slot")))

    @app.get("/api/chat")
    def chat_models():
        return state.chat.describe()

    @app.post("/api/chat/stream")
    def chat_stream(body: dict):
        lines = state.chat.stream(str(body.get("slot")), list(body.get("messages") or []),
                                  thinking=body.get("thinking"), max_new_tokens=body.get("max_new_tokens"),
                                  system=body.get("system"))
        return StreamingResponse(lines, media_type="application/x-ndjson")

    return app
