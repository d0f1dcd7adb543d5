#!/usr/bin/env bash
# Create ./.venv with bnlab; `--test` adds the test tools. Safe to run again: it only adds what
# is missing. BNLAB_TORCH overrides the torch/torchvision pair (default: the pair this project
# is tested on). BNLAB_INSTALLER=pip skips uv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${BNLAB_TORCH:-"torch==2.14.1 torchvision==0.29.1"}
EXTRA=""
for arg in "$@"; do
  case "$arg" in
    --test) EXTRA="[test]" ;;
    *) echo "setup.sh: unknown option $arg (accepted: --test)" >&2; exit 2 ;;
  esac
done
[ -x .venv/bin/python ] || "$PY" -m venv .venv

# pip, the fallback. --no-compile: Python compiles the modules it imports when it first imports
# them; compiling all of torch's files at install time doubled the time of this script.
pip_install() { .venv/bin/python -m pip install -q --no-compile "$@"; }

# uv installs the same packages from the same indexes in less than half pip's time: torch's
# build with its CUDA libraries is about 5 GB unpacked (measured on a 2-core machine: 23 s
# against 51 s). It reads pip's configuration (indexes, find-links, constraints) from here.
uv_flags() {
  .venv/bin/python - <<'EOF'
import shlex, subprocess, sys
listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                         text=True).stdout
flags = {"index-url": "--index-url", "extra-index-url": "--extra-index-url",
         "find-links": "--find-links", "constraint": "--constraint"}
out, seen = [], set()
for line in listing.splitlines():
    key, _, value = line.partition("=")
    flag = flags.get(key.rsplit(".", 1)[-1])
    for v in (shlex.split(value) or [""])[0].split() if flag else ():
        if (flag, v) not in seen:
            seen.add((flag, v))
            out += [flag, v]
print(shlex.join(out))
EOF
}
INSTALL=pip_install
if [ "${BNLAB_INSTALLER:-uv}" = uv ] && { [ -x .venv/bin/uv ] || pip_install uv >/dev/null 2>&1; }; then
  FLAGS=$(uv_flags)
  uv_install() {
    # shellcheck disable=SC2086
    .venv/bin/uv pip install -q --python .venv/bin/python $FLAGS "$@" || pip_install "$@"
  }
  INSTALL=uv_install
fi

# torch first and pinned: an unpinned torch would pull the newest multi-GB build.
# shellcheck disable=SC2086
$INSTALL $TORCH
$INSTALL -e ".$EXTRA"

# Where Python may not write bytecode (PYTHONDONTWRITEBYTECODE set, as on some CI machines),
# every process compiles the modules it imports from source again: half of each torch import
# on a 2-core CPU (4.7 s against 2.2 s). Write the bytecode of what bnlab imports once, here
# (a few seconds: the modules of one import pass, not all of torch's files).
WARM="import torch, torch._dynamo, torchvision, matplotlib.pyplot, scipy.stats
import bnlab.api, bnlab.report, bnlab.report.analysis, bnlab.study.executors, bnlab.train.loop"
[ -z "$EXTRA" ] || WARM="$WARM
import pytest, hypothesis"
PYTHONDONTWRITEBYTECODE= .venv/bin/python -c "$WARM"
.venv/bin/python -c "import bnlab, torch; print(f'bnlab {bnlab.__version__}, torch {torch.__version__}')"
