"""The inference tools on models in memory (never changed), recalibration checked against
torch.optim.swa_utils.update_bn, and DataFrames that fit a notebook."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bnlab
from bnlab.api.frames import METRIC_COLUMNS


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn1 = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.fc, self.bn2 = nn.Linear(6, 8), nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv(x))).mean((2, 3))
        return self.head(torch.relu(self.bn2(self.fc(x))))


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    m = Net()
    with torch.no_grad():  # running statistics of some other data: the model is not fresh
        for layer, c in ((m.bn1, 6), (m.bn2, 8)):
            layer.running_mean.copy_(torch.linspace(-1, 1, c))
            layer.running_var.copy_(torch.linspace(0.5, 2, c))
    return m


def snapshot(m: nn.Module) -> tuple[dict, bool, list]:
    return ({k: v.clone() for k, v in m.state_dict().items()}, m.training,
            [p.device for p in m.parameters()])


def unchanged(m: nn.Module, snap) -> bool:
    state, training, devices = snap
    now = m.state_dict()
    return (set(now) == set(state) and all(torch.equal(now[k], state[k]) for k in state)
            and m.training == training and [p.device for p in m.parameters()] == devices)


def loader(n_batches: int = 4, batch: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n_batches * batch, 3, 5, 5, generator=g) * 2 + 0.5
    return DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=batch)


# -- recalibrate -------------------------------------------------------------------------------
def test_recalibrate_fvcore_equals_swa_update_bn():
    m = net().train()
    snap = snapshot(m)
    mine = bnlab.recalibrate(m, loader(), definition="fvcore")
    ref = copy.deepcopy(m)
    torch.optim.swa_utils.update_bn(loader(), ref)  # cumulative average: momentum None
    for name in ("bn1", "bn2"):
        a, b = getattr(mine, name), getattr(ref, name)
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-5, atol=1e-6)
    assert unchanged(m, snap) and not mine.training


def test_recalibrate_pooled_against_update_bn_and_a_closed_form():
    """update_bn averages per-batch means and unbiased variances with equal weights; over equal
    batches of m values the pooled statistics are the same mean and the variance
    (1/N) sum_b (m-1)/m var_b + (1/N) sum_b (mean_b - mean)^2. bn1's input is the data
    itself, so its pooled statistics are also the plain float64 mean and variance."""
    m = net()
    snap = snapshot(m)
    pooled = bnlab.recalibrate(m, loader(), definition="pooled")
    assert unchanged(m, snap)
    x = torch.cat([b[0] for b in loader()]).double()
    conv = m.conv.double()
    with torch.no_grad():
        h = conv(x)
    m.conv.float()
    torch.testing.assert_close(pooled.bn1.running_mean.double(), h.mean((0, 2, 3)),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled.bn1.running_var.double(),
                               h.var((0, 2, 3), correction=0), rtol=1e-5, atol=1e-6)
    # every layer against update_bn through the relation between the two definitions
    swa = copy.deepcopy(m)
    torch.optim.swa_utils.update_bn(loader(), swa)
    ref = copy.deepcopy(m)  # the inputs each layer sees with batch statistics, per batch
    per_batch = {"bn1": [], "bn2": []}
    hooks = [getattr(ref, n).register_forward_pre_hook(
        lambda mod, a, n=n: per_batch[n].append(a[0].detach().double())) for n in per_batch]
    ref.train()
    with torch.no_grad():
        for b, _ in loader():
            ref(b)
    for hk in hooks:
        hk.remove()
    for name, xs in per_batch.items():
        dims = (0, 2, 3) if xs[0].ndim == 4 else (0,)
        means = torch.stack([v.mean(dims) for v in xs])
        m_b = xs[0].numel() // xs[0].shape[1]
        var_b = torch.stack([v.var(dims, correction=1) for v in xs])
        want = ((m_b - 1) / m_b * var_b).mean(0) + ((means - means.mean(0)) ** 2).mean(0)
        torch.testing.assert_close(getattr(pooled, name).running_var.double(), want,
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(getattr(pooled, name).running_mean,
                                   getattr(swa, name).running_mean, rtol=1e-5, atol=1e-6)


def test_recalibrate_takes_the_first_batches_and_plain_tensors():
    m = net()
    batches = [b for b, _ in loader()]
    a = bnlab.recalibrate(m, batches, batches=2)
    b = bnlab.recalibrate(m, batches[:2])
    assert torch.equal(a.bn1.running_var, b.bn1.running_var)
    assert not torch.equal(a.bn1.running_var, bnlab.recalibrate(m, batches).bn1.running_var)


# -- diagnose, fold, compare on a module in memory ---------------------------------------------
class ImageNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_diagnose_fold_compare_leave_the_module_as_it_was(tmp_path):
    torch.manual_seed(0)
    m = ImageNet().train()  # training mode: the tools must not switch it
    snap = snapshot(m)
    diag = bnlab.diagnose(m, "synthetic", batch_sizes=[8, 64], precise_batches=2,
                          max_images=64)
    assert unchanged(m, snap)
    assert diag.written is None and diag["n_test"] == 64 and "answer:" in diag.text()
    layers = diag.frame()
    assert list(layers.layer) == ["bn"] and layers.kl_mean.dtype == "float64"
    # the same numbers as the same weights given as a file (the command line's way)
    torch.save(m.state_dict(), tmp_path / "w.pt")
    (tmp_path / "net_file.py").write_text(
        "import torch\nfrom torch import nn\n" + _source(ImageNet) + "\ndef make():\n"
        "    return ImageNet()\n")
    again = bnlab.diagnose(bnlab.UserModel(f"{tmp_path / 'net_file.py'}:make", tmp_path / "w.pt"),
                           "synthetic", batch_sizes=[8, 64], precise_batches=2, max_images=64)
    assert again["eval_acc"] == diag["eval_acc"]
    assert again["train_mode_acc"] == diag["train_mode_acc"]

    x = torch.randn(4, 3, 32, 32)
    folding = bnlab.fold(m, x, repeats=1)
    assert unchanged(m, snap)
    assert folding.ok and folding["folded"] == [["conv", "bn"]]
    with torch.no_grad():
        ref = copy.deepcopy(m).eval()(x)
        torch.testing.assert_close(folding.folded(x), ref, rtol=1e-4, atol=1e-5)
    assert list(folding.frame().columns) == ["device", "batch", "unfolded_ms", "folded_ms",
                                             "speedup"]

    other = ImageNet()
    res = bnlab.compare([m, other], "synthetic", out=tmp_path / "cmp", corruptions=False)
    assert unchanged(m, snap)
    assert [r["arm"] for r in res["runs"]] == ["model1", "model2"]
    assert (tmp_path / "cmp" / "compare.json").is_file() and len(res.frame()) == 2


def _source(cls) -> str:
    import inspect

    return inspect.getsource(cls)


def test_a_module_needs_its_data():
    with pytest.raises(bnlab.UserError, match="needs data="):
        bnlab.diagnose(ImageNet())
    with pytest.raises(bnlab.UserError, match="example_input"):
        bnlab.fold(ImageNet(), torch.randn(2, 3, 8, 8), data="synthetic")


# -- diagnose and compare on a DataLoader -----------------------------------------------------
def synthetic_test_loader(batch: int = 64) -> DataLoader:
    """The synthetic test set as a DataLoader yields it to a user's own model: images
    normalized by the training set's per-channel mean and std, in the stored order."""
    from bnlab.data import load_data

    b = load_data("synthetic")
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (b.mean, b.std))
    x = (b.test.x.float() / 255 - mean) / std
    return DataLoader(TensorDataset(x, b.test.y), batch_size=batch)


def test_diagnose_on_a_loader_gives_the_numbers_of_the_dataset_spec():
    torch.manual_seed(0)
    m = ImageNet().train()
    snap = snapshot(m)
    kw = {"batch_sizes": [8, 64], "precise_batches": 0, "max_images": 64}
    by_spec = bnlab.diagnose(m, "synthetic", **kw)
    by_loader = bnlab.diagnose(m, synthetic_test_loader(), **kw)
    assert unchanged(m, snap)
    for key in ("n_test", "eval_acc", "train_mode_acc", "test_stats_acc"):
        assert by_loader[key] == pytest.approx(by_spec[key], abs=1e-12), key
    assert by_loader.written is None and "answer:" in by_loader.text()


def test_diagnose_on_a_loader_recomputes_the_statistics_of_its_images():
    """PreciseBN over one pass of the loader's images (3 batches of 32: one epoch, nothing
    dropped) pools every value bn saw: its mean and biased variance, from the conv's output
    in float64, against the running statistics give stat_gap's closed forms."""
    torch.manual_seed(0)
    m = ImageNet()
    with torch.no_grad():
        m.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 8))
        m.bn.running_var.copy_(torch.linspace(0.5, 3.0, 8))
    snap = snapshot(m)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(96, 3, 6, 6, generator=g), torch.randint(0, 10, (96,), generator=g)
    d = bnlab.diagnose(m, DataLoader(TensorDataset(x, y), batch_size=32), batch_sizes=[96],
                       precise_batches=3)
    assert unchanged(m, snap)
    assert d["n_test"] == 96 and d["precise"]["batch_size"] == 32
    with torch.no_grad():
        h = torch.nn.functional.conv2d(x.double(), m.conv.weight.double(), padding=1)
        h = h.transpose(0, 1).reshape(8, -1)
        mean, v = h.mean(1), h.var(1, unbiased=False) + m.bn.eps
        rm, rv = m.bn.running_mean.double(), m.bn.running_var.double() + m.bn.eps
        shift = ((rm - mean).abs() / v.sqrt())
        logratio = torch.log(rv / v).abs()
        logits = copy.deepcopy(m).eval()(x)
    gap = d.frame().iloc[0]
    assert gap.layer == "bn" and gap.values_per_channel == 96 * 36
    assert gap.mean_shift_max == pytest.approx(float(shift.max()), rel=1e-4)
    assert gap.var_logratio_mean == pytest.approx(float(logratio.mean()), rel=1e-4)
    assert d["eval_acc"] == pytest.approx(float((logits.argmax(1) == y).double().mean()))
    # train mode at one batch of all 96 images normalizes with the pooled statistics too
    assert d["train_mode_acc"]["96"] == pytest.approx(d["precise_acc"])


def test_compare_on_a_loader_equals_the_agreement_computed_by_hand(tmp_path):
    torch.manual_seed(0)
    a, b = ImageNet().train(), ImageNet()
    snaps = snapshot(a), snapshot(b)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(80, 3, 6, 6, generator=g), torch.randint(0, 10, (80,), generator=g)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 80, 16)]
    res = bnlab.compare([a, b], iter(batches), out=tmp_path / "cmp")  # read once, for both
    assert unchanged(a, snaps[0]) and unchanged(b, snaps[1])
    with torch.no_grad():
        pa = copy.deepcopy(a).eval()(x).argmax(1)
        pb = copy.deepcopy(b).eval()(x).argmax(1)
    (pair,) = res["pairs"]
    assert pair["agreement"] == pytest.approx(float((pa == pb).double().mean()))
    frame = res.frame()
    assert list(frame.arm) == ["model1", "model2"] and list(frame.n_test) == [80, 80]
    assert list(frame.test_acc) == pytest.approx([float((p == y).double().mean())
                                                  for p in (pa, pb)])
    assert frame.corruption_acc.isna().all()  # a loader's images are not corrupted
    assert (tmp_path / "cmp" / "compare.json").is_file()


@pytest.mark.parametrize(("data", "said"), [
    (5, "data must be a dataset spec (cifar10, mnist, imagefolder:PATH, synthetic, ...), or a "
        "DataLoader (an iterable of (images, labels) batches), got 5"),
    ({"x": 1}, "data must be a dataset spec"),
    ([torch.zeros(4, 3, 6, 6)], "data must yield (images, labels) batches: images a float "
     "tensor (N, C, ...), labels integers >= 0 (N,); got a float32 tensor (4, 3, 6, 6) in "
     "batch 0"),
    ([(torch.zeros(4, 3, 6, 6), torch.zeros(4))], "got (a float32 tensor (4, 3, 6, 6), a "
     "float32 tensor (4,)) in batch 0"),
    ([(torch.zeros(4, 3, 6, 6), torch.zeros(4, dtype=torch.long)),
      (torch.zeros(4, 3, 5, 5), torch.zeros(4, dtype=torch.long))], "different shapes"),
    ([], "yielded no batch"),
])
def test_a_wrong_loader_is_one_line_naming_it(data, said):
    for call in (lambda: bnlab.diagnose(ImageNet(), data),
                 lambda: bnlab.compare([ImageNet()], data, out="unused")):
        with pytest.raises(bnlab.UserError) as e:
            call()
        assert said in str(e.value) and "\n" not in str(e.value)


def test_a_loader_is_not_corrupted_nor_renormalized():
    batches = [(torch.zeros(4, 3, 6, 6), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(bnlab.UserError, match="corruptions=True needs images in"):
        bnlab.compare([ImageNet()], batches, out="unused", corruptions=True)
    with pytest.raises(bnlab.UserError, match="mean/std normalize the images of a dataset"):
        bnlab.diagnose(ImageNet(), batches, mean=[0.5])
    with pytest.raises(bnlab.UserError, match="data must be a dataset spec .*, got \\["):
        bnlab.fold(ImageNet(), data=batches)


# -- frames ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("frames")
    run = bnlab.train_run("synthetic", "mlp3x100", "bn", 2, out=out, limit_train=64,
                          limit_test=32, batch_size=16, device="cpu", cpu_kernels=False,
                          log=lambda m: None)
    return out, run


def test_frames_have_their_dtypes_and_the_run_folders_order(trained):
    out, run = trained
    runs = bnlab.load_runs(out)
    assert runs.epochs_done.dtype == "int64" and runs.seed.dtype == "int64"
    assert runs.test_acc.dtype == "float64" and runs.val_acc.dtype == "float64"
    assert runs.val_acc.isna().all()  # no validation split: NaN, not an object column
    assert runs.augment.dtype == bool and pd.api.types.is_string_dtype(runs.status)
    metrics = run.metrics()
    want = [c for c in METRIC_COLUMNS if c in metrics.columns]
    assert list(metrics.columns) == want and want[:3] == ["epoch", "step", "lr"]
    assert metrics.epoch.dtype == "int64" and metrics.train_loss.dtype == "float64"
    wide = bnlab.load_metrics(out, wide=True)
    assert len(wide) == 2 and list(wide.epoch) == [1, 2]
    for c in ("train_loss", "test_acc", "lr"):
        assert list(wide[c]) == list(metrics[c])
    long = bnlab.load_metrics(out)
    assert len(long) == sum(len(metrics.columns) - 2 for _ in range(1)) * 2


def test_study_run_without_log_lines(tmp_path, capsys):
    spec = {"name": "quiet", "base": {"dataset": "synthetic", "model": "mlp3x100",
                                      "epochs": 1, "limit_train": 32, "limit_test": 16,
                                      "batch_size": 16, "device": "cpu", "cpu_kernels": False},
            "grid": {"norm": ["bn"]}}
    counts = bnlab.Study.from_spec(spec).run(out=tmp_path / "s", log=False)
    assert counts == {"completed": 1} or sum(counts.values()) == 1
    assert counts.unfinished == 0
    assert capsys.readouterr().out == ""
