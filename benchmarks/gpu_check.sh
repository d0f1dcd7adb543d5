#!/usr/bin/env bash
# Speed check on one NVIDIA GPU (H100/H200), run from the repository root without installing:
#
#   PYTHONPATH=. bash benchmarks/gpu_check.sh .gpu/cifar10-jpg.tar.gz
#
# $1: the CIFAR-10 JPEG tarball (ImageNet folder layout), copied into an ignored folder of the
# tree. Prints every figure and writes them under $RESULTS (default .gpu/out). The steps run in
# order of importance, each in its own time box cut to what is left of BUDGET seconds (default
# 540), so the script ends in time even when a step hangs:
#   1. decode CIFAR-10 once (cached in $BNLAB_CACHE)
#   2. tests/test_step_graph.py: graphed runs and packs follow the ungraphed ones
#      (pytest from .gpu/pylib when the machine has none: copy site-packages' pytest, _pytest,
#      pluggy, iniconfig, packaging and pygments there)
#   3. bnlab bench at batch 128, bf16: textbook, eager, compiled, packed xK, packed-compiled xK
#   4. BN vs no BN on CIFAR-10 at EPOCHS epochs, batch 128 (benchmarks/seed_cifar10_30.toml):
#      by default BN (lr 0.1) vs none at lr 0.01 x 3 seeds, 6 runs; STUDY_ONLY="" for all 12
#      runs (the no-BN lr sweep)
#   5. bnlab bench --no-cuda-graph: eager and packed without the whole-step graph
#   6. batch 512 (eager, compiled), if time is left
# For a dry run of the same code paths on a CPU (tiny sizes):
#   DEVICE=cpu STEPS=2 K=2 EPOCHS=2 LIMIT=256 VARIANTS128=textbook,eager,packed EXTRA=0 \
#   PYTHONPATH=. bash benchmarks/gpu_check.sh ../shared/data/cifar10-jpg.tar.gz
set -u
DATA=${1:?usage: PYTHONPATH=. bash benchmarks/gpu_check.sh PATH/TO/cifar10-jpg.tar.gz}
[ -f "$DATA" ] || { echo "gpu_check: $DATA is not a file" >&2; exit 2; }
RESULTS=${RESULTS:-.gpu/out}
mkdir -p "$RESULTS"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
export BNLAB_CACHE=${BNLAB_CACHE:-$PWD/.gpu/cache}
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-100}
K=${K:-16}
EPOCHS=${EPOCHS:-30}
LIMIT=${LIMIT:-0}
BUDGET=${BUDGET:-540}
EXTRA=${EXTRA:-1}
# the study's packs run eager (each step still one CUDA graph): compiling a pack of 12 costs
# minutes of the 3-minute budget on a cold cache (COMPILE=true to measure that instead)
COMPILE=${COMPILE:-false}
VARIANTS128=${VARIANTS128:-textbook,eager,compiled,packed,packed-compiled}
STUDY_ONLY=${STUDY_ONLY---only lr=0.1 --only lr=0.01}
START=$(date +%s)
say() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$RESULTS/log.txt"; }
# box N: N seconds, or what is left of the budget (at least 5)
box() { local left=$(( BUDGET - ($(date +%s) - START) )); [ "$left" -lt "$1" ] && echo $(( left > 5 ? left : 5 )) || echo "$1"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

say "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$RESULTS/gpu.txt"
$PY -c "import sys, torch, bnlab; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None, \
'bnlab', bnlab.__version__)" 2>&1 | tee -a "$RESULTS/gpu.txt"

say "1/6 extract and decode CIFAR-10 once (cached in $BNLAB_CACHE)"
timeout "$(box 60)" $PY -c "
import time; t = time.time()
from bnlab.data import load_data
b = load_data('imagefolder:$DATA')
print('train', len(b.train), 'test', len(b.test), 'classes', len(b.classes), f'{time.time() - t:.1f} s')
" 2>&1 | tail -3 | tee "$RESULTS/data.txt"

say "2/6 whole-step CUDA graphs against the ungraphed loop (tests/test_step_graph.py)"
if ! $PY -c "import pytest" 2>/dev/null; then export PYTHONPATH="$PYTHONPATH:$PWD/.gpu/pylib"; fi
timeout "$(box 120)" $PY -m pytest -q -p no:cacheprovider tests/test_step_graph.py 2>&1 \
  | tail -15 | tee "$RESULTS/step_graph_tests.txt"

say "3/6 bnlab bench, batch 128, bf16, packed x$K"
timeout "$(box 280)" $PY -m bnlab bench --data "imagefolder:$DATA" --device "$DEVICE" \
  --precision bf16 --batch-size 128 --steps "$STEPS" --k "$K" --timeout 110 \
  --variants "$VARIANTS128" --out "$RESULTS/bench_b128.jsonl"

say "4/6 BN vs no BN, CIFAR-10, $EPOCHS epochs, batch 128 (${STUDY_ONLY:-all 12 runs})"
T0=$(date +%s)
# shellcheck disable=SC2086 # STUDY_ONLY is a list of flags
timeout "$(box 230)" $PY -m bnlab study run benchmarks/seed_cifar10_30.toml $STUDY_ONLY \
  --data-map "cifar10=imagefolder:$DATA" --set "epochs=$EPOCHS" --set precision=bf16 \
  --set "compile=$COMPILE" --set "limit_train=$LIMIT" --device "$DEVICE" \
  --out "$RESULTS/seed-study" 2>&1 | grep -v "epoch [0-9]*/" | tail -25
say "BN vs no BN wall time: $(( $(date +%s) - T0 )) s"
$PY -m bnlab runs --out "$RESULTS/seed-study" 2>&1 | tail -16 | tee "$RESULTS/seed_runs.txt"

say "5/6 bnlab bench without the whole-step graph (eager, packed x$K)"
if [ "$(left)" -gt 40 ]; then
  timeout "$(box 90)" $PY -m bnlab bench --data "imagefolder:$DATA" --device "$DEVICE" \
    --precision bf16 --batch-size 128 --steps "$STEPS" --k "$K" --timeout 60 --no-cuda-graph \
    --variants eager,packed --out "$RESULTS/bench_b128_nograph.jsonl"
fi

say "6/6 batch 512 while time is left"
if [ "$EXTRA" = 1 ] && [ "$(left)" -gt 40 ]; then
  timeout "$(box 120)" $PY -m bnlab bench --data "imagefolder:$DATA" --device "$DEVICE" \
    --precision bf16 --batch-size 512 --steps $(( (STEPS + 1) / 2 )) --timeout 80 \
    --variants eager,compiled --out "$RESULTS/bench_b512.jsonl"
fi

say "all figures"
cat "$RESULTS"/bench_*.jsonl 2>/dev/null | $PY -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    if 'error' in r:
        print(f\"{r['variant']:16s} ERROR {r['error']}\"); continue
    print(f\"{r['variant']:16s} b{r['batch_size']:<4d} {r['precision']} K={r['k']:<3d} \"
          f\"graph={r.get('cuda_graph')!s:5s} {r['images_per_s']:9.0f} img/s \"
          f\"{r['model_images_per_s']:9.0f} model-img/s x{r.get('ratio_vs_textbook') or 0:.2f} \"
          f\"vs textbook  peak {r.get('peak_cuda_mb', 0):.0f} MB  acc@2ep \"
          f\"{r.get('test_acc_after_2_epochs')}\")
" | tee "$RESULTS/summary.txt"
say "done; targets: compiled b128 >= 45000 img/s, packed x16 >= 200000 model-img/s, study <= 180 s"
