"""The `bnlab` command: parse the flags, call the Python API (bnlab.api), print its answer.

    parser.py     the flags of every command (torch-free: `bnlab --help` answers at once)
    commands.py   one cmd_* per command: arguments in, one API call, text out

The API does the work and every check (a mistake is a bnlab.UserError: one line on stderr,
exit 2). Each command imports the API when it runs: torch takes about 2 s to load, which
`bnlab --help` and a mistyped flag should not pay, and `study run` and `train` must set
OMP_WAIT_POLICY before torch is loaded at all.
"""

from __future__ import annotations

import errno
import os
import sys

from bnlab.cli.commands import cpu_shared as _cpu_shared
from bnlab.cli.commands import run_overrides
from bnlab.cli.parser import build_parser
from bnlab.errors import UserError


def _one_line(e: BaseException) -> str:
    # An error raised in a DataLoader worker comes back with the worker's traceback in its
    # message; its last line is the message that was raised.
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    for prefix in ("bnlab.errors.UserError: ", "bnlab.errors.StorageError: "):
        text = text.removeprefix(prefix)
    return text


# OSErrors that are the file system's answer about a path (full, read-only, no permission, a
# file where a folder should be): the user's to fix, so one line; any other stays a traceback
FILE_SYSTEM_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                      errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG,
                      errno.ENOENT}


def _quiet_stdout() -> None:
    """After a broken pipe (`bnlab norms --table | head -1`), send what is left of stdout to
    /dev/null, so Python's flush at exit does not report the pipe a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed
        return e.code if isinstance(e.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except UserError as e:
        sys.stderr.write(f"bnlab: error: {_one_line(e)}\n")
        return 2
    except BrokenPipeError:  # the reader went away: nothing left to say, to no one
        _quiet_stdout()
        return 141  # 128 + SIGPIPE, what a program killed by the broken pipe returns
    except OSError as e:
        if e.errno not in FILE_SYSTEM_ERRNOS or e.filename is None:
            raise
        sys.stderr.write(f"bnlab: error: cannot use {str(e.filename)!r}: {e.strerror}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("bnlab: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["_cpu_shared", "build_parser", "main", "run_overrides"]
