#!/usr/bin/env bash
# Speed check on one NVIDIA GPU (H100/H200), run from the repository root without installing:
#
#   PYTHONPATH=. bash benchmarks/gpu_check.sh .gpu/cifar10-jpg.tar.gz
#
# $1: the CIFAR-10 JPEG tarball (ImageNet folder layout), copied into an ignored folder of the
# tree. Prints every figure and writes them under $OUT (default .gpu/out). Each step has its
# own time box, so the whole script ends within about 8 minutes even when a step hangs.
# For a dry run of the same code paths on a CPU (tiny sizes):
#   DEVICE=cpu STEPS=2 K=2 EPOCHS=2 LIMIT=256 COMPILE=false VARIANTS128=textbook,eager,packed \
#   VARIANTS512=textbook PYTHONPATH=. bash benchmarks/gpu_check.sh ../shared/data/cifar10-jpg.tar.gz
set -u
DATA=${1:?usage: PYTHONPATH=. bash benchmarks/gpu_check.sh PATH/TO/cifar10-jpg.tar.gz}
[ -f "$DATA" ] || { echo "gpu_check: $DATA is not a file" >&2; exit 2; }
OUT=${OUT:-.gpu/out}
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
export BNLAB_CACHE=${BNLAB_CACHE:-$PWD/.gpu/cache}
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-100}
K=${K:-16}
EPOCHS=${EPOCHS:-30}
LIMIT=${LIMIT:-0}
# the study's packs run eager by default: compiling a pack of 12 costs minutes of the 3-minute
# budget on a cold cache (COMPILE=true to measure that instead)
COMPILE=${COMPILE:-false}
VARIANTS128=${VARIANTS128:-textbook,eager,compiled,packed,packed-compiled}
VARIANTS512=${VARIANTS512:-textbook,compiled}
START=$(date +%s)
say() { echo "[gpu_check +$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/log.txt"; }

say "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch, bnlab; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None, 'bnlab', bnlab.__version__)" 2>&1 | tee -a "$OUT/gpu.txt"

say "1/4 extract and decode CIFAR-10 once (cached in $BNLAB_CACHE)"
timeout 45 $PY -c "
import time; t = time.time()
from bnlab.data import load_data
b = load_data('imagefolder:$DATA')
print('train', len(b.train), 'test', len(b.test), 'classes', len(b.classes), f'{time.time() - t:.1f} s')
" 2>&1 | tail -3 | tee "$OUT/data.txt"

say "2/4 bnlab bench, batch 128, bf16, packed x16"
timeout 190 $PY -m bnlab bench --data "imagefolder:$DATA" --device "$DEVICE" --precision bf16 \
  --batch-size 128 --steps "$STEPS" --k "$K" --timeout 100 \
  --variants "$VARIANTS128" --out "$OUT/bench_b128.jsonl"

say "3/4 bnlab bench, batch 512, bf16"
timeout 95 $PY -m bnlab bench --data "imagefolder:$DATA" --device "$DEVICE" --precision bf16 \
  --batch-size 512 --steps $(( (STEPS + 1) / 2 )) --timeout 85 --variants "$VARIANTS512" \
  --out "$OUT/bench_b512.jsonl"

say "4/4 seed study, CIFAR-10 part, $EPOCHS epochs (BN vs none x 3 seeds, batch 128)"
T0=$(date +%s)
if $PY -c "import bnlab.study" 2>/dev/null && [ -f bnlab/studies/seed.toml ]; then
  timeout 160 $PY -m bnlab study run seed --only dataset=cifar10 \
    --data-map "cifar10=imagefolder:$DATA" --set "epochs=$EPOCHS" --set precision=bf16 \
    --set "compile=$COMPILE" --set "limit_train=$LIMIT" --device "$DEVICE" \
    --out "$OUT/seed-study" 2>&1 | tail -20
  STUDY_OUT="$OUT/seed-study"
else
  # no study runner in this tree: the same six runs, packed by norm (3 seeds each)
  timeout 160 $PY -c "
import dataclasses, statistics, time
from bnlab.config import RunConfig
from bnlab.packed import train_packed
base = RunConfig(dataset='imagefolder:$DATA', model='resnet20', batch_size=128, epochs=$EPOCHS,
                 precision='bf16', compile='$COMPILE' == 'true', device='$DEVICE',
                 limit_train=$LIMIT)
for norm in ('bn', 'none'):
    t = time.time()
    cfgs = [dataclasses.replace(base, norm=norm, seed=s) for s in range(3)]
    rows = train_packed(cfgs, '$OUT/seed-study', log=lambda s: None)
    accs = [r['test_acc'] for r in rows]
    print(f'norm={norm}: status {[r[\"status\"] for r in rows]} test_acc {accs} mean '
          f'{statistics.mean(accs):.4f} sd {statistics.stdev(accs):.4f} wall {time.time() - t:.1f} s',
          flush=True)
" 2>&1 | grep -v Warning | tail -6
  STUDY_OUT="$OUT/seed-study"
fi
say "seed study wall time: $(( $(date +%s) - T0 )) s (target <= 180 s)"
$PY -m bnlab runs --out "$STUDY_OUT" 2>&1 | tail -10

say "all figures"
cat "$OUT"/bench_b128.jsonl "$OUT"/bench_b512.jsonl 2>/dev/null | $PY -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    if 'error' in r:
        print(f\"{r['variant']:16s} ERROR {r['error']}\"); continue
    print(f\"{r['variant']:16s} b{r['batch_size']:<4d} {r['precision']} K={r['k']:<3d} \"
          f\"{r['images_per_s']:9.0f} img/s {r['model_images_per_s']:9.0f} model-img/s \"
          f\"x{r.get('ratio_vs_textbook') or 0:.2f} vs textbook  peak {r.get('peak_cuda_mb', 0):.0f} MB\")
" | tee "$OUT/summary.txt"
say "done; targets: compiled b128 >= 45000 img/s, packed x16 >= 200000 model-img/s, study <= 180 s"
