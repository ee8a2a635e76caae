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
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from dataclasses import field
from functools import cache
from typing import Any

import tomli_w

from fedsim.core.errors import ConfigError

Check = Callable[[Any], str | None]
#: Dotted key -> (type, field declaration).
Schema = dict[str, tuple[Any, dataclasses.Field[Any]]]


class Table(Mapping[str, Any]):
    """A key whose value is a TOML table of scalars and lists (e.g. keyword
    arguments passed on to a library), frozen and hashable like every config
    value: lists are kept as tuples; :meth:`plain` gives them back as lists."""

    def __init__(self, items: Mapping[str, Any] | None = None) -> None:
        pairs = ((str(k), _frozen(v)) for k, v in (items or {}).items())
        self._items = tuple(sorted(pairs))

    def __getitem__(self, key: str) -> Any:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Table) and self._items == other._items

    def __repr__(self) -> str:
        return f"Table({self.plain()!r})"

    def plain(self) -> dict[str, Any]:
        """The table as a dict, tuples as lists."""
        return {k: _thawed(v) for k, v in self._items}


def _frozen(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def _thawed(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thawed(v) for v in value]
    return value


def option(default: Any, help: str, check: Check | None = None) -> Any:
    """Declare one key: default, one-line help and a value check.

    ``check(value)`` returns None when the value is allowed, else the reason
    (e.g. ``"must be > 0"``), shown as ``<key>: <value> <reason>``.
    """
    if isinstance(default, list):
        default = tuple(default)
    return field(default=default, metadata={"help": help, "check": check})


def fills(*names: str) -> Check:
    """A ``str.format`` template that fills only the fields ``names``."""

    def check(v: str) -> str | None:
        try:
            v.format(**dict.fromkeys(names, ""))
        except (KeyError, IndexError, ValueError) as err:
            fields = ", ".join("{" + n + "}" for n in names)
            return f"may fill only {fields} ({type(err).__name__}: {err})"
        return None

    return check


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
    if tp is Table:
        return _table(key, value)
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


def _table(key: str, value: Any) -> Table:
    """A table of scalars and lists of scalars (no nested tables)."""
    if isinstance(value, Table):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a table, got {value!r}")
    for name, item in value.items():
        items = item if isinstance(item, (list, tuple)) else [item]
        if any(isinstance(i, (Mapping, list, tuple)) for i in items):
            raise ConfigError(
                f"{key}.{name}: expected a number, string, boolean or a list of "
                f"them, got {item!r}"
            )
    return Table(value)


def regroup(values: Mapping[str, Any], keys: Schema) -> dict[str, Any]:
    """``values`` with the entries of table-valued keys gathered: a TOML file's
    ``[data.partitioner-args]`` table, flattened to ``data.partitioner-args.x``,
    becomes ``data.partitioner-args = {x = ...}`` (``--set`` may set entries the
    same way)."""
    tables = [k for k, (tp, _) in keys.items() if tp is Table]
    out: dict[str, Any] = {}
    for key, value in values.items():
        owner = next((t for t in tables if key.startswith(f"{t}.")), None)
        if owner is None:
            out[key] = value
            continue
        table = out.setdefault(owner, {})
        if not isinstance(table, dict):
            table = out[owner] = dict(_table(owner, table))
        table[key.removeprefix(f"{owner}.")] = value
    return out


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


def flatten(
    table: Mapping[str, Any], prefix: str = "", keep: Container[str] = ()
) -> dict[str, Any]:
    """Nested tables as one dict of dotted keys (``{"data": {"alpha": 1}}`` ->
    ``{"data.alpha": 1}``); the dotted keys in ``keep`` stay whole tables."""
    flat: dict[str, Any] = {}
    for k, v in table.items():
        if isinstance(v, dict) and f"{prefix}{k}" not in keep:
            flat.update(flatten(v, f"{prefix}{k}.", keep))
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
    if isinstance(obj, Table):
        return obj.plain()
    return obj


def shown_default(field_: dataclasses.Field[Any]) -> str:
    """A key's default as TOML text (lists as JSON)."""
    default = field_.default
    if isinstance(default, Table):
        return json.dumps(default.plain())
    if isinstance(default, tuple):
        return json.dumps(list(default))
    return tomli_w.dumps({"v": default})[4:].strip()
