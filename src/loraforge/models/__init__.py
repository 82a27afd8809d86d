"""loraforge.models: built-in offline models, hub/local resolution, loading, quantization, adapters.

The contract (docs/DESIGN.md) is importable from here; the heavy modules load on first use.

    from loraforge.models import load_tokenizer, load_model, summarize_model, resolve_builtin
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BUILTIN_MODELS": "builtin", "resolve_builtin": "builtin",
    "resolve_model_path": "hub",
    "load_tokenizer": "loader", "load_model": "loader", "compute_dtype": "loader",
    "summarize_model": "summary", "ModelSummary": "summary",
    "loraplus_param_groups": "adapters", "find_linear_modules": "adapters",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
