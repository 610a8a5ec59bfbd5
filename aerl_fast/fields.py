"""Settings dataclasses declared once: each field carries its help, its range or choices and its
argument group, and one checker enforces type, finiteness and range at the boundary.

    batch_size: int = setting(64, "global training batch size", lo=1, group="optimisation")

The same declaration serves the CLI (help text, choices), the JSON loaders (presets, config.json,
reproduce matrices: a value of the wrong type names its key) and the library (`check(obj)` on a
dataclass a user built by hand).  Why one checker: `nan < 0` is False, so a range check alone lets
NaN through; `64.5` is a float where an int is meant, `"1e-3"` a string where a number is.
"""
from __future__ import annotations

import math
import typing
from dataclasses import MISSING, field, fields
from typing import Any, Callable, Dict, Iterable, Optional, Sequence

from aerl_fast.errors import ConfigError


def setting(default, help: str, *, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False,
            choices: Optional[Sequence] = None, group: str = "", flag: Optional[str] = None,
            resumable: bool = False, default_factory: Optional[Callable] = None):
    """A dataclass field with its CLI help, allowed values and argument group.

    lo/hi: inclusive bounds (lo_open/hi_open make them exclusive).  resumable: a TrainConfig
    field that `--resume` may change (recorded in config.json's history)."""
    meta = {"help": help, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open,
            "choices": tuple(choices) if choices is not None else None, "group": group,
            "flag": flag, "resumable": resumable}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def flag_of(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def base_type(cls, f) -> tuple:
    """(python type, optional?) of a field, from its (string) annotation."""
    hints = typing.get_type_hints(cls)
    t = hints[f.name]
    optional = False
    if typing.get_origin(t) is typing.Union:
        args = [a for a in typing.get_args(t) if a is not type(None)]
        optional = len(args) < len(typing.get_args(t))
        t = args[0] if len(args) == 1 else t
    return t, optional


def check_value(cls, f, value, label: str):
    """`value` converted to field `f`'s type and checked against its range/choices, or a ConfigError
    naming `label` (a flag such as --batch-size, or `key` in a file)."""
    t, optional = base_type(cls, f)
    meta = f.metadata
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{label} needs a value, got null")
    origin = typing.get_origin(t)
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{label} must be a list, got {value!r}")
        (item,) = set(typing.get_args(t)) - {Ellipsis} or {str}
        return tuple(_scalar(item, v, label, meta) for v in value)
    return _scalar(t, value, label, meta)


def _scalar(t, value, label, meta):
    if t is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{label} must be true or false, got {value!r}")
    elif t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and math.isfinite(value) and value == int(value):
                value = int(value)
            else:
                raise ConfigError(f"{label} must be an integer, got {value!r}")
    elif t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{label} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{label} must be a finite number, got {value}")
    elif t is str:
        if not isinstance(value, str):
            raise ConfigError(f"{label} must be a string, got {value!r}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{label} must be one of {', '.join(map(str, choices))}, got {value!r}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
        raise ConfigError(f"{label} must be {'>' if meta.get('lo_open') else '>='} {_num(lo)}, got {_num(value)}")
    if hi is not None and (value >= hi if meta.get("hi_open") else value > hi):
        raise ConfigError(f"{label} must be {'<' if meta.get('hi_open') else '<='} {_num(hi)}, got {_num(value)}")
    return value


def _num(v) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def check(obj, label: Callable[[Any], str] = flag_of):
    """Check (and normalise in place) every field of the dataclass instance `obj`; returns `obj`."""
    cls = type(obj)
    for f in fields(obj):
        object.__setattr__(obj, f.name, check_value(cls, f, getattr(obj, f.name), label(f)))
    return obj


def from_mapping(cls, values: Dict[str, Any], where: str, *, ignore: Iterable[str] = ()):
    """An instance of `cls` from a JSON-like mapping, every key checked and named on error
    ("<where>: batch_size must be an integer, got 64.5"); keys in `ignore` are dropped."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(values).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known) - set(ignore))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    kept = {}
    for k, v in values.items():
        if k in known:
            try:
                kept[k] = check_value(cls, known[k], v, k)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
    return cls(**kept)


def defaults(cls) -> Dict[str, Any]:
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out
