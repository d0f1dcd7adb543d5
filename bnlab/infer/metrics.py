"""Metrics of predictive distributions, as pure functions of logits and labels.

Every function takes logits (N, K) (any float dtype; computed in float64) and/or integer labels
(N,), and returns Python numbers or lists, so results can go straight into JSON. Natural
logarithms throughout (nats).
"""

from __future__ import annotations

import torch

ECE_BINS = 15  # equal-width confidence bins on [0, 1] (Guo et al. 2017)


def _logp(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.double(), dim=1)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).double().mean())


def nll(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true class: -(1/N) sum_i log p_i[y_i]."""
    return float(-_logp(logits).gather(1, y.view(-1, 1)).mean())


def brier(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Multi-class Brier score (Brier 1950): (1/N) sum_i sum_k (p_ik - [y_i = k])^2, in [0, 2]."""
    p = _logp(logits).exp()
    onehot = torch.zeros_like(p).scatter_(1, y.view(-1, 1), 1.0)
    return float(((p - onehot) ** 2).sum(1).mean())


def per_class_accuracy(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> list:
    """Accuracy within each true class; None for a class absent from `y`."""
    right = (logits.argmax(1) == y).double()
    out = []
    for k in range(num_classes):
        m = y == k
        out.append(float(right[m].mean()) if bool(m.any()) else None)
    return out


def reliability(logits: torch.Tensor, y: torch.Tensor, bins: int = ECE_BINS) -> dict:
    """Confidence c_i = max_k p_ik binned into `bins` equal-width bins (lo, hi] of [0, 1].

    Returns per bin: count n_b, mean confidence conf_b and accuracy acc_b (None when empty).
    """
    p = _logp(logits).exp()
    conf, pred = p.max(1)
    right = (pred == y).double()
    index = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    counts = torch.bincount(index, minlength=bins)
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, conf)
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, right)
    out = {"edges": [i / bins for i in range(bins + 1)], "count": counts.tolist(),
           "conf": [], "acc": []}
    for b in range(bins):
        n = int(counts[b])
        out["conf"].append(float(conf_sum[b] / n) if n else None)
        out["acc"].append(float(acc_sum[b] / n) if n else None)
    return out


def ece(logits: torch.Tensor, y: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum_b (n_b / N) |acc_b - conf_b| over equal-width bins."""
    r = reliability(logits, y, bins)
    n = sum(r["count"])
    return float(sum(c / n * abs(a - f) for c, a, f in zip(r["count"], r["acc"], r["conf"])
                     if c))


def confidence_histogram(logits: torch.Tensor, bins: int = 20) -> dict:
    """Counts of the confidence max_k p_ik in `bins` equal-width bins (lo, hi] of [0, 1]."""
    conf = _logp(logits).exp().max(1).values
    index = (torch.ceil(conf * bins).long() - 1).clamp(0, bins - 1)
    return {"edges": [i / bins for i in range(bins + 1)],
            "count": torch.bincount(index, minlength=bins).tolist()}


def flips(logits_a: torch.Tensor, logits_b: torch.Tensor, y: torch.Tensor) -> dict:
    """Agreement rate of the two models' predicted classes and the 2x2 table of right/wrong.

    right_to_wrong counts samples model a gets right and model b gets wrong; wrong_to_right the
    reverse (b fixes them).
    """
    pa, pb = logits_a.argmax(1), logits_b.argmax(1)
    ra, rb = pa == y, pb == y
    return {"agreement": float((pa == pb).double().mean()),
            "both_right": int((ra & rb).sum()), "both_wrong": int((~ra & ~rb).sum()),
            "right_to_wrong": int((ra & ~rb).sum()), "wrong_to_right": int((~ra & rb).sum())}


def kl(logits_a: torch.Tensor, logits_b: torch.Tensor) -> float:
    """Mean over samples of KL(p_a || p_b) = sum_k p_a,k (log p_a,k - log p_b,k), in nats."""
    la, lb = _logp(logits_a), _logp(logits_b)
    return float((la.exp() * (la - lb)).sum(1).mean())


def js(logits_a: torch.Tensor, logits_b: torch.Tensor) -> float:
    """Mean Jensen-Shannon divergence, in nats (at most ln 2):
    JS = 1/2 KL(p_a || m) + 1/2 KL(p_b || m) with m = (p_a + p_b) / 2."""
    la, lb = _logp(logits_a), _logp(logits_b)
    pa, pb = la.exp(), lb.exp()
    lm = torch.log(0.5 * (pa + pb))
    # 0 * log 0 = 0: terms with p = 0 contribute nothing
    ta = torch.where(pa > 0, pa * (la - lm), torch.zeros_like(pa))
    tb = torch.where(pb > 0, pb * (lb - lm), torch.zeros_like(pb))
    return float((0.5 * ta.sum(1) + 0.5 * tb.sum(1)).mean())
