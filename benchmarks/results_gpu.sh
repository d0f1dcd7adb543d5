#!/usr/bin/env bash
# The GPU sections of docs/results.md, on one NVIDIA GPU (H100/H200), run from the repository
# root without installing:
#
#   PYTHONPATH=. bash benchmarks/results_gpu.sh .gpu/cifar10-jpg.tar.gz .gpu/imagenette-subset.tar
#
# (.gpu/imagenette-subset.tar: `python benchmarks/imagenette_subset.py IMAGENETTE.tar.gz
# .gpu/imagenette-subset.tar`, 250 training and 80 validation images per class, 35 MiB, so that
# both archives fit a 64 MiB carry; on a machine that has the whole Imagenette, pass it instead.)
#
# 1. the founding study on CIFAR-10 with the full He et al. recipe: `seed --only dataset=cifar10`
#    (ResNet-20, 164 epochs, 3 seeds: BN; no BN at BN's lr; no BN at its tuned lr; Fixup)
# 2. the same arms on an ImageNet-style folder (Imagenette) with ResNet-18, EPOCHS_INET epochs
# Each part runs under its own time box (what is left of BUDGET seconds): a study cut off by its
# box keeps every finished epoch (checkpoints), and calling the script again continues it where
# it stopped, so the sections can be completed over several calls. Every run folder, the
# studies' reports and a log with wall times are written under $RESULTS (default .gpu/results),
# from where the report is made again on any machine (`bnlab study report DIR`).
#
# Dry run of the same code paths on a CPU (tiny sizes, minutes; at least 2 epochs, because the
# tuned arm's selection trains a 2-epoch warm-up):
#   DEVICE=cpu EPOCHS=2 EPOCHS_INET=2 LIMIT_TRAIN=512 LIMIT_TEST=256 IMAGE_SIZE=32 \
#   RESULTS=/tmp/results-dry PYTHONPATH=. bash benchmarks/results_gpu.sh \
#     ../shared/data/cifar10-jpg.tar.gz ../shared/data/imagenette2-224.tar.gz
set -u
CIFAR=${1:?usage: results_gpu.sh CIFAR10_JPG_TARBALL IMAGENETTE_FOLDER_OR_TAR}
INET=${2:?usage: results_gpu.sh CIFAR10_JPG_TARBALL IMAGENETTE_FOLDER_OR_TAR}
[ -e "$CIFAR" ] || { echo "results_gpu: $CIFAR does not exist" >&2; exit 2; }
[ -e "$INET" ] || { echo "results_gpu: $INET does not exist" >&2; exit 2; }
RESULTS=${RESULTS:-.gpu/results}
mkdir -p "$RESULTS"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
export BNLAB_CACHE=${BNLAB_CACHE:-$PWD/.gpu/cache}
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-560}                 # seconds for the whole call
SHARE_CIFAR=${SHARE_CIFAR:-70}        # percent of the budget for part 1 while part 2 waits
EPOCHS=${EPOCHS:-}                    # empty: the recipe's 164
EPOCHS_INET=${EPOCHS_INET:-16}
PRECISION=${PRECISION:-bf16}
DRY=()
[ -n "${LIMIT_TRAIN:-}" ] && DRY+=(--set "limit_train=$LIMIT_TRAIN")
[ -n "${LIMIT_TEST:-}" ] && DRY+=(--set "limit_test=$LIMIT_TEST")
START=$(date +%s)
say() { echo "[results_gpu +$(( $(date +%s) - START ))s] $*" | tee -a "$RESULTS/log.txt"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

say "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$RESULTS/gpu.txt"
$PY -c "import sys, torch, bnlab; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None, \
'bnlab', bnlab.__version__)" 2>&1 | tee -a "$RESULTS/gpu.txt"
$PY -m bnlab study list 2>&1 | grep -E "^(study|seed) " | tee -a "$RESULTS/log.txt"

say "1/2 seed, CIFAR-10, full recipe (box $(( $(left) * SHARE_CIFAR / 100 )) s)"
T0=$(date +%s)
CIFAR_SET=(--set "precision=$PRECISION")
[ -n "$EPOCHS" ] && CIFAR_SET+=(--set "epochs=$EPOCHS")
timeout -s INT "$(( $(left) * SHARE_CIFAR / 100 ))" $PY -m bnlab study run seed \
  --only dataset=cifar10 --data-map "cifar10=imagefolder:$CIFAR" --device "$DEVICE" \
  "${CIFAR_SET[@]}" "${DRY[@]}" --out "$RESULTS/seed-cifar10" 2>&1 | grep -v -i warn | tail -25
say "1/2 wall time $(( $(date +%s) - T0 )) s"
$PY -m bnlab study status "$RESULTS/seed-cifar10" 2>&1 | tail -30 | tee -a "$RESULTS/log.txt"
$PY -m bnlab study report "$RESULTS/seed-cifar10" 2>&1 | tail -2

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
say "done"
