"""Option values from TOML, flags and JSON checked into their types, each mistake one line:
finite numbers, integers that fit torch's int64, and the option tables of norms and inits
(`check_options`). bnlab.config applies them to the run config's fields."""

from __future__ import annotations

import math
from typing import Any

from bnlab.errors import UserError

INT_MAX = 2**63 - 1  # torch's int64: every integer option must fit


def kind_of(value) -> str:
    name = "boolean" if isinstance(value, bool) else type(value).__name__
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def finite(name: str, value: Any) -> float:
    """`value` as a finite float (an int, a float, or a flag's string; never a boolean)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise UserError(f"{name} must be a number, got {kind_of(value)} ({value!r})")
    try:
        v = float(value)
    except (ValueError, OverflowError):
        raise UserError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise UserError(f"{name} must be a finite number, got {value!r}")
    return v


def integer(name: str, value: Any) -> int:
    """`value` as an int: an integer from TOML or JSON, or a string of digits from a flag; a
    float (1e12, 2.0) is refused rather than truncated or rounded."""
    if isinstance(value, bool | float) or not isinstance(value, int | str):
        raise UserError(f"{name} must be an integer, got {kind_of(value)} ({value!r})")
    try:
        v = int(value)
    except ValueError:
        raise UserError(f"{name} must be an integer, got {value!r}") from None
    if not -INT_MAX <= v <= INT_MAX:
        raise UserError(f"{name} must be an integer of at most 2^63-1 in size, got {v}")
    return v


def option_value(name: str, value: Any) -> Any:
    """A value of --norm-options/--init-options: a boolean, a finite number or a string (what
    each option accepts is checked by `check_options` against its factory's table)."""
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return integer(name, value)
    if isinstance(value, float):
        return finite(name, value)
    raise UserError(f"{name} must be a boolean, a number or a string, got {kind_of(value)} "
                    f"({value!r})")


def check_options(what: str, options: dict, defaults: dict) -> dict:
    """`options` checked against `defaults` (an OPTIONS table of bnlab.norm or bnlab.models.init:
    option -> default): each value must have its default's type (a number where the default is
    a float or None, an integer where it is an int); returns `options`. `what` names them in
    errors ("norm 'bn'"). An unknown option is named before any value is checked (the first
    in sorted order, so the message does not depend on the order options were given in)."""
    bad = sorted(set(options) - set(defaults))
    if bad:
        raise UserError(f"unknown option {bad[0]!r} for {what}; accepted: "
                        f"{', '.join(sorted(defaults)) or 'none'}")
    for key, value in options.items():
        default = defaults[key]
        if isinstance(default, bool):
            ok, want = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif isinstance(default, str):
            ok, want = isinstance(value, str), "a string"
        else:  # float, or None (the layer's own default, a number)
            ok = (isinstance(value, int | float) and not isinstance(value, bool)
                  and math.isfinite(value))
            want = "a finite number"
        if not ok:
            raise UserError(f"{what} option {key} must be {want}, got {value!r}")
    return options
