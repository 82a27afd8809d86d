"""Upload an export folder to the Hugging Face Hub or ModelScope; ``--dry-run`` lists exactly what would go up.

The token comes from the environment (``HF_TOKEN`` / ``MODELSCOPE_API_TOKEN``) or the config keys
``hf_hub_token`` / ``ms_hub_token``; it is never printed. The repository is created if missing, private unless
``export_hub_private: false``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ExportError
from .safety import human_size

logger = logging.getLogger(__name__)

TOKEN_ENV = {"huggingface": ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"), "modelscope": ("MODELSCOPE_API_TOKEN",)}


@dataclass
class UploadPlan:
    """What an upload sends: the repository, its visibility and every file with its size."""

    hub: str
    repo_id: str
    private: bool
    files: list[tuple[str, int]] = field(default_factory=list)
    estimated: bool = False     # sizes (and shard names) are estimates because the export does not exist yet
    token_source: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def lines(self) -> list[str]:
        """Human-readable listing, one file a line, for the dry run."""
        token = f"token from {self.token_source}" if self.token_source else \
            f"NO TOKEN: set {TOKEN_ENV[self.hub][0]} before the real upload"
        head = [f"upload to {self.hub}: {self.repo_id} ({'private' if self.private else 'public'}; {token})"]
        if self.estimated:
            body = [f"  ~{human_size(size):>10}  {name}" for name, size in self.files]
            total = f"  ~{human_size(self.total_bytes):>10}  total, {len(self.files)} files"
        else:
            body = [f"  {human_size(size):>10}  {size:>15,} B  {name}" for name, size in self.files]
            total = f"  {human_size(self.total_bytes):>10}  {self.total_bytes:>15,} B  total, {len(self.files)} files"
        note = ["  (sizes estimated before exporting; `--upload-only --dry-run` lists an existing export exactly)"] \
            if self.estimated else []
        return head + body + [total] + note


def find_token(hub: str, configured: str | None) -> tuple[str | None, str | None]:
    """(token, where it came from) for ``hub``; the config key wins over the environment."""
    if configured:
        return configured, "the config (" + ("hf_hub_token" if hub == "huggingface" else "ms_hub_token") + ")"
    for name in TOKEN_ENV[hub]:
        if os.environ.get(name):
            return os.environ[name], name
    return None, None


def list_folder(folder: Path) -> list[tuple[str, int]]:
    """Every file that an upload of ``folder`` sends (hidden files are skipped), sorted, with sizes."""
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            out.append((rel.as_posix(), path.stat().st_size))
    return out


def plan_upload(folder: Path | None, hub: str, repo_id: str, private: bool, configured_token: str | None,
                planned_files: list[tuple[str, int]] | None = None) -> UploadPlan:
    """The upload of ``folder`` (exact), or of ``planned_files`` (estimated) when the folder is not written yet."""
    if hub not in TOKEN_ENV:
        raise ExportError(f"`export_hub: {hub}` is not supported; use huggingface or modelscope")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ExportError(f"`export_hub_model_id: {repo_id}` must look like owner/name")
    _, source = find_token(hub, configured_token)
    if folder is not None and folder.is_dir():
        return UploadPlan(hub, repo_id, private, list_folder(folder), estimated=False, token_source=source)
    return UploadPlan(hub, repo_id, private, list(planned_files or []), estimated=True, token_source=source)


def upload(plan: UploadPlan, folder: Path, configured_token: str | None) -> str:
    """Create the repository if needed and upload ``folder``; returns the repository URL."""
    token, _ = find_token(plan.hub, configured_token)
    if not token:
        raise ExportError(f"uploading to {plan.hub} needs a token",
                          hint=f"set {TOKEN_ENV[plan.hub][0]} in the environment (or run with --dry-run to see "
                               "what would be uploaded)")
    logger.info("uploading %d files (%s) to %s:%s", len(plan.files), human_size(plan.total_bytes), plan.hub,
                plan.repo_id)
    if plan.hub == "huggingface":
        return _upload_hf(plan, folder, token)
    return _upload_modelscope(plan, folder, token)


def _upload_hf(plan: UploadPlan, folder: Path, token: str) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        api.create_repo(plan.repo_id, private=plan.private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=plan.repo_id, folder_path=str(folder), repo_type="model",
                          commit_message="Upload model exported by loraforge", ignore_patterns=[".*", "**/.*"])
    except HfHubHTTPError as err:
        raise ExportError(f"the Hugging Face Hub refused the upload to {plan.repo_id}: {err}",
                          hint="check that the token has write access to that namespace") from None
    return f"https://huggingface.co/{plan.repo_id}"


def _upload_modelscope(plan: UploadPlan, folder: Path, token: str) -> str:
    try:
        from modelscope.hub.api import HubApi
    except ImportError:
        raise ExportError("uploading to ModelScope needs the `modelscope` package",
                          hint="pip install 'loraforge[modelscope]'") from None
    api = HubApi()
    try:
        api.login(token)
        api.create_repo(plan.repo_id, visibility="private" if plan.private else "public", exist_ok=True)
        api.upload_folder(repo_id=plan.repo_id, folder_path=str(folder),
                          commit_message="Upload model exported by loraforge")
    except Exception as err:  # noqa: BLE001 - modelscope raises plain exceptions for HTTP failures
        raise ExportError(f"ModelScope refused the upload to {plan.repo_id}: {err}",
                          hint="check the token (MODELSCOPE_API_TOKEN) and the repository name") from None
    return f"https://modelscope.cn/models/{plan.repo_id}"
