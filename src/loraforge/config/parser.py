"""Read a YAML config and ``key=value`` overrides into a typed, validated :class:`RunConfig`.

Every key is checked: an unknown key names the closest valid ones, a wrong type names the expected one, and
all problems (including cross-field ones from :mod:`.validate`) are raised together before any model loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection

import yaml

from ..errors import ConfigError
from .coerce import CoercionError, coerce, field_type_nullable
from .compat import NEUTRAL_KEYS, RENAMED_KEYS
from .data import DataArguments
from .export import ExportArguments
from .finetuning import FinetuningArguments
from .generation import GeneratingArguments
from .model import ModelArguments
from .training import TrainingArguments, adjust_training_values
from .validate import check

logger = logging.getLogger(__name__)

GROUPS: dict[str, type] = {
    "model": ModelArguments,
    "data": DataArguments,
    "finetuning": FinetuningArguments,
    "generation": GeneratingArguments,
    "export": ExportArguments,
    "training": TrainingArguments,
}

PURPOSES = ("train", "predict", "eval", "chat", "api", "export", "data", "estimate")


@dataclass
class RunConfig:
    """The whole run: one typed group per concern, plus where each value came from."""

    model: ModelArguments
    data: DataArguments
    finetuning: FinetuningArguments
    generation: GeneratingArguments
    export: ExportArguments
    training: TrainingArguments | None
    purpose: str = "train"
    source: str | None = None
    explicit: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A flat mapping that ``load_config`` reads back: every loraforge key plus explicitly set HF keys."""
        out: dict[str, Any] = {}
        for name in ("model", "data", "finetuning", "generation", "export"):
            out.update(dataclasses.asdict(getattr(self, name)))
        if self.training is not None:
            ours = {f.name for f in dataclasses.fields(TrainingArguments) if f.name in TrainingArguments.__dict__}
            hf = self.training.to_dict()
            for key in {"output_dir", "per_device_train_batch_size", "per_device_eval_batch_size",
                        "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "warmup_steps",
                        "num_train_epochs", "max_steps", "bf16", "fp16", "max_grad_norm", "optim", "weight_decay",
                        "seed", "logging_steps", "save_steps", "save_strategy", "eval_strategy", "eval_steps",
                        "do_train", "do_eval", "do_predict", "report_to", "ddp_timeout", "deepspeed",
                        "resume_from_checkpoint", "save_only_model", "save_total_limit"} | ours | set(self.explicit):
                if key in hf:
                    out[key] = _plain(hf[key])
        return out


def _plain(value: Any) -> Any:
    if hasattr(value, "value") and not isinstance(value, (str, int, float, bool)):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def all_fields() -> dict[str, list[tuple[str, dataclasses.Field, Any]]]:
    """Every accepted key -> [(group name, dataclass field, resolved type)], in declaration order."""
    table: dict[str, list[tuple[str, dataclasses.Field, Any]]] = {}
    for group, cls in GROUPS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init or f.name.startswith("_"):
                continue
            table.setdefault(f.name, []).append((group, f, hints.get(f.name, f.type)))
    return table


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Load a YAML (or JSON) config file into a dict; errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file {str(path)!r} does not exist (cwd: {os.getcwd()})"])
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"cannot parse YAML{where}: {getattr(err, 'problem', err)}"], source=str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"the top level must be a mapping of key: value, got {type(raw).__name__}"],
                          source=str(path))
    return {str(k): v for k, v in raw.items()}


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(args: list[str] | None) -> dict[str, Any]:
    """Parse ``key=value``, ``--key value``, ``--key=value`` and bare ``--flag`` (true) overrides."""
    out: dict[str, Any] = {}
    args = list(args or [])
    i = 0
    while i < len(args):
        item = args[i]
        if item.startswith("--"):
            item = item[2:]
            if "=" in item:
                key, value = item.split("=", 1)
                out[key.replace("-", "_")] = _parse_value(value)
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                out[item.replace("-", "_")] = _parse_value(args[i + 1])
                i += 1
            else:
                out[item.replace("-", "_")] = True
        elif "=" in item:
            key, value = item.split("=", 1)
            out[key.strip()] = _parse_value(value)
        else:
            raise ConfigError([f"cannot read override {item!r}: write key=value or --key value"])
        i += 1
    return out


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
    if not close:
        close = [k for k in known if key in k or (len(k) > 4 and k in key)][:3]
    return f"; did you mean {', '.join(close)}?" if close else "; see `loraforge train --help` for valid keys"


def load_config(
    config: str | os.PathLike | dict[str, Any] | None,
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    purpose: str = "train",
    build_training_args: bool = True,
    check_environment: bool = True,
    template_names: Collection[str] | None = None,
) -> RunConfig:
    """Build and validate the run config. Raises :class:`ConfigError` listing every problem at once.

    ``purpose`` (train, predict, eval, chat, api, export, data, estimate) selects which keys are required.
    ``build_training_args=False`` skips constructing the HF ``TrainingArguments`` (which initialises devices),
    e.g. to decide on a torchrun relaunch first. ``check_environment=False`` validates the config alone
    (e.g. a 4-GPU DeepSpeed config on a laptop), without asking whether this machine can run it.
    ``template_names`` (the registered chat templates, ``data.templates.known_template_names()``, aliases included) lets an unknown
    ``template`` be reported here with the closest names; config/ does not import the data layer itself.
    """
    if purpose not in PURPOSES:
        raise ValueError(f"unknown purpose {purpose!r}")
    source = None
    if config is None:
        raw: dict[str, Any] = {}
    elif isinstance(config, dict):
        raw = dict(config)
    else:
        source = str(config)
        raw = read_yaml(config)
    given_in: dict[str, str] = {k: (f"in {source}" if source else "in the config") for k in raw}
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    for k in extra:
        given_in[k] = "on the command line"
    raw.update(extra)

    problems: list[str] = []
    notes: list[str] = []
    table = all_fields()
    known = sorted(set(table) | set(NEUTRAL_KEYS))
    values: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
    explicit: dict[str, Any] = {}

    for key, value in raw.items():
        where = given_in.get(key, "")
        if key in RENAMED_KEYS:
            new = RENAMED_KEYS[key]
            notes.append(f"`{key}` is the old name of `{new}`; using it as `{new}`")
            if new in raw:
                problems.append(f"`{key}` and `{new}` are both set ({where}); keep only `{new}`")
                continue
            key = new
        if key in NEUTRAL_KEYS and key not in table:
            neutral, feature = NEUTRAL_KEYS[key]
            if value not in neutral:
                problems.append(
                    f"`{key}: {value!r}` ({where}) asks for {feature}, which loraforge does not support yet; "
                    f"remove the key or set it to {neutral[0]!r}")
            continue
        if key not in table:
            problems.append(f"unknown key `{key}` ({where}){_suggest(key, known)}")
            continue
        explicit[key] = value
        for group, f, tp in table[key]:
            default = f.default if f.default is not dataclasses.MISSING else None
            choices = f.metadata.get("choices") if f.metadata else None
            if isinstance(value, bool) and choices and {"on", "off"} <= set(choices):
                value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
            try:
                converted = coerce(value, tp, nullable=field_type_nullable(tp, default))
            except CoercionError as err:
                problems.append(f"`{key}` ({where}): {err}")
                break
            if choices and converted is not None and converted not in choices:
                lowered = converted.lower() if isinstance(converted, str) else converted
                if lowered in choices:
                    converted = lowered
                else:
                    problems.append(f"`{key}: {value!r}` ({where}) is not one of: {', '.join(map(str, choices))}")
                    break
            values[group][key] = converted

    groups = {g: GROUPS[g](**values[g]) for g in GROUPS if g != "training"}
    cfg = RunConfig(training=None, purpose=purpose, source=source, explicit=explicit, notes=notes, **groups)

    problems += check(cfg, values["training"], purpose, environment=check_environment, template_names=template_names)
    if problems:
        raise ConfigError(problems, source=source)
    if build_training_args:
        cfg.training = build_training_arguments(cfg, values["training"])
    for note in cfg.notes:
        logger.info(note)
    return cfg


def build_training_arguments(cfg: RunConfig, values: dict[str, Any]) -> TrainingArguments:
    """Construct the HF training arguments; its own errors come back as a :class:`ConfigError`."""
    values = adjust_training_values(cfg, dict(values))
    try:
        return TrainingArguments(**values)
    except (ValueError, ImportError, TypeError) as err:
        raise ConfigError([f"training arguments: {err}"], source=cfg.source) from None
