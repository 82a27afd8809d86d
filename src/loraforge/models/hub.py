"""Where a model or adapter comes from: a built-in name, a local folder, or a hub id (Hugging Face or ModelScope).

Everything that can go wrong here (missing folder, offline, unknown repo, gated repo, bad revision) becomes a
one-line :class:`~loraforge.errors.ModelLoadError` that says what to do, instead of a library traceback.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ModelLoadError
from .builtin import BUILTIN_MODELS, resolve_builtin

if TYPE_CHECKING:
    from ..config import ModelArguments

# Weight formats we never load; skipping them keeps a hub download to what transformers will read.
_SKIP_WEIGHTS = ["*.pth", "*.pt", "*.gguf", "*.h5", "*.msgpack", "*.onnx", "*.ot", "*.tflite", "original/*"]
_ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "*.json", "*.txt",
                  "*.jinja", "*.model", "*.tiktoken"]


def use_modelscope() -> bool:
    """True when ``USE_MODELSCOPE_HUB`` asks for ModelScope instead of the Hugging Face hub."""
    return os.environ.get("USE_MODELSCOPE_HUB", "0").strip().lower() in ("1", "true", "yes", "y", "on")


def looks_like_local_path(name: str) -> bool:
    """A value that can only mean a folder on disk (hub ids look like ``org/name`` or ``name``)."""
    return (name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or os.path.isabs(name) or "\\" in name
            or name.count("/") > 1 or name in (".", ".."))


def _builtin_hint(name: str) -> str:
    close = difflib.get_close_matches(name, list(BUILTIN_MODELS), n=1, cutoff=0.6)
    if close:
        return f"did you mean the built-in `{close[0]}`?"
    return f"or use a built-in model ({', '.join(BUILTIN_MODELS)})"


def resolve_model_path(model_args: "ModelArguments") -> str:
    """The local folder (or, for ModelScope/HF, the downloaded snapshot) that ``model_name_or_path`` names.

    Built-in names are materialised on first use; local folders are checked; hub ids are downloaded (or found
    in the cache when offline) with ``cache_dir``, ``model_revision`` and the hub token.
    """
    name = (model_args.model_name_or_path or "").strip()
    if not name:
        raise ModelLoadError("model_name_or_path is empty: set it to a local folder, a hub id such as "
                             f"Qwen/Qwen3-0.6B, or a built-in name ({', '.join(BUILTIN_MODELS)})")
    builtin = resolve_builtin(name, model_args.cache_dir)
    if builtin is not None:
        return str(builtin)
    path = Path(name).expanduser()
    if path.is_dir():
        _check_model_folder(path)
        return str(path)
    if path.is_file():
        raise ModelLoadError(f"model_name_or_path: {name} is a file; give the folder that holds config.json and "
                             "the weights (GGUF files are not loaded for training)")
    if looks_like_local_path(name):
        raise ModelLoadError(f"model_name_or_path: folder {name} does not exist; fix the path, give a hub id "
                             f"such as Qwen/Qwen3-0.6B, {_builtin_hint(name)}")
    try:
        return download(name, model_args, what="model")
    except ModelLoadError:
        close = difflib.get_close_matches(name, list(BUILTIN_MODELS), n=1, cutoff=0.6)
        if close and "/" not in name:  # most likely a misspelt built-in name, not a hub id
            raise ModelLoadError(f"model_name_or_path: {name} is not a built-in model, a local folder or a cached "
                                 f"hub model; did you mean the built-in `{close[0]}`?") from None
        raise


def resolve_adapter_path(name: str, model_args: "ModelArguments") -> str:
    """The local folder of one adapter from ``adapter_name_or_path`` (downloaded when it is a hub id)."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "adapter_config.json").is_file():
            raise ModelLoadError(f"adapter_name_or_path: {name} has no adapter_config.json; give the folder of a "
                                 "PEFT LoRA adapter (the output_dir of a LoRA run or one of its checkpoint-N folders)")
        return str(path)
    if path.exists() or looks_like_local_path(name):
        raise ModelLoadError(f"adapter_name_or_path: folder {name} does not exist; give the output_dir of a LoRA "
                             "run (it holds adapter_config.json and adapter_model.safetensors)")
    return download(name, model_args, what="adapter")


def _check_model_folder(path: Path) -> None:
    if (path / "config.json").is_file():
        return
    adapter_config = path / "adapter_config.json"
    if adapter_config.is_file():
        try:
            base = json.loads(adapter_config.read_text()).get("base_model_name_or_path") or "the base model"
        except (OSError, ValueError):
            base = "the base model"
        raise ModelLoadError(f"model_name_or_path: {path} is a LoRA adapter, not a model; set "
                             f"model_name_or_path: {base} and adapter_name_or_path: {path}")
    raise ModelLoadError(f"model_name_or_path: {path} has no config.json; give the folder of a Hugging Face "
                         "model (config.json + *.safetensors + tokenizer files)")


def download(repo_id: str, model_args: "ModelArguments", *, what: str) -> str:
    """Download (or find in the cache) ``repo_id`` from ModelScope or the Hugging Face hub; one-line errors."""
    if use_modelscope():
        return _download_modelscope(repo_id, model_args, what)
    return _download_hf(repo_id, model_args, what)


def _download_hf(repo_id: str, model_args: "ModelArguments", what: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hub_errors

    key = "model_name_or_path" if what == "model" else "adapter_name_or_path"
    token = model_args.hf_hub_token or None
    kwargs = dict(repo_id=repo_id, revision=model_args.model_revision or None, cache_dir=model_args.cache_dir,
                  token=token)
    try:
        if what == "adapter":
            return snapshot_download(allow_patterns=_ADAPTER_FILES, **kwargs)
        folder = snapshot_download(ignore_patterns=_SKIP_WEIGHTS + ["*.bin"], **kwargs)
        if not any(Path(folder).glob("*.safetensors")):  # older repos ship only PyTorch .bin weights
            folder = snapshot_download(ignore_patterns=_SKIP_WEIGHTS, **kwargs)
        return folder
    except hub_errors.GatedRepoError:
        raise ModelLoadError(f"{key}: {repo_id} is gated on the Hugging Face hub; accept its license on "
                             "huggingface.co and set hf_hub_token (or HF_TOKEN)") from None
    except hub_errors.RepositoryNotFoundError:
        raise ModelLoadError(f"{key}: {repo_id} was not found on the Hugging Face hub (or it is private: set "
                             f"hf_hub_token or HF_TOKEN); check the id, {_builtin_hint(repo_id)}") from None
    except hub_errors.RevisionNotFoundError:
        raise ModelLoadError(f"model_revision: {model_args.model_revision} does not exist for {repo_id}; use a "
                             "branch, tag or commit of that repository (default: main)") from None
    except PermissionError as exc:
        raise ModelLoadError(f"{key}: cannot write the download cache for {repo_id} ({short_error(exc)}); set "
                             "cache_dir (or HF_HOME) to a writable folder") from None
    except (hub_errors.LocalEntryNotFoundError, hub_errors.OfflineModeIsEnabled, OSError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set" if offline else f"the Hugging Face hub is unreachable ({short_error(exc, 80)})"
        raise ModelLoadError(f"{key}: cannot get {repo_id}: {why} and it is not in the cache; download it where "
                             f"there is network (hf download {repo_id} --local-dir DIR) and set {key}: DIR, "
                             f"{_builtin_hint(repo_id)}") from None
    except hub_errors.HfHubHTTPError as exc:
        raise ModelLoadError(f"{key}: downloading {repo_id} from the Hugging Face hub failed ({short_error(exc)}); "
                             "retry, or download it elsewhere and give the local folder") from None


def _download_modelscope(repo_id: str, model_args: "ModelArguments", what: str) -> str:
    key = "model_name_or_path" if what == "model" else "adapter_name_or_path"
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise ModelLoadError("USE_MODELSCOPE_HUB=1 needs the modelscope package: pip install 'loraforge[modelscope]' "
                             "(or unset USE_MODELSCOPE_HUB to use the Hugging Face hub)") from None
    revision = model_args.model_revision
    if revision == "main":  # ModelScope's default branch is `master`
        revision = "master"
    try:
        if model_args.ms_hub_token:
            from modelscope.hub.api import HubApi

            HubApi().login(model_args.ms_hub_token)
        return snapshot_download(repo_id, revision=revision, cache_dir=model_args.cache_dir,
                                 ignore_file_pattern=[p.replace("*", ".*") for p in _SKIP_WEIGHTS])
    except Exception as exc:  # noqa: BLE001 - modelscope raises plain Exceptions and requests errors
        raise ModelLoadError(f"{key}: cannot get {repo_id} from ModelScope ({short_error(exc)}); check the id and your "
                             f"network, or download it elsewhere and give the local folder") from None


def short_error(exc: BaseException, limit: int = 120) -> str:
    """An exception's type and message on one line, trimmed to ``limit`` characters."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"
