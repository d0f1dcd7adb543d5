"""A user's own Python function named as MODULE:FUNCTION: where its source is, a hash of that
source, and the function itself.

MODULE is a dotted module name, imported as `python -c "import MODULE"` would from the current
folder, or a path/to/file.py, imported as `python path/to/file.py` would run it (its folder first
on sys.path while it is imported and its function called, so that it imports its siblings; the
file is registered in sys.modules as `bnlab_user_<stem>`, so a script that names itself runs
its top level again but not its `if __name__ == "__main__":` block).

Only the standard library is used here: run configs (bnlab.config) locate and hash an entry's
source file without importing it; the models and the inference tools import it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from bnlab.errors import UserError

SOURCE_HASH_CHARS = 16  # hex digits of sha256 kept in run configs (64 bits)
ENTRY = "entry:"  # a run's model "entry:MODULE:FUNCTION": the user's own network (docs/models.md)


def first_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its text (at most 200 chars)."""
    if isinstance(e, SystemExit):  # sys.exit(), exit() or quit() in the user's code
        return f"SystemExit (it called exit({'' if e.code is None else repr(e.code)}))"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


# What user code may raise and still be reported in one line: anything, SystemExit (sys.exit,
# exit) included, which would otherwise end bnlab silently with the user's exit code; only
# Ctrl-C (KeyboardInterrupt) goes on as the user's wish to stop
def user_failure(e: BaseException) -> bool:
    return not isinstance(e, KeyboardInterrupt)


def split_entry(entry: str, label: str, example: str = "make_net") -> tuple[str, str]:
    """(MODULE, FUNCTION) of "MODULE:FUNCTION"; `label` names the value in errors."""
    module, sep, name = entry.rpartition(":")
    if not sep or not module or not name.isidentifier():
        raise UserError(f"{label} is not MODULE:FUNCTION (e.g. mypackage.models:{example} or "
                        f"path/to/file.py:{example})")
    return module, name


def _on_path_of_cwd() -> None:
    if os.getcwd() not in sys.path:  # as `python -c "import MODULE"` would find it
        sys.path.insert(0, os.getcwd())


def source_file(module: str, label: str) -> Path:
    """The file that holds MODULE's source, found without running it (a dotted name's parent
    packages are imported, as Python's own finder does)."""
    if module.endswith(".py"):
        path = Path(module)
        if not path.is_file():
            raise UserError(f"{label}: file {module!r} does not exist")
        return path.resolve()
    _on_path_of_cwd()
    try:
        spec = importlib.util.find_spec(module)
    except BaseException as e:  # a parent package that fails to import, or exits
        if not user_failure(e):
            raise
        raise UserError(f"{label}: cannot import module {module!r}: {first_line(e)}") from None
    if spec is None:
        raise UserError(f"{label}: cannot import module {module!r}: no module of that name "
                        f"on the Python path (the current folder included)")
    if not spec.origin or not Path(spec.origin).is_file():
        raise UserError(f"{label}: module {module!r} has no source file (built in, or a "
                        "namespace package) whose hash could identify the runs")
    return Path(spec.origin).resolve()


def source_hash(path: Path) -> str:
    """The first SOURCE_HASH_CHARS hex digits of the sha256 of the file's bytes."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {str(path)!r}: {e.strerror or type(e).__name__}") from None
    return hashlib.sha256(data).hexdigest()[:SOURCE_HASH_CHARS]


@contextmanager
def script_folder(module: str):
    """For path/to/file.py: its folder first on sys.path while the file is imported and its
    function called; sys.path is restored afterwards."""
    folder = str(Path(module).resolve().parent) if module.endswith(".py") else None
    if folder is None or folder in sys.path:
        yield
        return
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        if folder in sys.path:
            sys.path.remove(folder)


def import_module(module: str, label: str):
    """MODULE imported (a .py file executed afresh, so that an edited file is what runs)."""
    if module.endswith(".py"):
        path = Path(module)
        if not path.is_file():
            raise UserError(f"{label}: file {module!r} does not exist")
        name = f"bnlab_user_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        # registered before it runs, as an import would: dataclasses and typing resolve the
        # module's names through sys.modules[cls.__module__]
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException as e:  # anything the user's file raises, exit included
            sys.modules.pop(name, None)
            if not user_failure(e):
                raise
            raise UserError(f"{label}: importing {module!r} raised {first_line(e)}") from None
        return mod
    _on_path_of_cwd()
    try:
        return importlib.import_module(module)
    except BaseException as e:  # ImportError or whatever the module raises, exit included
        if not user_failure(e):
            raise
        raise UserError(f"{label}: cannot import module {module!r}: {first_line(e)}") from None


def load_function(module: str, name: str, label: str) -> Callable:
    """The callable `name` of `module` (call it inside script_folder(module))."""
    fn = getattr(import_module(module, label), name, None)
    if fn is None:
        raise UserError(f"{label}: module {module!r} has no attribute {name!r}")
    if not callable(fn):
        raise UserError(f"{label}: {name!r} is a {type(fn).__name__}, not a function")
    return fn


def split_model_entry(model: str) -> tuple[str, str]:
    """(MODULE, FUNCTION) of a model "entry:MODULE:FUNCTION"; MODULE a dotted name or a .py file."""
    module, sep, name = model.removeprefix(ENTRY).rpartition(":")
    if not model.startswith(ENTRY) or not sep or not module or not name.isidentifier():
        raise UserError(f"model {model!r} is not entry:MODULE:FUNCTION (e.g. "
                        "entry:mypackage.nets:make_net or entry:path/to/file.py:make_net)")
    return module, name


def model_tag(model: str) -> str:
    """The model's part of a run id: its name (a colon, which is no path character, as '-'),
    or for an entry: model `entry-<module's last part>.<function>`."""
    if not model.startswith(ENTRY):
        return model.replace(":", "-")  # torchvision:NAME
    module, name = split_model_entry(model)
    short = Path(module).stem if module.endswith(".py") else module.rsplit(".", 1)[-1]
    return f"entry-{short}.{name}"


# options of bnlab's own models, and why an entry: model takes none of them
NOT_FOR_ENTRIES = {
    "placement": "puts its norm layers where its function calls norm(channels)",
    "first_k": "puts its norm layers where its function calls norm(channels)",
    "init": "keeps the initialization its function gives it (init is not applied to it)",
    "init_options": "keeps the initialization its function gives it (init is not applied to it)",
    "dropout": "adds any dropout itself",
}


def resolve_entry(model: str, model_source: str,
                  options: dict[str, tuple[object, object]]) -> tuple[str, str]:
    """(model, model_source) of a run config's entry: model: a .py path made absolute (ids then
    do not depend on the working folder), the source hash computed from the file where not
    given (a stored config keeps the hash it was made with). `options` maps each key of
    NOT_FOR_ENTRIES to (its value, its default): a value other than the default is refused."""
    module, name = split_model_entry(model)
    for key, (value, default) in options.items():
        if value != default:
            raise UserError(f"{key} {value!r} applies to bnlab's own models; model {model!r} "
                            f"{NOT_FOR_ENTRIES[key]}: leave {key} at its default {default!r}")
    label = f"model {model!r}"
    if module.endswith(".py"):
        module = str(source_file(module, label))
    if not model_source:
        model_source = source_hash(source_file(module, label))
    elif not re.fullmatch(f"[0-9a-f]{{{SOURCE_HASH_CHARS}}}", model_source):
        raise UserError(f"model_source must be {SOURCE_HASH_CHARS} hex digits (set by bnlab; "
                        f"leave it unset), got {model_source!r}")
    return f"{ENTRY}{module}:{name}", model_source
