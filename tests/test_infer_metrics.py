"""Prediction metrics against values computed by hand on small fixed inputs."""

import math

import pytest
import torch

from bnlab.infer import metrics as M

# probabilities chosen so that every metric can be worked out on paper; logits = log p
PA = [[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]]
PB = [[0.4, 0.6], [0.3, 0.7], [0.1, 0.9], [0.55, 0.45]]
Y = torch.tensor([0, 1, 1, 1])


def logits(p):
    return torch.tensor(p, dtype=torch.float64).log()


def test_accuracy_nll_brier_by_hand():
    la = logits(PA)
    assert M.accuracy(la, Y) == 0.75  # right: samples 1, 3, 4
    nll = -(math.log(0.9) + math.log(0.4) + math.log(0.7) + math.log(0.8)) / 4
    assert M.nll(la, Y) == pytest.approx(nll, abs=1e-12)
    # per sample sum_k (p_k - onehot_k)^2: 0.02, 0.72, 0.18, 0.08 -> mean 0.25
    assert M.brier(la, Y) == pytest.approx(0.25, abs=1e-12)


def test_per_class_accuracy_with_absent_class():
    assert M.per_class_accuracy(logits(PA), Y, 3) == pytest.approx([1.0, 2 / 3, None])


def test_ece_each_sample_in_its_own_bin():
    # confidences 0.9 (right), 0.6 (wrong), 0.7 (right), 0.8 (right) fall in 4 different bins
    expected = (abs(1 - 0.9) + abs(0 - 0.6) + abs(1 - 0.7) + abs(1 - 0.8)) / 4
    assert M.ece(logits(PA), Y) == pytest.approx(expected, abs=1e-12)


def test_ece_shared_bin():
    # 0.95 right and 0.97 wrong share bin (14/15, 1]; 0.55 right is alone in (8/15, 9/15]
    p = [[0.95, 0.03, 0.02], [0.97, 0.02, 0.01], [0.25, 0.55, 0.20]]
    y = torch.tensor([0, 1, 1])
    expected = 2 / 3 * abs(0.5 - 0.96) + 1 / 3 * abs(1.0 - 0.55)
    assert M.ece(logits(p), y) == pytest.approx(expected, abs=1e-12)
    r = M.reliability(logits(p), y)
    assert r["count"][14] == 2 and r["count"][8] == 1 and sum(r["count"]) == 3
    assert r["acc"][14] == 0.5 and r["conf"][14] == pytest.approx(0.96)
    assert len(r["edges"]) == 16


def test_flips_by_hand():
    f = M.flips(logits(PA), logits(PB), Y)
    # preds a: 0 0 1 1, b: 1 1 1 0; right a: 1 0 1 1, b: 0 1 1 0
    assert f == {"agreement": 0.25, "both_right": 1, "both_wrong": 0,
                 "right_to_wrong": 2, "wrong_to_right": 1}


def test_kl_and_js_by_hand():
    def kl_row(p, q):
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))

    kl_ab = sum(kl_row(p, q) for p, q in zip(PA, PB)) / 4
    kl_ba = sum(kl_row(q, p) for p, q in zip(PA, PB)) / 4
    js = 0.0
    for p, q in zip(PA, PB):
        m = [(a + b) / 2 for a, b in zip(p, q)]
        js += 0.5 * kl_row(p, m) + 0.5 * kl_row(q, m)
    js /= 4
    la, lb = logits(PA), logits(PB)
    assert M.kl(la, lb) == pytest.approx(kl_ab, abs=1e-12)
    assert M.kl(lb, la) == pytest.approx(kl_ba, abs=1e-12)
    assert M.js(la, lb) == pytest.approx(js, abs=1e-12)
    assert M.kl(la, la) == pytest.approx(0.0, abs=1e-15)


def test_js_of_disjoint_distributions_is_ln2():
    a = torch.tensor([[0.0, -1e4]])
    b = torch.tensor([[-1e4, 0.0]])
    assert M.js(a, b) == pytest.approx(math.log(2), abs=1e-9)


def test_confidence_histogram_counts():
    h = M.confidence_histogram(logits(PA), bins=10)
    # confidences 0.9, 0.6, 0.7, 0.8 -> bins (0.8,0.9], (0.5,0.6], (0.6,0.7], (0.7,0.8]
    assert sum(h["count"]) == 4
    assert [i for i, c in enumerate(h["count"]) if c] == [5, 6, 7, 8]
