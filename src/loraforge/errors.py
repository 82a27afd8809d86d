"""Typed errors. Each one carries a message that names what is wrong and how to fix it.

The CLI catches :class:`LoraforgeError` and prints only its message (no traceback) and exits with
``exit_code``; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LoraforgeError(Exception):
    """Base class of every error a user can fix by changing their config, data or environment."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  fix: {hint}")


class ConfigError(LoraforgeError):
    """The YAML or command-line overrides are invalid. ``problems`` lists every problem found."""

    def __init__(self, problems: list[str], *, source: str | None = None):
        self.problems = list(problems)
        where = f" in {source}" if source else ""
        head = f"{len(self.problems)} problem(s){where}:" if len(self.problems) != 1 else f"1 problem{where}:"
        body = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration, {head}\n{body}")


class DataError(LoraforgeError):
    """A dataset cannot be found, read or converted, or too many of its rows are bad."""


class TemplateError(LoraforgeError):
    """A chat template is unknown, defined twice, or cannot render a conversation."""


class ModelLoadError(LoraforgeError):
    """A model, adapter or tokenizer cannot be found or loaded."""


class TrainingError(LoraforgeError):
    """Training cannot go on (e.g. several non-finite losses in a row)."""

    exit_code = 3


class ExportError(LoraforgeError):
    """An export cannot be written (folder exists, disk full, unsupported architecture...)."""
