"""The text of `bnlab diagnose`: its tables, and the answer built from the measured numbers.

The answer compares eval-mode accuracy with train-mode accuracy at the largest measured batch
size. A difference counts when it exceeds both MIN_GAP and two binomial standard errors of the
eval accuracy, sqrt(p (1 - p) / n). Recomputed statistics "recover" the difference when they
bring the eval accuracy at least halfway to the train-mode accuracy; which ones do tells stale
or foreign running statistics (PreciseBN on the training data recovers) from a shift between
training and test data (only statistics of the test images recover) from a model that needs
each batch's own statistics (neither recovers).
"""

from __future__ import annotations

import math

from bnlab.console import format_table

MIN_GAP = 0.01  # accuracy differences below one point are not called a difference
TOP_LAYERS = 3  # layers named in the answer
KL_LAYER = 0.05  # nats of mean KL: a layer below it is not called disagreeing (ordinary lag of
# well-estimated running statistics measured 0.001-0.01 on the test models)
FIRST_LAYER_RATIO = 10.0  # the first layer alone: its KL at least this many times every other's
SMALL_TRAIN_BATCH = 16  # training batches of at most this many images give noisy statistics
MIN_PRECISE_IMAGES = 1000  # PreciseBN over fewer training images is noisy itself


def _reference(res: dict) -> tuple[str, float] | None:
    """(batch size, accuracy) of the largest batch size measured in train mode."""
    done = [(b, a) for b, a in res.get("train_mode_acc", {}).items() if a is not None]
    return max(done, key=lambda ba: int(ba[0])) if done else None


def _layer_text(g: dict) -> str:
    return (f"{g['layer'] or '<model>'} (KL {g['kl_mean']:.3g} nats, mean shift "
            f"{g['mean_shift_mean']:.3g} std, |ln var ratio| {g['var_logratio_mean']:.3g})")


def _gaps(res: dict) -> list[dict]:
    """The per-layer gaps in model order (the first is the first norm layer)."""
    return res.get("precise", {}).get("gaps", [])


def _healthy(res: dict) -> str | None:
    """The sentence for running statistics with no layer above KL_LAYER, else None."""
    gaps = _gaps(res)
    if not gaps or any(g["kl_mean"] > KL_LAYER for g in gaps):
        return None
    top = max(gaps, key=lambda g: g["kl_mean"])
    return (f"No layer's running statistics differ from the recomputed ones by more than "
            f"{KL_LAYER:g} nats of KL (the largest: {top['layer'] or '<model>'}, "
            f"{top['kl_mean']:.3g}): they are healthy.")


def _first_layer(res: dict) -> str | None:
    """The sentence for a mismatch confined to the first norm layer, else None."""
    gaps = _gaps(res)
    if len(gaps) < 2 or gaps[0]["kl_mean"] <= KL_LAYER:
        return None
    first, rest = gaps[0], max(g["kl_mean"] for g in gaps[1:])
    if first["kl_mean"] < FIRST_LAYER_RATIO * rest:
        return None
    return (f"The mismatch is confined to the first norm layer: {_layer_text(first)}, every "
            f"other layer at most {rest:.3g} nats. Its input is the preprocessed image, so the "
            "images are prepared differently from training: check their scale ([0, 1] or "
            "[0, 255]) and the per-channel mean and std they are normalized with (--mean/--std "
            "for your own model).")


def _small_batches(res: dict) -> str | None:
    """The sentence for a model trained on small batches, with the measured batch-size
    dependence of train mode, else None."""
    b = res.get("train_batch_size")
    done = [(int(k), a) for k, a in res.get("train_mode_acc", {}).items() if a is not None]
    if b is None or b > SMALL_TRAIN_BATCH or len(done) < 2:
        return None
    (s_lo, a_lo), (s_hi, a_hi) = min(done), max(done)
    return (f"The model was trained on batches of {b} images, whose statistics are noisy "
            f"estimates of the data's: train-mode accuracy is {a_lo:.4f} at batch {s_lo} and "
            f"{a_hi:.4f} at batch {s_hi} here. A norm without batch statistics (GroupNorm), "
            "batch renormalization, ghost BN (fixed virtual batches), or a larger training "
            "batch remove this dependence.")


def _few_images(res: dict) -> str | None:
    p = res.get("precise")
    if not p or not p.get("batch_size") or p["batches"] * p["batch_size"] >= MIN_PRECISE_IMAGES:
        return None
    n = p["batches"] * p["batch_size"]
    return (f"Warning: PreciseBN saw only {n} training images ({p['batches']} batches of "
            f"{p['batch_size']}), fewer than {MIN_PRECISE_IMAGES}: its statistics are noisy "
            "themselves; give more batches (--precise-batches).")


def answer(res: dict) -> list[str]:
    """Sentences answering "good in train mode, bad in eval mode: why?" from `res`, then what
    is specific to this model (small training batches, the first layer alone, healthy
    statistics, too few images for PreciseBN)."""
    out = _answer(res)
    out += [x for x in (_small_batches(res), _few_images(res)) if x]
    return out


def _answer(res: dict) -> list[str]:
    ev, n = res["eval_acc"], res["n_test"]
    if "train_mode_acc" not in res:
        return [f"Train and eval mode normalize alike here, so they cannot differ; eval "
                f"accuracy {ev:.4f}."]
    ref = _reference(res)
    if ref is None:
        return ["Train mode is not measurable at any of the batch sizes given."]
    b, tr = ref
    margin = max(MIN_GAP, 2 * math.sqrt(max(ev * (1 - ev), 0.0) / max(n, 1)))
    gap = tr - ev
    out = []
    if gap <= margin:
        out.append(f"Eval mode is not worse than train mode: {ev:.4f} vs {tr:.4f} at batch {b} "
                   f"(difference {100 * gap:+.2f} points, within {100 * margin:.2f}).")
        small = [(bs, a) for bs, a in res["train_mode_acc"].items() if a is not None]
        bs, a = min(small, key=lambda ba: int(ba[0]))
        if tr - a > margin:
            out.append(f"Train mode depends on the batch size: {a:.4f} at batch {bs}, "
                       f"{tr:.4f} at batch {b}.")
        p, pf = res.get("precise_acc"), res.get("precise_fvcore_acc")
        if p is not None and max(p, pf if pf is not None else p) - ev > margin:
            out.append(f"Statistics recomputed on {res['precise']['batches']} training batches "
                       f"raise the eval accuracy to {p:.4f} (pooled), {pf:.4f} (fvcore): the "
                       "running statistics lag behind the trained weights (PreciseBN helps).")
        else:
            out.append("The running statistics serve the model as well as each batch's own.")
        healthy = _healthy(res)
        if healthy:
            out.append(healthy)
        return out
    out.append(f"Eval mode is {100 * gap:.2f} points below train mode: {ev:.4f} vs {tr:.4f} at "
               f"batch {b} ({n} test images).")
    p, pf, t = res.get("precise_acc"), res.get("precise_fvcore_acc"), res.get("test_stats_acc")
    half = ev + gap / 2
    if p is not None and max(p, pf if pf is not None else p) >= half:
        k = res["precise"]["batches"]
        out.append(f"Statistics recomputed on {k} training batches recover it ({p:.4f} pooled, "
                   f"{pf:.4f} fvcore): the stored running statistics do not describe the data "
                   "the model sees (estimated on other data, stale after a change of the model, "
                   "or averaged with an unsuited momentum). Recompute them (PreciseBN).")
    elif t is not None and t >= half:
        lead = ("Statistics recomputed on the training data do not recover it "
                f"({p:.4f}), statistics" if p is not None else "Statistics")
        out.append(f"{lead} re-estimated on the test images do ({t:.4f}): the test images "
                   "differ from the training images in what the norm layers see (a shift "
                   "between the two; re-estimating on the test data is AdaBN).")
    else:
        parts = [f"recomputed on the training data ({p:.4f})" if p is not None else None,
                 f"re-estimated on the test images ({t:.4f})" if t is not None else None]
        said = " nor ".join(x for x in parts if x)
        out.append(f"Neither statistics {said} recover it: the model relies on normalizing "
                   "each batch by its own statistics, which no fixed statistics reproduce.")
    first = _first_layer(res)
    if first:
        out.append(first)
        return out
    gaps = {g["layer"]: g for g in _gaps(res)}
    ranking = [gaps[name] for name in res.get("precise", {}).get("ranking", [])
               if gaps[name]["kl_mean"] > KL_LAYER][:TOP_LAYERS]
    if ranking:
        out.append("Layers whose running statistics disagree most with the training data: "
                   + "; ".join(_layer_text(g) for g in ranking) + ".")
    elif gaps:
        out.append(_healthy(res).replace(": they are healthy.", ": the difference is not in "
                                         "the stored statistics of any one layer."))
    return out


def format_diagnose(res: dict) -> str:
    lines = [f"model {res['checkpoint']}  ({res['model']}, norm {res['norm']}, "
             f"{res['n_test']} test images)",
             f"eval-mode accuracy"
             f"{' (running statistics)' if res['running_stat_layers'] else ''}: "
             f"{res['eval_acc']:.4f}"]
    for text in res["not_applicable"]:
        lines.append(f"not applicable: {text}")
    if "train_mode_acc" in res:
        lines.append(f"train-mode accuracy (the {res['batch_stat_layers']} batch-statistics "
                     "layers use each test batch's own statistics) by batch size:")
        rows = []
        for b, a in res["train_mode_acc"].items():
            note = res.get("train_mode_errors", {}).get(b, "")
            rows.append([b, "n/a" if a is None else f"{a:.4f}",
                         f"not measurable: {note}" if note else ""])
        lines.append(format_table(["batch", "accuracy", "note"], rows))
        if res.get("batch_size_note"):
            lines.append(f"  ({res['batch_size_note']})")
    if "precise_acc" in res:
        p = res["precise"]
        lines.append(f"PreciseBN ({p['batches']} training batches of {p['batch_size']}): eval "
                     f"accuracy {res['precise_acc']:.4f} with pooled statistics (mean and "
                     f"biased variance of all values), {res['precise_fvcore_acc']:.4f} with "
                     "fvcore's (average of per-batch means and unbiased variances); "
                     f"running statistics: {res['eval_acc']:.4f}")
        gaps = {g["layer"]: g for g in p["gaps"]}
        rows = [[name, f"{g['kl_mean']:.4g}", f"{g['mean_shift_mean']:.4f}",
                 f"{g['mean_shift_max']:.4f}", f"{g['var_logratio_mean']:.4f}",
                 f"{g['var_logratio_max']:.4f}"]
                for name, g in ((n, gaps[n]) for n in p["ranking"])]
        lines.append("running vs recomputed (pooled) statistics, layers by KL:")
        lines.append(format_table(["layer", "KL (avg)", "mean shift/std (avg)", "(max)",
                                   "|ln var ratio| (avg)", "(max)"], rows))
    if "test_stats_acc" in res:
        lines.append(f"statistics re-estimated on the test images: eval accuracy "
                     f"{res['test_stats_acc']:.4f}")
    if "sanity" in res:
        if not res["sanity"]:
            lines.append("running statistics: all finite, no near-zero variance, "
                         "no dead channels")
        for s in res["sanity"]:
            parts = [f"{k} {v}" for k, v in s.items() if k not in ("layer", "channels")]
            lines.append(f"running statistics of {s['layer']} ({s['channels']} channels): "
                         + ", ".join(parts))
    if res.get("answer"):
        lines.append("answer:")
        lines += [f"  {a}" for a in res["answer"]]
    return "\n".join(lines)


__all__ = ["KL_LAYER", "answer", "format_diagnose"]
