#!/usr/bin/env bash
# Create ./.venv with bnlab; `--test` adds the test tools. Safe to run again: it only adds what
# is missing. BNLAB_TORCH overrides the torch/torchvision pair (default: the pair this project
# is tested on).
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
# torch first and pinned: an unpinned torch would pull the newest multi-GB build.
# --no-compile: Python compiles the modules it imports when it first imports them; compiling
# all of torch's files at install time doubled the time of this script (measured).
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q --no-compile $TORCH
.venv/bin/python -m pip install -q --no-compile -e ".$EXTRA"
.venv/bin/python -c "import bnlab, torch; print(f'bnlab {bnlab.__version__}, torch {torch.__version__}')"
