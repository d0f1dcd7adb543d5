"""The command line is a front end of the Python API: its modules import nothing below the
API except what its flags are made of, and `bnlab --help` loads no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "bnlab" / "cli"
# what the command line may import from bnlab: the API, what its flags are made of, its errors,
# and the machine's facts (torch-free) it reads before torch loads
ALLOWED = {"bnlab", "bnlab.api", "bnlab.cli", "bnlab.config", "bnlab.console", "bnlab.errors",
           "bnlab.machine", "bnlab.study.options"}


def bnlab_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a bnlab module in `path`, function-local ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            if node.module == "bnlab":  # `from bnlab import api`: the names are modules
                found += [(node.lineno, f"bnlab.{a.name}") for a in node.names
                          if a.name not in ("__version__",)]
    return [(n, m) for n, m in found if m == "bnlab" or m.startswith("bnlab.")]


def allowed(module: str) -> bool:
    return any(module == a or (a != "bnlab" and module.startswith(a + "."))
               for a in ALLOWED)


def test_cli_imports_only_the_api_and_what_its_flags_are_made_of():
    files = sorted(CLI.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "parser.py", "commands.py"}
    bad = [f"{f.name}:{n} imports {m}" for f in files for n, m in bnlab_imports(f)
           if not allowed(m)]
    assert bad == []


def test_the_check_sees_an_import_below_the_api(tmp_path):
    """The checker itself: a function-local import of bnlab.train is found and refused."""
    f = tmp_path / "x.py"
    f.write_text("def cmd(args):\n    from bnlab.train import train_run\n"
                 "    from bnlab import api, models\n")
    found = bnlab_imports(f)
    assert (2, "bnlab.train") in found and (3, "bnlab.models") in found
    assert not allowed("bnlab.train") and not allowed("bnlab.models")
    assert allowed("bnlab.api") and allowed("bnlab.api.inference")


def test_commands_call_the_api():
    """Every cmd_* reaches the API (and only through it does work)."""
    tree = ast.parse((CLI / "commands.py").read_text())
    cmds = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("cmd_")]
    assert len(cmds) == 10
    for fn in cmds:
        names = {n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute)
                 and isinstance(n.value, ast.Name) and n.value.id == "api"}
        assert names, fn.name


def test_help_loads_no_torch():
    code = ("import sys\nfrom bnlab.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['study', 'run', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, 'torch loaded'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                          timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
