"""The one way config fields are declared: a default, a help string, and optional choices."""

from __future__ import annotations

from dataclasses import field
from typing import Any


def arg(default: Any = None, help: str = "", choices: tuple | None = None, *, factory=None) -> Any:  # noqa: A002
    """Declare a config field whose ``help`` becomes ``--help`` text and whose ``choices`` are checked."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)
