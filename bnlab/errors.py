"""The one exception type for mistakes a user can make.

The command line turns a UserError into a single line on stderr and exit code 2; everything else
is a bug or an environment failure and keeps its traceback.
"""

from __future__ import annotations

import difflib


class UserError(Exception):
    """A bad value supplied by the user: the message names it and says what is accepted."""


def suggest(value: str, choices) -> str:
    """' (did you mean X?)' for the closest valid choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown(kind: str, value, choices) -> UserError:
    choices = sorted(str(c) for c in choices)
    return UserError(
        f"unknown {kind} {value!r}{suggest(value, choices)}; accepted: {', '.join(choices)}"
    )
