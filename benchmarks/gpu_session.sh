#!/usr/bin/env bash
# Every GPU figure of bnlab in one time-boxed pass (about 9 minutes at most), run from the tree:
#
#   PYTHONPATH=. bash benchmarks/gpu_session.sh CIFAR10_JPG_TARBALL IMAGENETTE_FOLDER_OR_TAR
#
# 1. bnlab bench at batch 128 (textbook, eager, compiled, packed x16), bf16
# 2. BN vs no BN on CIFAR-10 at 30 epochs (benchmarks/seed_cifar10_30.toml), wall time
# 3. one SyncBN run under torchrun, and ResNet-18 images/s on Imagenette at 224 px
set -u
CIFAR=${1:?usage: gpu_session.sh CIFAR10_JPG_TARBALL IMAGENETTE}
INET=${2:?usage: gpu_session.sh CIFAR10_JPG_TARBALL IMAGENETTE}
OUT=${OUT:-.gpu/out}
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" BNLAB_CACHE=${BNLAB_CACHE:-/tmp/bnlab-cache}
PY=${PYTHON:-python}
START=$(date +%s)
say() { echo "[+$(( $(date +%s) - START ))s] $*"; }
say "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
say "decode CIFAR-10 once"
timeout 90 $PY -c "from bnlab.data import load_data; b = load_data('imagefolder:$CIFAR'); print(len(b.train), len(b.test))"
say "bench, batch 128, bf16"
timeout 240 $PY -m bnlab bench --data "imagefolder:$CIFAR" --device cuda --precision bf16 \
  --batch-size 128 --steps 60 --k 16 --timeout 75 --variants textbook,eager,compiled,packed \
  --out "$OUT/bench_b128.jsonl" 2>&1 | grep -v -i warn | tail -8
say "BN vs no BN on CIFAR-10, 30 epochs (benchmarks/seed_cifar10_30.toml, 12 runs)"
T0=$(date +%s)
timeout 180 $PY -m bnlab study run benchmarks/seed_cifar10_30.toml --data-map "cifar10=imagefolder:$CIFAR" \
  --set epochs=30 --set precision=bf16 --device cuda --out "$OUT/seed30" 2>&1 | grep -v -i warn | tail -12
say "BN vs no BN wall time $(( $(date +%s) - T0 )) s"
timeout 20 $PY -m bnlab study status "$OUT/seed30" 2>&1 | tail -12
say "SyncBN under torchrun (1 process)"
timeout 75 $PY -m torch.distributed.run --standalone --nproc-per-node=1 -m bnlab train \
  --dataset "imagefolder:$INET" --model resnet18 --sync-bn --epochs 1 --batch-size 128 \
  --precision bf16 --workers 12 --out "$OUT/syncbn" 2>&1 | grep -v -i warn | tail -4
say "Imagenette ResNet-18 throughput (2 epochs of the subset; epoch 2 is warm)"
timeout 75 $PY -m bnlab train --dataset "imagefolder:$INET" --model resnet18 --epochs 2 \
  --batch-size 256 --precision bf16 --workers 12 --schedule constant --out "$OUT/inet" 2>&1 \
  | grep -v -i warn | tail -4
say "done"
