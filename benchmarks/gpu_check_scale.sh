#!/usr/bin/env bash
# GPU check of data-parallel training and the ImageNet-style pipeline (about 3 minutes).
#
#   PYTHONPATH=. bash benchmarks/gpu_check_scale.sh PATH_TO_IMAGENETTE   (folder or .tar.gz)
#
# 1. one SyncBatchNorm run through torchrun (1 process: NCCL group, DDP, SyncBN conversion),
# 2. ResNet-18 training images/s on Imagenette at 224 px (bf16, channels_last, DataLoader workers),
# 3. the same model on random GPU tensors (no data loading): the compute-bound ceiling.
# Every figure is printed; the run folders stay in $OUT (or a temporary folder).
set -u
DATA=${1:?usage: gpu_check_scale.sh IMAGENETTE_PATH}
PY=${PYTHON:-python}
OUTDIR=${OUT:-$(mktemp -d)}/gpu_check_scale
export BNLAB_CACHE=${BNLAB_CACHE:-$OUTDIR/cache}
export PYTHONPATH=${PYTHONPATH:-.}
mkdir -p "$OUTDIR"
WORKERS=$(( $(nproc) > 12 ? 12 : $(nproc) ))
echo "== environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda)"
echo "cpus $(nproc), DataLoader workers $WORKERS, data $DATA"

summary() {  # summary and throughput of the single run under $1
  $PY - "$1" <<'PYEOF'
import json, sys, pathlib
for run in sorted(pathlib.Path(sys.argv[1]).glob("*/summary.json")):
    s = json.loads(run.read_text())
    cfg = json.loads((run.parent / "config.json").read_text())
    rows = [json.loads(l) for l in (run.parent / "metrics.jsonl").read_text().splitlines()]
    print(f"  run {s['run_id']}: status {s['status']}, test_acc {s['test_acc']}, "
          f"wall {s['wall_time']:.1f} s")
    print(f"  distributed: {cfg.get('distributed')}")
    for r in rows:
        print(f"  epoch {r['epoch']}: train {r['train_images_per_s']:.0f} img/s, epoch "
              f"{r['epoch_time']:.1f} s, test acc {r['test_acc']:.4f}, "
              f"top-5 {r.get('test_acc5', float('nan')):.4f}")
PYEOF
}

echo "== 1. SyncBN under torchrun (1 process, NCCL)"
timeout 100 $PY -m torch.distributed.run --standalone --nproc-per-node=1 -m bnlab train \
  --dataset "imagefolder:$DATA" --model resnet18 --sync-bn --epochs 1 --batch-size 128 \
  --limit-train 2048 --limit-test 512 --precision bf16 --workers "$WORKERS" \
  --out "$OUTDIR/syncbn"
echo "  exit code $?"
summary "$OUTDIR/syncbn"

echo "== 2. Imagenette ResNet-18 training throughput (2 epochs of 4096 images; epoch 2 is warm)"
timeout 100 $PY -m bnlab train --dataset "imagefolder:$DATA" --model resnet18 --epochs 2 \
  --batch-size 256 --limit-train 4096 --limit-test 1000 --precision bf16 --workers "$WORKERS" \
  --schedule constant --lr 0.1 --out "$OUTDIR/throughput"
echo "  exit code $?"
summary "$OUTDIR/throughput"

echo "== 3. ResNet-18 on GPU-resident random 224 px batches (no data loading)"
timeout 60 $PY - <<'PYEOF'
import time, torch
from bnlab.models import build_model
dev = torch.device("cuda")
for prec in ("bf16", "fp32"):
    torch.manual_seed(0)
    m = build_model("resnet18", 10).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(256, 3, 224, 224, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (256,), device=dev)
    def step():
        with torch.autocast("cuda", torch.bfloat16, enabled=prec == "bf16"):
            loss = torch.nn.functional.cross_entropy(m(x).float(), y)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    for _ in range(5):
        step()
    torch.cuda.synchronize(); t = time.perf_counter(); n = 30
    for _ in range(n):
        step()
    torch.cuda.synchronize(); dt = time.perf_counter() - t
    print(f"  {prec}: {n * 256 / dt:.0f} img/s ({1000 * dt / n:.1f} ms per step of 256)")
PYEOF
echo "== done; run folders in $OUTDIR"
