"""What BN changes at inference: prediction comparison, diagnostics, folding, export.

    metrics.py          accuracy, NLL, Brier, ECE, agreement/flips, KL, JS (pure functions)
    corrupt.py          Gaussian noise, blur, contrast, brightness at 5 severities (ImageNet-C)
    loading.py          checkpoint -> model + dataset, predictions
    usermodel.py        a user's own model: entry point + state_dict + dataset
    batchstats.py       norms on batch statistics; PreciseBN (pooled, fvcore); AdaBN
    predictions.py      one model's logits, corruption and AdaBN accuracies, cached per run
    seeds.py            comparisons over seeds: per-arm mean ± sd, between/within-arm pairs
    compare.py          `compare_runs`, `compare_models`: compare.json + figures via the store
    compare_figures.py  reliability, confidence and corruption figures per arm
    compare_text.py     the tables `bnlab compare` prints
    diagnose.py         train vs eval mode, batch-size dependence, PreciseBN, statistics gaps
    diagnose_text.py    the text of `bnlab diagnose` and its answer
    fold.py             conv/linear + BN folding (pure formula + module surgery), parity, speed
    fold_report.py      `bnlab fold`: fold, check, time, export; its text and failure line
    export.py           ONNX export and onnxruntime check (optional extra `onnx`)
"""

from bnlab.infer.compare import compare_models, compare_runs

__all__ = ["compare_models", "compare_runs"]
