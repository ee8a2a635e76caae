"""Schema machinery: declared keys, value checks, coercion, flattening.

A config section is a frozen dataclass whose fields are declared with
:func:`option` (default, one-line help, check). Sections nest; a key's dotted,
kebab-case name comes from its place (``federation.min-replies``). Families
declare their own option tables the same way (see :mod:`fedsim.core.family`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import field
from functools import cache
from typing import Any

import tomli_w

from fedsim.core.errors import ConfigError

Check = Callable[[Any], str | None]
#: Dotted key -> (type, field declaration).
Schema = dict[str, tuple[Any, dataclasses.Field[Any]]]


def option(default: Any, help: str, check: Check | None = None) -> Any:
    """Declare one key: default, one-line help and a value check.

    ``check(value)`` returns None when the value is allowed, else the reason
    (e.g. ``"must be > 0"``), shown as ``<key>: <value> <reason>``.
    """
    if isinstance(default, list):
        default = tuple(default)
    return field(default=default, metadata={"help": help, "check": check})


def at_least(low: float) -> Check:
    return lambda v: None if v >= low else f"must be >= {low:g}"


def positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def non_negative(v: float) -> str | None:
    return None if v >= 0 else "must be >= 0"


def fraction(v: float) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


def unit_interval(v: float) -> str | None:
    return None if 0 <= v <= 1 else "must be in [0, 1]"


def open_unit(v: float) -> str | None:
    return None if 0 < v < 1 else "must be in (0, 1)"


def rate(v: float) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


def one_of(*names: str) -> Check:
    return lambda v: (
        None if v in names else f"is not allowed; choose one of: {', '.join(names)}"
    )


def kebab(name: str) -> str:
    return name.replace("_", "-")


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp)


def declared(field_: dataclasses.Field[Any]) -> bool:
    """Whether a field is a declared key (sections and fields set elsewhere,
    like a family's option table, are not)."""
    return "help" in field_.metadata


def keys_of(cls: type, prefix: str = "") -> Schema:
    """Every dotted key of section ``cls`` (recursing into sub-sections)."""
    out: Schema = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + kebab(f.name)
        if is_section(tp):
            out.update(keys_of(tp, key + "."))
        elif declared(f):
            out[key] = (tp, f)
    return out


_TYPE_WORDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def coerce(key: str, tp: Any, value: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise a one-line ConfigError."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if item_tp is str and isinstance(value, str):
            value = [value]  # one name stands for a list of one
        if not isinstance(value, (list, tuple)):
            raise ConfigError(
                f"{key}: expected a list of {_TYPE_WORDS[item_tp][2:]}s, got {value!r}"
            )
        return tuple(coerce(f"{key}[{i}]", item_tp, v) for i, v in enumerate(value))
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, tp) and not isinstance(value, bool)
    if not ok:
        raise ConfigError(
            f"{key}: expected {_TYPE_WORDS[tp]}, got {value!r} ({type(value).__name__})"
        )
    if tp is float:
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return value


def checked(key: str, tp: Any, field_: dataclasses.Field[Any], raw: Any) -> Any:
    """Coerce ``raw`` and apply the key's check (ConfigError naming the key)."""
    value = coerce(key, tp, raw)
    check = field_.metadata.get("check")
    problem = check(value) if check else None
    if problem:
        raise ConfigError(f"{key}: {value!r} {problem}")
    return value


def unknown_key(key: str, known: Iterable[str]) -> ConfigError:
    """The error for an undeclared dotted ``key``: the closest known key if one
    is close, else the keys of its table (or the tables, if the table itself
    does not exist)."""
    known = list(known)
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return ConfigError(f"{key}: unknown key; did you mean {close[0]!r}?")
    table = key.rpartition(".")[0]
    prefix = f"{table}." if table else ""
    here = dict.fromkeys(
        k.removeprefix(prefix).split(".")[0] for k in known if k.startswith(prefix)
    )
    if not here:
        tables = dict.fromkeys(k.rpartition(".")[0] for k in known if "." in k)
        return ConfigError(
            f"{key}: unknown key; there is no [{table}] table; tables: "
            + ", ".join(tables)
        )
    where = f"[{table}]" if table else "top-level"
    return ConfigError(f"{key}: unknown key; {where} keys: {', '.join(here)}")


def flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables as one dict of dotted keys (``{"data": {"alpha": 1}}`` ->
    ``{"data.alpha": 1}``)."""
    flat: dict[str, Any] = {}
    for k, v in table.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def build(cls: type, values: Mapping[str, Any], prefix: str = "", **extra: Any) -> Any:
    """Instantiate section ``cls`` from checked dotted ``values`` (defaults for
    keys not given); ``extra`` sets fields that are not declared keys."""
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + kebab(f.name)
        if is_section(tp):
            kwargs[f.name] = build(tp, values, key + ".")
        elif key in values:
            kwargs[f.name] = values[key]
    return cls(**kwargs, **extra)


def as_table(obj: Any) -> Any:
    """A section as a nested dict with kebab-case keys (tuples as lists); a field
    holding a section that is not a declared key (a family's option table) is
    merged into its parent table."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = as_table(getattr(obj, f.name))
            if (
                not declared(f)
                and isinstance(value, dict)
                and not is_section(_hints(type(obj))[f.name])
            ):
                out.update(value)
            else:
                out[kebab(f.name)] = value
        return out
    if isinstance(obj, tuple):
        return list(obj)
    return obj


def shown_default(field_: dataclasses.Field[Any]) -> str:
    """A key's default as TOML text (lists as JSON)."""
    default = field_.default
    if isinstance(default, tuple):
        return json.dumps(list(default))
    return tomli_w.dumps({"v": default})[4:].strip()
