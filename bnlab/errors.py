"""The exception types for what a user can fix: a bad value (UserError), a file-system fault
at a path (StorageError) and a run folder trained on other data (DataMismatch), both kinds of
UserError.

The command line turns a UserError into a single line on stderr and exit code 2; everything else
is a bug or an environment failure and keeps its traceback.
"""

from __future__ import annotations

import difflib
import errno


class UserError(Exception):
    """A bad value supplied by the user: the message names it and says what is accepted."""


class StorageError(UserError):
    """A file-system fault at a path bnlab reads or writes: disk full, read-only, no
    permission, a file where a folder should be. Not a fault of one run: a study stops on it
    (the next run would meet the same disk) instead of recording runs as failed."""


class DataMismatch(UserError):
    """A run folder holds a run trained on other data than the data read now under the same
    dataset name. Not a fault of one run either: a study stops on it (its other runs read the
    same data) instead of recording the run as failed."""


_HINTS = {
    errno.ENOSPC: "free some space and run the command again (a run resumes from its last "
                  "epoch)",
    errno.EDQUOT: "free some space and run the command again (a run resumes from its last "
                  "epoch)",
}


def storage_error(path, e: OSError, doing: str = "write") -> StorageError:
    """The one-line error for an OSError met while `doing` something with `path`."""
    cause = e.strerror or type(e).__name__
    hint = _HINTS.get(e.errno)
    return StorageError(f"cannot {doing} {str(path)!r}: {cause}" + (f" ({hint})" if hint
                                                                     else ""))


def suggest(value: str, choices) -> str:
    """' (did you mean X?)' for the closest valid choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown(kind: str, value, choices) -> UserError:
    choices = sorted(str(c) for c in choices)
    return UserError(
        f"unknown {kind} {value!r}{suggest(value, choices)}; accepted: {', '.join(choices)}"
    )
