"""Turn YAML / command-line values into the types declared on config fields, with precise errors."""

from __future__ import annotations

import enum
import json
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

_TRUE = {"true", "yes", "y", "on", "1"}
_FALSE = {"false", "no", "n", "off", "0"}
_NONE = {"null", "none", "~", ""}


class CoercionError(ValueError):
    """A value does not fit the declared type; the message says what was expected."""


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp) if a is not type(None))
    if origin is Literal:
        return "one of " + ", ".join(map(repr, get_args(tp)))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp)


def coerce(value: Any, tp: Any, *, nullable: bool) -> Any:
    """Return ``value`` converted to ``tp``; raise :class:`CoercionError` naming the expected type."""
    if isinstance(tp, str):  # postponed annotation that could not be resolved
        return value
    if isinstance(value, str) and value.strip().lower() in _NONE and not (
            _accepts_str(tp) and value.strip().lower() in ("none", "")):
        value = None  # `null`/`~` always; `none`/empty only where a string is not a valid value (e.g. report_to: none)
    if value is None:
        if nullable:
            return None
        raise CoercionError(f"expected {_describe(tp)}, got null")
    origin = get_origin(tp)
    if tp is Any or tp is object:
        return value
    if origin in (Union, types.UnionType):
        members = [a for a in get_args(tp) if a is not type(None)]
        for member in members:  # an exact match wins (e.g. 3 stays int in Union[int, str])
            if isinstance(member, type) and isinstance(value, member) and not (member is int and isinstance(value, bool)):
                return value
        for member in members:
            try:
                return coerce(value, member, nullable=nullable)
            except CoercionError:
                continue
        raise CoercionError(f"expected {_describe(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise CoercionError(f"expected {_describe(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, str)) and str(value).strip().lower() in _TRUE | _FALSE:
            return str(value).strip().lower() in _TRUE
        raise CoercionError(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise CoercionError(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.strip().replace("_", ""))
            except ValueError:
                pass
            else:
                if number.is_integer():
                    return int(number)
        raise CoercionError(f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise CoercionError(f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise CoercionError(f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) for v in value):
            return ",".join(str(v) for v in value)  # YAML lists for comma-list keys such as lora_target
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise CoercionError(f"expected a string, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        if isinstance(value, str):
            try:
                loaded = json.loads(value)
            except json.JSONDecodeError as err:
                raise CoercionError(f"expected a mapping or JSON object, got {value!r} ({err.msg})") from None
            if isinstance(loaded, dict):
                return loaded
        raise CoercionError(f"expected a mapping, got {value!r}")
    if tp is list or origin is list:
        inner = (get_args(tp) or (Any,))[0]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return [coerce(v, inner, nullable=False) for v in value]
        return [coerce(value, inner, nullable=False)]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        for member in tp:
            if str(value).lower() in (str(member.value).lower(), member.name.lower()):
                return member.value
        raise CoercionError(f"expected one of {', '.join(str(m.value) for m in tp)}, got {value!r}")
    return value


def _accepts_str(tp: Any) -> bool:
    if tp is str:
        return True
    if get_origin(tp) in (Union, types.UnionType):
        return any(_accepts_str(a) for a in get_args(tp))
    return False


def field_type_nullable(tp: Any, default: Any) -> bool:
    """A field accepts null when its type is Optional or its default is None."""
    if default is None:
        return True
    origin = typing.get_origin(tp)
    return origin in (Union, types.UnionType) and type(None) in typing.get_args(tp)
