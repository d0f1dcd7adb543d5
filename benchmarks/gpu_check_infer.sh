#!/usr/bin/env bash
# GPU checks of probes, diagnose and fold. Prints every figure; run from the repository root:
#   bash benchmarks/gpu_check_infer.sh [OUT]      (default OUT: /tmp/bnlab-gpu-infer)
# Uses generated data only (no files needed). About 3-5 minutes on one GPU.
set -euo pipefail
OUT=${1:-/tmp/bnlab-gpu-infer}
PY=${PYTHON:-python}
export PYTHONPATH=${PYTHONPATH:-$PWD}
rm -rf "$OUT"; mkdir -p "$OUT"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.__version__, torch.cuda.get_device_name(0))"

echo "== probe overhead on the GPU (resnet20, batch 128) =="
$PY benchmarks/probe_overhead.py --device cuda --batch 128 --rounds 10

echo "== training runs: bn with probes, bn without, none (synthetic, 2 epochs, cuda) =="
common="--dataset synthetic --model resnet20 --epochs 2 --batch-size 128 --device cuda --out $OUT"
$PY -m bnlab train $common --norm bn --probe-every 4
$PY -m bnlab train $common --norm bn
$PY -m bnlab train $common --norm none --lr 0.01 --warmup-epochs 1
$PY - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
runs = sorted(p for p in Path(sys.argv[1]).iterdir() if (p / "config.json").is_file())
bn = [p for p in runs if json.loads((p / "config.json").read_text())["config"]["norm"] == "bn"]
rows = {p.name: [json.loads(l) for l in (p / "metrics.jsonl").read_text().splitlines()] for p in bn}
keys = ("train_loss", "train_acc", "test_loss", "test_acc")
a, b = rows.values()
diff = max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in keys)
print(f"probes on vs off on cuda: max |metric difference| {diff:.3g} "
      "(cuDNN kernels need not be bitwise deterministic; 0 on the CPU)")
PYEOF

BN=$(ls -d "$OUT"/resnet20-bn-* | head -1)
NONE=$(ls -d "$OUT"/resnet20-none-* | head -1)
echo "== compare =="
$PY -m bnlab compare "$BN" "$NONE" --device cuda --out "$OUT/analysis"
echo "== diagnose (bn) =="
$PY -m bnlab diagnose "$BN" --device cuda
echo "== fold (bn): CPU and CUDA timings =="
$PY -m bnlab fold "$BN" --device cuda --onnx "$OUT/bn.onnx"
