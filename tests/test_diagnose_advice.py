"""`diagnose` says what to do, from the numbers it measured: small training batches, a mismatch
of the first norm layer alone (preprocessing), healthy statistics, PreciseBN on too few
images; --mean/--std for your own model and --write-recalibrated."""

from __future__ import annotations

import pytest
import torch
from test_user_model import SmallNet, _normalized
from torch import nn

import bnlab
from bnlab.cli import main
from bnlab.data import load_data
from bnlab.infer.diagnose_text import KL_LAYER, answer

FILE = __file__


def make_net():
    return SmallNet()


def _train(batch: int, epochs: int, lr: float) -> SmallNet:
    bundle = load_data("synthetic")
    torch.manual_seed(0)
    model = SmallNet()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    x, y = _normalized(bundle.train.x, bundle), bundle.train.y
    model.train()
    for _ in range(epochs):
        for i in range(0, len(y), batch):
            loss = nn.functional.cross_entropy(model(x[i:i + batch]), y[i:i + batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():  # running statistics settled on the training data, at that batch
        for i in range(0, len(y), batch):
            model(x[i:i + batch])
    return model.eval()


@pytest.fixture(scope="module")
def healthy():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(64, 4, 0.1)
    finally:
        torch.set_num_threads(threads)


# -- each branch of the answer on measured-looking numbers -------------------------------------
def _res(kls, eval_acc=0.90, train=0.90, small=0.89, batch=128, precise_batches=100):
    gaps = [{"layer": f"l{i}", "kl_mean": k, "mean_shift_mean": 0.1, "var_logratio_mean": 0.1}
            for i, k in enumerate(kls)]
    return {"eval_acc": eval_acc, "n_test": 10_000, "train_batch_size": batch,
            "train_mode_acc": {"2": small, "256": train}, "precise_acc": eval_acc,
            "precise_fvcore_acc": eval_acc, "test_stats_acc": eval_acc,
            "precise": {"batches": precise_batches, "batch_size": batch, "gaps": gaps,
                        "ranking": [g["layer"] for g in sorted(gaps, key=lambda g:
                                                               -g["kl_mean"])]}}


def test_healthy_statistics_are_called_healthy_and_no_layer_is_named():
    text = " ".join(answer(_res([0.005, 0.002, 0.001])))
    assert "not worse than train mode" in text and "they are healthy" in text
    assert f"more than {KL_LAYER:g} nats" in text and "l0, 0.005" in text
    assert "disagree most" not in text
    # a gap whose layers are all below the threshold names none of them either
    gap = " ".join(answer(_res([0.005, 0.002], eval_acc=0.5, train=0.9, small=0.9)))
    assert "disagree most" not in gap and "not in the stored statistics of any one" in gap


def test_first_layer_alone_points_at_preprocessing():
    out = answer(_res([3.0, 0.01, 0.02], eval_acc=0.3))
    assert out[0].startswith("Eval mode is 60.00 points below train mode")
    assert out[2].startswith("The mismatch is confined to the first norm layer: l0 (KL 3 nats")
    assert "mean and std" in out[2] and "disagree most" not in " ".join(out)
    # the first layer among others that disagree too: the ordinary ranking
    out = answer(_res([3.0, 1.0, 0.02], eval_acc=0.3))
    assert "confined" not in " ".join(out) and out[2].startswith("Layers whose running")


def test_small_training_batches_get_their_own_advice_with_the_measured_dependence():
    out = answer(_res([0.3, 0.2], eval_acc=0.6, train=0.9, small=0.4, batch=2))
    text = " ".join(out)
    assert ("trained on batches of 2 images" in text and "0.4000 at batch 2" in text
            and "0.9000 at batch 256" in text)
    assert "GroupNorm" in text and "batch renormalization" in text and "ghost BN" in text
    assert "trained on batches" not in " ".join(answer(_res([0.3, 0.2], batch=32)))


def test_precise_bn_on_few_images_is_a_warning():
    text = " ".join(answer(_res([0.001], batch=16, precise_batches=10)))
    assert "Warning: PreciseBN saw only 160 training images (10 batches of 16)" in text
    assert "Warning" not in " ".join(answer(_res([0.001], batch=16, precise_batches=100)))


# -- the same branches on real models ----------------------------------------------------------
def test_a_healthy_model_is_said_to_be(healthy):
    res = bnlab.diagnose(healthy, "synthetic", batch_sizes=[32, 256], precise_batches=8)
    assert max(g["kl_mean"] for g in res["precise"]["gaps"]) < KL_LAYER
    text = " ".join(res["answer"])
    assert "not worse than train mode" in text and "they are healthy" in text
    assert "disagree most" not in text and "Warning" not in text  # 8 x 128 images


def test_inputs_prepared_otherwise_show_in_the_first_layer_alone(healthy):
    """The same model fed images normalized with 4x the training std and another mean: bn1's
    input changes; bn1 in batch-statistics mode hides it from every later layer."""
    bundle = load_data("synthetic")
    res = bnlab.diagnose(healthy, "synthetic", batch_sizes=[256], precise_batches=8,
                         mean=[m + 0.2 for m in bundle.mean], std=[4 * s for s in bundle.std])
    gaps = res["precise"]["gaps"]
    assert [g["layer"] for g in gaps] == ["bn1", "bn2"]
    assert gaps[0]["kl_mean"] > 10 * gaps[1]["kl_mean"]
    text = " ".join(res["answer"])
    assert "confined to the first norm layer: bn1" in text


def test_a_model_trained_at_batch_2(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _train(2, 1, 0.02)
    finally:
        torch.set_num_threads(threads)
    res = bnlab.diagnose(model, "synthetic", batch_sizes=[2, 256], precise_batches=16,
                         batch_size=2)
    acc = res["train_mode_acc"]
    text = " ".join(res["answer"])
    assert f"{acc['2']:.4f} at batch 2 and {acc['256']:.4f} at batch 256" in text
    assert "trained on batches of 2 images" in text
    assert "Warning: PreciseBN saw only 32 training images" in text


def test_write_recalibrated_from_the_command_line(healthy, tmp_path):
    """--write-recalibrated saves the pooled statistics of the PreciseBN batches: 8 batches of
    128 are the 1,024 training images, so bn1's are the float64 mean and variance of conv1's
    output over the whole training set."""
    torch.save(healthy.state_dict(), tmp_path / "w.pt")
    out = tmp_path / "recal.pt"
    assert main(["diagnose", "--model-entry", f"{FILE}:make_net", "--weights",
                 str(tmp_path / "w.pt"), "--dataset", "synthetic", "--batch-sizes", "256",
                 "--precise-batches", "8", "--write-recalibrated", str(out)]) == 0
    state = torch.load(out, weights_only=True)
    bundle = load_data("synthetic")
    with torch.no_grad():
        h = healthy.conv1.double()(_normalized(bundle.train.x, bundle).double())
    healthy.conv1.float()
    torch.testing.assert_close(state["bn1.running_mean"].double(), h.mean((0, 2, 3)),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state["bn1.running_var"].double(),
                               h.var((0, 2, 3), correction=0), rtol=1e-5, atol=1e-6)
    assert torch.equal(state["conv1.weight"], healthy.conv1.weight)


def test_mean_and_std_are_for_your_own_model(tmp_path, capsys):
    with pytest.raises(bnlab.UserError, match="--std has 2 values"):
        bnlab.diagnose(SmallNet(), "synthetic", std=[0.2, 0.2])
    with pytest.raises(bnlab.UserError, match="--mean/--std are for your own model"):
        bnlab.diagnose(tmp_path, mean=[0.5])
    assert main(["diagnose", "x", "--mean", "a,b"]) == 2
    assert "not a comma-separated list of numbers" in capsys.readouterr().err
