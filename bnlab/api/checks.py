"""The API's argument checks: a wrong type or value is a one-line bnlab.UserError that names
the argument, the value given and what is accepted, before any work starts (the same kind of
line the command prints after `bnlab: error:`)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bnlab.errors import UserError


def shown(value: Any) -> str:
    """A value as an error line shows it: short, one line, with its type when not obvious."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    if isinstance(value, str | int | float | bool | type(None)):
        return text.replace("\n", "\\n")
    return f"{text} (a {type(value).__name__})".replace("\n", "\\n")


def folder(name: str, value: Any, optional: bool = False) -> Path | None:
    """A folder or file path given as str or os.PathLike."""
    if value is None and optional:
        return None
    if isinstance(value, str | os.PathLike) and not isinstance(value, bytes) and str(value):
        return Path(value)
    raise UserError(f"{name} must be a path (str or pathlib.Path), got {shown(value)}")


def text(name: str, value: Any, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if isinstance(value, str) and value:
        return value
    raise UserError(f"{name} must be a non-empty string, got {shown(value)}")


def flag(name: str, value: Any) -> bool:
    """True or False only: "yes", 1 or None would be taken for a truth value silently."""
    if isinstance(value, bool):
        return value
    raise UserError(f"{name} must be True or False, got {shown(value)}")


def integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return value
    raise UserError(f"{name} must be an integer >= {minimum}, got {shown(value)}")


def number(name: str, value: Any, minimum: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) \
            and value == value and value >= minimum and value != float("inf"):
        return float(value)
    raise UserError(f"{name} must be a finite number >= {minimum:g}, got {shown(value)}")


def choice(name: str, value: Any, accepted: Iterable[str]) -> str:
    accepted = tuple(accepted)
    if isinstance(value, str) and value in accepted:
        return value
    raise UserError(f"{name} must be one of {', '.join(accepted)}, got {shown(value)}")


def callable_or_none(name: str, value: Any):
    if value is None or callable(value):
        return value
    raise UserError(f"{name} must be a function of one string (or None), got {shown(value)}")


def positive_ints(name: str, value: Any) -> list[int]:
    """A non-empty list (or tuple) of integers > 0."""
    items = list(value) if isinstance(value, list | tuple) else None
    if not items or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0
                            for b in items):
        raise UserError(f"{name} must be positive integers, got {shown(value)}")
    return items


def strings(name: str, value: Any, optional: bool = True) -> list[str] | None:
    """A list (or tuple) of non-empty strings."""
    if value is None and optional:
        return None
    items = list(value) if isinstance(value, list | tuple) else None
    if items is None or not all(isinstance(s, str) and s for s in items):
        raise UserError(f"{name} must be a list of non-empty strings, got {shown(value)}")
    return items


def assignments(name: str, value: Any, lists: bool = False) -> None:
    """--set / --only from Python: None, a dict {key: value} or "key=value" strings; a dict's
    values must be what a TOML file can hold (for --only also lists of them)."""
    if value is None or isinstance(value, str):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise UserError(f"{name} keys must be option names (strings), got {shown(k)}")
            for x in (v if lists and isinstance(v, list | tuple) else [v]):
                toml_value(f"{name}[{k!r}]", x)
        return
    strings(name, value, optional=False)


def toml_value(where: str, value: Any) -> None:
    """A value a TOML file can hold: str, int, float, bool, lists and tables of them."""
    if isinstance(value, str | int | float | bool):
        return
    if isinstance(value, list | tuple):
        for i, x in enumerate(value):
            toml_value(f"{where}[{i}]", x)
        return
    if isinstance(value, dict):
        for k, x in value.items():
            if not isinstance(k, str):
                raise UserError(f"{where} has the key {shown(k)}; keys are strings")
            toml_value(f"{where}[{k!r}]", x)
        return
    raise UserError(f"{where} must be a string, number, boolean, list or table (as in TOML), "
                    f"got {shown(value)}")


def data_map(value: Any) -> None:
    """--data-map from Python: None, {name: dataset spec} or "name=dataset" strings."""
    if value is None or isinstance(value, str):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not (isinstance(k, str) and k and isinstance(v, str) and v):
                raise UserError(f"data_map maps a dataset name to a dataset spec (both "
                                f"strings, e.g. {{'cifar10': 'imagefolder:PATH'}}), got "
                                f"{shown(k)}: {shown(v)}")
        return
    strings("data_map", value, optional=False)
