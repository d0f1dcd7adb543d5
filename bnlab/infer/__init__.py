"""What BN changes at inference: prediction comparison, diagnostics, folding, export.

    metrics.py   accuracy, NLL, Brier, ECE, agreement/flips, KL, JS (pure functions)
    corrupt.py   Gaussian noise, blur, contrast, brightness at 5 severities (ImageNet-C style)
    loading.py   checkpoint -> model + dataset, predictions
    compare.py   `compare_runs`: compare.json + figures through the store
    diagnose.py  train vs eval mode, batch-size dependence, PreciseBN, running-stat checks
    fold.py      conv/linear + BN folding (pure formula + module surgery), parity, speed
    export.py    ONNX export and onnxruntime check (optional extra `onnx`)
"""

from bnlab.infer.compare import compare_runs

__all__ = ["compare_runs"]
