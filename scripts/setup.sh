#!/usr/bin/env bash
# Create ./.venv with bnlab and its test tools. Safe to run again: it only adds what is missing.
# BNLAB_TORCH overrides the torch/torchvision pair (default: the pair this project is tested on).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=${BNLAB_TORCH:-"torch==2.14.1 torchvision==0.29.1"}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first and pinned: an unpinned torch would pull the newest multi-GB build.
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q $TORCH
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -c "import bnlab, torch; print(f'bnlab {bnlab.__version__}, torch {torch.__version__}')"
