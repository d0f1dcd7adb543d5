#!/usr/bin/env bash
# The GPU sections of docs/results.md, on one NVIDIA GPU (H100/H200), run from the repository
# root without installing:
#
#   PYTHONPATH=. bash benchmarks/results_gpu.sh .gpu/cifar10-jpg.tar.gz [.gpu/imagenette-subset.tar]
#
# 1. the founding study on CIFAR-10 with the full He et al. recipe: `seed --only dataset=cifar10`
#    (ResNet-20, 164 epochs, 3 seeds: BN; no BN at BN's lr; no BN at its tuned lr; Fixup),
#    every run inside packs (Fixup's scalars and the probed runs included, docs/speed.md),
#    compiled, bf16, one CUDA graph per step; then its report, and the numbers
#    docs/results.md needs printed at the end (the report's tables and findings, wall times,
#    model-images per second).
# 2. only when a second archive is given: the same arms on an ImageNet-style folder
#    (Imagenette) with ResNet-18, EPOCHS_INET epochs (.gpu/imagenette-subset.tar:
#    `python benchmarks/imagenette_subset.py IMAGENETTE.tar.gz .gpu/imagenette-subset.tar`).
# Part 1 alone gets the whole time box, BUDGET seconds (540: one command of 9 minutes, data
# loading and report included); with part 2, part 1 gets SHARE_CIFAR percent of it. A study
# cut off by its box keeps every finished epoch (checkpoints), and calling the script again
# continues it where it stopped. Every run folder, the studies' reports and a log with wall
# times are written under $RESULTS (default .gpu/results), from where the report is made
# again on any machine (`bnlab study report DIR`).
#
# Dry run of the same code path on a CPU (every arm inside packs: `--pack-cpu`; tiny epochs
# and image limits; about a minute on an idle 2-core machine once the archive is decoded):
#   PYTHONPATH=. bash benchmarks/results_gpu.sh --dry-run ../shared/data/cifar10-jpg.tar.gz
# It differs from the GPU call only in device, sizes (batch included), compile (off:
# inductor's CPU compile takes minutes) and precision (auto: fp32 on a CPU without bf16
# instructions); EPOCHS, LIMIT_TRAIN, LIMIT_TEST, BATCH, COMPILE, PRECISION and RESULTS
# override its values.
set -u
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
CIFAR=${1:?usage: results_gpu.sh [--dry-run] CIFAR10_JPG_TARBALL [IMAGENETTE_FOLDER_OR_TAR]}
INET=${2:-}
[ -e "$CIFAR" ] || { echo "results_gpu: $CIFAR does not exist" >&2; exit 2; }
[ -z "$INET" ] || [ -e "$INET" ] || { echo "results_gpu: $INET does not exist" >&2; exit 2; }
if [ "$DRY_RUN" = 1 ]; then
  DEVICE=cpu; EPOCHS=${EPOCHS:-2}; EPOCHS_INET=${EPOCHS_INET:-2}
  LIMIT_TRAIN=${LIMIT_TRAIN:-128}; LIMIT_TEST=${LIMIT_TEST:-64}; IMAGE_SIZE=${IMAGE_SIZE:-32}
  BATCH=${BATCH:-32}  # a probe step costs ~18 passes of one batch: kept small on a CPU
  COMPILE=${COMPILE:-false}; RESULTS=${RESULTS:-/tmp/results-gpu-dry}
  PRECISION=${PRECISION:-auto}  # bf16 where this CPU has it (emulated bf16 is 20x slower)
  BNLAB_CACHE=${BNLAB_CACHE:-$HOME/.cache/bnlab}  # the archive decoded once, as on a GPU box
fi
RESULTS=${RESULTS:-.gpu/results}
mkdir -p "$RESULTS"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
export BNLAB_CACHE=${BNLAB_CACHE:-$PWD/.gpu/cache}
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-540}                 # seconds for the whole call
SHARE_CIFAR=${SHARE_CIFAR:-70}        # percent of the budget for part 1 when part 2 follows
EPOCHS=${EPOCHS:-}                    # empty: the recipe's 164
EPOCHS_INET=${EPOCHS_INET:-16}
PRECISION=${PRECISION:-bf16}
COMPILE=${COMPILE:-true}              # a compiled pack of 16: 221k model-images/s on an H200
REPORT_S=${REPORT_S:-45}              # seconds kept for part 1's status and report
DRY=()
[ -n "${LIMIT_TRAIN:-}" ] && DRY+=(--set "limit_train=$LIMIT_TRAIN")
[ -n "${LIMIT_TEST:-}" ] && DRY+=(--set "limit_test=$LIMIT_TEST")
[ -n "${BATCH:-}" ] && DRY+=(--set "batch_size=$BATCH")
PACK=()
[ "$DEVICE" = cpu ] && PACK+=(--pack-cpu)
START=$(date +%s)
say() { echo "[results_gpu +$(( $(date +%s) - START ))s] $*" | tee -a "$RESULTS/log.txt"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# model-images trained by the runs under $1 (epochs done x training images, every run) and
# per second of $2 seconds
rate() {
  $PY - "$1" "$2" <<'EOF'
import json, sys
from pathlib import Path
images = 0
for cfg in Path(sys.argv[1]).glob("*/config.json"):
    summary = cfg.parent / "summary.json"
    if summary.is_file():
        n = json.loads(cfg.read_text()).get("data", {}).get("n_train") or 0
        images += n * (json.loads(summary.read_text()).get("epochs_done") or 0)
seconds = max(1, int(sys.argv[2]))
print(f"{images:,} model-images trained in {seconds} s: {images / seconds:,.0f} model-images/s "
      "over the whole part (data loading, evaluation and checkpoints included)")
EOF
}

say "device $DEVICE (dry run: $DRY_RUN)"
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$RESULTS/gpu.txt"
fi
$PY -c "import sys, torch, bnlab; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None, \
'bnlab', bnlab.__version__)" 2>&1 | tee -a "$RESULTS/gpu.txt"

SHARE=100
[ -n "$INET" ] && SHARE=$SHARE_CIFAR
BOX=$(( $(left) * SHARE / 100 - REPORT_S ))
say "1/2 seed, CIFAR-10, full recipe (box $BOX s for training)"
T0=$(date +%s)
CIFAR_SET=(--set "precision=$PRECISION" --set "compile=$COMPILE")
[ -n "$EPOCHS" ] && CIFAR_SET+=(--set "epochs=$EPOCHS")
timeout -s INT "$BOX" $PY -m bnlab study run seed \
  --only dataset=cifar10 --data-map "cifar10=imagefolder:$CIFAR" --device "$DEVICE" \
  "${CIFAR_SET[@]}" "${DRY[@]}" "${PACK[@]}" --out "$RESULTS/seed-cifar10" 2>&1 \
  | grep -v -i warn | tail -25
T1=$(date +%s)
say "1/2 training wall time $(( T1 - T0 )) s"
rate "$RESULTS/seed-cifar10" "$(( T1 - T0 ))" | tee -a "$RESULTS/log.txt"
$PY -m bnlab study status "$RESULTS/seed-cifar10" 2>&1 | tail -30 | tee -a "$RESULTS/log.txt"
$PY -m bnlab study report "$RESULTS/seed-cifar10" 2>&1 | tail -2
say "1/2 wall time with status and report $(( $(date +%s) - T0 )) s"
REPORT="$RESULTS/seed-cifar10/report/report.md"
if [ -f "$REPORT" ]; then  # what docs/results.md takes: the tables and findings
  echo "---- $REPORT: results and findings ----"
  awk '/^## Results/{p=1} /^## Training curves/{p=0} p' "$REPORT"
fi

if [ -n "$INET" ]; then
  say "2/2 seed arms on Imagenette, ResNet-18, $EPOCHS_INET epochs (box $(left) s)"
  T0=$(date +%s)
  INET_SET=(--set "precision=$PRECISION" --set model=resnet18 --set "epochs=$EPOCHS_INET")
  [ -n "${IMAGE_SIZE:-}" ] && INET_SET+=(--set "image_size=$IMAGE_SIZE")
  timeout -s INT "$(( $(left) > 10 ? $(left) - 10 : 1 ))" $PY -m bnlab study run seed \
    --only dataset=imagenet --data-map "imagenet=imagefolder:$INET" --device "$DEVICE" \
    "${INET_SET[@]}" "${DRY[@]}" --out "$RESULTS/seed-imagenette" 2>&1 | grep -v -i warn | tail -25
  say "2/2 wall time $(( $(date +%s) - T0 )) s"
  $PY -m bnlab study status "$RESULTS/seed-imagenette" 2>&1 | tail -30 | tee -a "$RESULTS/log.txt"
  $PY -m bnlab study report "$RESULTS/seed-imagenette" 2>&1 | tail -2
fi
say "done"
