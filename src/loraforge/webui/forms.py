"""The config form: generated from the typed config fields, read from and written back to a YAML file.

The page never holds a second list of keys: every field, its help text, choices and default come from
:func:`loraforge.config.all_fields`. A YAML loaded into the page and saved again keeps the same keys (in the same
order) and the same values, because only the keys the file had, plus the keys the user changed, are written.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import functools
import shlex
import types
import typing
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml

from ..errors import ConfigError

GROUP_ORDER = ("model", "data", "finetuning", "training", "generation", "export")

# The training group is Hugging Face's ~170 TrainingArguments; these are the ones a LoRA user sets (the rest sit
# under "more" on the page, still generated from the same dataclass).
COMMON_TRAINING = (
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "per_device_train_batch_size",
    "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "warmup_ratio", "warmup_steps",
    "num_train_epochs", "max_steps", "bf16", "fp16", "optim", "weight_decay", "max_grad_norm", "seed",
    "logging_steps", "save_steps", "save_total_limit", "eval_strategy", "eval_steps", "per_device_eval_batch_size",
    "do_train", "do_eval", "do_predict", "report_to", "nproc_per_node", "deepspeed",
)


def _plain(value: Any) -> Any:
    """A JSON-safe form of a default (enums become their value, odd objects their text)."""
    if isinstance(value, enum.Enum):
        return value.value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def _kind(tp: Any, choices: tuple | None) -> str:
    """How the page edits a field: bool (checkbox), choice (select), int, float, str, or yaml (free text)."""
    if choices:
        return "choice"
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        members = [a for a in get_args(tp) if a is not type(None)]
        if len(members) == 1:
            return _kind(members[0], None)
        return "yaml"
    if origin is typing.Literal:
        return "choice"
    if tp is bool:
        return "bool"
    if tp is int:
        return "int"
    if tp is float:
        return "float"
    if tp is str:
        return "str"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "choice"
    return "yaml"


def _choices(f: dataclasses.Field, tp: Any) -> list | None:
    choices = (f.metadata or {}).get("choices")
    if choices:
        return list(choices)
    if tp == typing.Optional[bool]:
        return [True, False, None]  # null has a meaning of its own (e.g. enable_thinking, packing)
    base = tp
    if get_origin(tp) in (Union, types.UnionType):
        members = [a for a in get_args(tp) if a is not type(None)]
        base = members[0] if len(members) == 1 else tp
    if get_origin(base) is typing.Literal:
        return list(get_args(base))
    if isinstance(base, type) and issubclass(base, enum.Enum):
        return [m.value for m in base]
    return None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return _plain(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        try:
            return _plain(f.default_factory())  # type: ignore[misc]
        except Exception:  # noqa: BLE001 - a factory that needs context: show no default
            return None
    return None


@functools.lru_cache(maxsize=1)
def _schema() -> tuple:
    return tuple(_build_schema())


def form_schema() -> list[dict[str, Any]]:
    """The groups of the form, in YAML order, each with its fields (name, kind, default, help, choices)."""
    return copy.deepcopy(list(_schema()))


def _build_schema() -> list[dict[str, Any]]:
    from ..config import all_fields

    groups: dict[str, list[dict[str, Any]]] = {g: [] for g in GROUP_ORDER}
    for name, entries in all_fields().items():
        group, f, tp = entries[0]  # a key declared in two groups is edited once, where it is first declared
        help_text = (f.metadata or {}).get("help", "") or ""
        choices = _choices(f, tp)
        advanced = group == "training" and name not in COMMON_TRAINING
        groups.setdefault(group, []).append({
            "name": name, "kind": _kind(tp, tuple(choices) if choices else None), "default": _default(f),
            "help": help_text, "choices": choices, "advanced": advanced,
        })
    order = {k: i for i, k in enumerate(COMMON_TRAINING)}
    groups["training"].sort(key=lambda fld: order.get(fld["name"], len(order)))
    return [{"name": g, "fields": groups[g]} for g in groups if groups[g]]


def field_kinds() -> dict[str, str]:
    """Field name -> kind, for turning the page's text inputs back into YAML values."""
    return {fld["name"]: fld["kind"] for group in _schema() for fld in group["fields"]}


def value_from_form(name: str, value: Any, kinds: dict[str, str]) -> Any:
    """The YAML value of what the page sent.

    Checkboxes and selects send typed JSON values, kept as they are; text inputs send text, which stays text for
    string fields and is read as YAML for numbers and free-form fields (``1e-4``, ``[a, b]``, ``null``).
    """
    kind = kinds.get(name, "yaml")
    if not isinstance(value, str) or kind in ("str", "choice"):
        return value
    if value.strip() == "":
        return None
    for number in {"int": (int,), "float": (int, float)}.get(kind, ()):
        try:  # `1` stays 1 in a float field (as YAML reads it); `1e-4` is a float (YAML would read text)
            return number(value.strip())
        except ValueError:
            pass
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def values_from_form(values: dict[str, Any]) -> dict[str, Any]:
    """Convert every value the page sent (an ordered mapping of the keys to write)."""
    kinds = field_kinds()
    return {str(k): value_from_form(str(k), v, kinds) for k, v in values.items()}


def load_yaml_for_form(path: str | Path) -> dict[str, Any]:
    """The keys and values of a YAML config, in file order (errors name the file and line)."""
    from ..config import read_yaml

    return read_yaml(path)


def dump_yaml(values: dict[str, Any]) -> str:
    """YAML text of ``values`` in their order, with Chinese and other text kept readable."""
    return yaml.safe_dump(dict(values), sort_keys=False, allow_unicode=True, default_flow_style=False)


def validate(values: dict[str, Any], purpose: str = "train", *, source: str | None = None) -> list[str]:
    """Every problem `loraforge PURPOSE` would report for these values (empty when they are valid).

    The environment is not checked (a 4-GPU config can be written on a laptop); the HF training arguments are
    built, so their own errors (e.g. bf16 on a machine without it) show here as on the command line.
    """
    from ..config import load_config
    from ..data.templates import known_template_names

    try:
        load_config(dict(values), purpose=purpose, check_environment=False,
                    build_training_args=purpose == "train", template_names=known_template_names())
    except ConfigError as err:
        where = f" (in {source})" if source else ""
        return [p + where for p in err.problems]
    return []


def save_yaml(path: str | Path, values: dict[str, Any]) -> Path:
    """Write ``values`` to ``path`` atomically (a half-written config never replaces a good one)."""
    target = Path(path)
    if target.suffix.lower() not in (".yaml", ".yml"):
        raise ConfigError([f"{target} must end in .yaml or .yml (a config file for `loraforge train`)"])
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(dump_yaml(values), encoding="utf-8")
    tmp.replace(target)
    return target


def _override_text(key: str, value: Any) -> str:
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (int, float, str)):
        text = str(value)
    else:
        text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).strip()
    return shlex.quote(f"{key}={text}")


def command_line(command: str, values: dict[str, Any], source: str | None,
                 source_values: dict[str, Any] | None, extra: list[str] | None = None) -> str:
    """The command line that does what the page does: the loaded file plus ``key=value`` for each change.

    Without a loaded file, the config has to be saved first; the command then names the saved file.
    """
    parts = ["loraforge", *command.split(), shlex.quote(source or "run.yaml"), *(extra or [])]
    base = source_values or {}
    for key, value in values.items():
        if key not in base or base[key] != value:
            parts.append(_override_text(key, value))
    removed = [key for key in base if key not in values]
    if removed:  # a key removed in the page goes back to its default
        defaults = {f["name"]: f["default"] for group in form_schema() for f in group["fields"]}
        parts += [_override_text(key, defaults.get(key)) for key in removed]
    return " ".join(parts)
