"""What every command line of aerl_fast shares: flags made from the settings dataclasses (help,
argument group and one default shown per flag), numbers written as fractions, and the one-line
error exit.  The CLIs are thin shells: they parse, then call the stage's library function."""
from __future__ import annotations

import argparse
import os
import sys
import typing
from dataclasses import MISSING, fields
from fractions import Fraction
from typing import Callable, Dict, Iterable, Optional

from aerl_fast.errors import UserError
from aerl_fast.fields import base_type, flag_of


def number(text: str) -> float:
    """A float from "0.5", "1e-3" or a fraction such as "8/255" (the field writes L∞ radii so)."""
    s = str(text).strip()
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            if "/" in den:
                raise ValueError(s)
            return float(Fraction(num.strip()) / Fraction(den.strip()))
        return float(s)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (write e.g. 0.5, 1e-3 or 8/255)") from None


def integer(text: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer value: {text!r}") from None


def _default_text(f, default) -> str:
    if "default" in f.metadata.get("help", ""):  # the help says it in words (e.g. "on for CUDA")
        return ""
    if isinstance(default, tuple):
        default = " ".join(map(str, default)) if default else "none"
    return f" (default: {default})"


def add_settings(parser: argparse.ArgumentParser, cls, *, groups: Optional[Dict[str, str]] = None,
                 skip: Iterable[str] = (), defaults=None):
    """One flag per field of the dataclass `cls`, in argument groups by the field's `group`
    (`groups` maps a group key to its title); flags default to SUPPRESS, so the parsed namespace
    holds exactly the flags given.  `defaults`: an instance whose values the help shows."""
    made: Dict[str, argparse._ArgumentGroup] = {}
    skip = set(skip)
    for f in fields(cls):
        if f.name in skip:
            continue
        key = f.metadata.get("group", "")
        title = (groups or {}).get(key, key or "options")
        if title not in made:
            made[title] = parser.add_argument_group(title)
        target = made[title]
        if defaults is not None:
            default = getattr(defaults, f.name)
        else:
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        text = f.metadata.get("help", "") + _default_text(f, default)
        t, _ = base_type(cls, f)
        flag = flag_of(f)
        if t is bool:
            target.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=text)
        elif typing.get_origin(t) in (tuple, list):  # space- or comma-separated; converted by given()
            target.add_argument(flag, dest=f.name, nargs="+", help=text, metavar=f.name.upper())
        else:
            conv = {int: integer, float: number}.get(t, str)
            choices = f.metadata.get("choices")
            metavar = "{" + ",".join(map(str, choices)) + "}" if choices else f.name.upper()
            target.add_argument(flag, dest=f.name, type=conv, help=text, metavar=metavar)


def formatter(prog):
    """Help wide enough that "(default: X)" stays on one line."""
    return argparse.HelpFormatter(prog, width=110, max_help_position=36)


def given(ns: argparse.Namespace, cls) -> dict:
    """The values of `cls`'s fields that the command line gave (flags default to SUPPRESS); list
    flags take space- or comma-separated items ("--eps 0.25,0.5 1"), each converted to the item type."""
    out = {}
    for f in fields(cls):
        if f.name not in vars(ns):
            continue
        v = getattr(ns, f.name)
        t, _ = base_type(cls, f)
        if typing.get_origin(t) in (tuple, list):
            (item,) = set(typing.get_args(t)) - {Ellipsis}
            conv = {int: integer, float: number}.get(item, str)
            parts = [p.strip() for tok in v for p in str(tok).split(",") if p.strip()]
            try:
                v = tuple(conv(p) for p in parts)
            except argparse.ArgumentTypeError as exc:
                raise UserError(f"{flag_of(f)}: {exc}") from None
        out[f.name] = v
    return out


def run_cli(fn: Callable, argv=None):
    """fn(argv); a UserError becomes 'error: <message>' on stderr (once, by rank 0 under torchrun)
    and exit status 2, no traceback."""
    try:
        return fn(argv)
    except UserError as exc:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)


def stderr_log(msg: str):
    print(msg, file=sys.stderr, flush=True)
