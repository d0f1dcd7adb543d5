"""BN folding: the formula against float64 references, and eager parity for every norm that
can fold (checked eager against eager; an ONNX exporter folds BN by itself)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_stats
from torch import nn

from bnlab.errors import UserError
from bnlab.infer.fold import PARITY_LIMIT, fold_model, fold_params
from bnlab.infer.loading import norm_layers
from bnlab.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def rel_diff(a, b):
    return float((a - b).abs().max() / a.abs().max())


def test_fold_params_conv_against_float64():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 3, 3, 3, generator=g)
    b = torch.randn(5, generator=g)
    mean, var = torch.randn(5, generator=g), torch.rand(5, generator=g) + 0.1
    gamma, beta = torch.randn(5, generator=g), torch.randn(5, generator=g)
    x = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    ref = F.conv2d(x, w.double(), b.double())
    ref = (ref - mean.double().view(1, -1, 1, 1)) / torch.sqrt(var.double() + 1e-3).view(
        1, -1, 1, 1) * gamma.double().view(1, -1, 1, 1) + beta.double().view(1, -1, 1, 1)
    w2, b2 = fold_params(w, b, mean, var, 1e-3, gamma, beta)
    assert w2.dtype == torch.float32
    got = F.conv2d(x, w2.double(), b2.double())
    assert float((got - ref).abs().max()) < 1e-5 * float(ref.abs().max())


def test_fold_params_linear_no_bias_no_affine():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mean, var = torch.randn(4, generator=g, dtype=torch.float64), torch.rand(
        4, generator=g, dtype=torch.float64) + 0.5
    w2, b2 = fold_params(w, None, mean, var, 1e-5, None, None)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64)
    ref = (x @ w.T - mean) / torch.sqrt(var + 1e-5)
    torch.testing.assert_close(x @ w2.T + b2, ref, rtol=1e-12, atol=1e-12)


CASES = [  # (model, norm, norm_options, placement, folded count)
    ("resnet20", "bn", {}, "post_conv", 19),
    ("resnet20", "bn", {"eps": 1e-3, "momentum": 0.01}, "post_conv", 19),
    ("resnet20", "bn", {"affine": False}, "post_conv", 19),
    ("resnet20", "bn", {}, "first_k", 3),  # stem + first block keep their norms
    ("mlp3x100", "bn", {}, "post_conv", 3),  # BatchNorm1d after Linear
    ("resnet18", "bn", {}, "post_conv", 20),  # torchvision, with downsample convs
    # every other norm whose eval mode is the affine map of fixed statistics
    ("resnet20", "bn", {"convention": "keras"}, "post_conv", 19),
    ("resnet20", "bn_ref", {}, "post_conv", 19),
    ("resnet20", "frozen", {}, "post_conv", 19),  # the conv before it keeps a bias
    ("resnet20", "cumulative", {}, "post_conv", 19),
    ("resnet20", "batch_renorm", {}, "post_conv", 19),
    ("resnet20", "ghost", {}, "post_conv", 19),
    ("mlp3x100", "batch_renorm", {}, "post_conv", 3),
    ("mlp3x100", "cumulative", {"affine": False}, "post_conv", 3),
]
# Each runs a few training steps first, so statistics come from the norm's own update rule
# (batch_renorm's r and d, cumulative's pooled sums, Keras's biased variance), then gets
# random affine parameters on top.


def trained_then_randomized(name, norm, opts, placement):
    torch.manual_seed(0)
    model = build_model(name, 10, norm=norm, placement=placement, norm_options=opts)
    model.train()
    with torch.no_grad():
        for s in range(2):
            model(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(s)) + 0.5)
    return randomize_stats(model)  # frozen norms: their weight and bias buffers too


@pytest.mark.parametrize("name,norm,opts,placement,count", CASES)
def test_folded_model_matches_unfolded(name, norm, opts, placement, count):
    model = trained_then_randomized(name, norm, opts, placement)
    kind = type(next(m for _, m in norm_layers(model)))
    folded, info = fold_model(model)
    assert len(info["folded"]) == count
    assert sum(isinstance(m, kind) for m in folded.modules()) == \
        sum(isinstance(m, kind) for m in model.modules()) - count
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        a, b = model(x), folded(x)
    assert rel_diff(a, b) <= PARITY_LIMIT
    # the original is untouched
    assert sum(isinstance(m, kind) for m in model.modules()) >= count


def test_post_activation_norms_are_left():
    model = randomize_stats(build_model("resnet20", 10, norm="bn", placement="post_act"))
    folded, info = fold_model(model)
    assert info["folded"] == []
    assert len(info["left"]) == 19 and all("relu" in why for _, why in info["left"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), folded(x))


def test_no_norm_model_is_unchanged():
    model = build_model("resnet20", 10, norm="none").eval()
    folded, info = fold_model(model)
    assert info == {"folded": [], "left": []}


def test_training_mode_is_refused():
    model = build_model("mlp3x100", 10, norm="bn")
    with pytest.raises(UserError, match="eval mode"):
        fold_model(model.train())


class BatchStatsAlways(nn.BatchNorm2d):
    """Looks like BN (running statistics) but normalizes with batch statistics in eval too."""

    def forward(self, x):
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


def test_norm_that_ignores_its_running_stats_is_not_folded():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchStatsAlways(4), nn.Conv2d(4, 4, 3),
                          nn.BatchNorm2d(4))
    model = randomize_stats(model)
    folded, info = fold_model(model)
    assert info["folded"] == [["2", "3"]]
    assert info["left"][0][0] == "1" and "running" in info["left"][0][1]
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert rel_diff(model(x), folded(x)) <= PARITY_LIMIT


def test_conv_output_used_twice_is_not_folded():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = randomize_stats(Two())
    folded, info = fold_model(model)
    assert info["folded"] == [] and "used elsewhere" in info["left"][0][1]


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_onnx_export_matches_pytorch(tmp_path, dynamo):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnxruntime as ort

    from bnlab.infer.export import export_onnx

    model = randomize_stats(build_model("mlp3x100", 10, norm="bn", in_channels=1,
                                        image_size=8))
    folded, _ = fold_model(model)
    x = torch.randn(5, 1, 8, 8)
    path = export_onnx(folded, x[:2], tmp_path / "m.onnx", dynamo=dynamo)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]  # batch 5: dynamic
    with torch.no_grad():
        ref = model(x)
    assert rel_diff(ref, torch.from_numpy(out)) <= 1e-5


# -- the command's exit status ----------------------------------------------------------------
class LyingBN(nn.BatchNorm2d):
    """Eval mode is BN's affine map except where |x| > 50, which fold's random probe input
    never reaches: it is folded, and folding it changes the model."""

    def forward(self, x):
        y = super().forward(x)
        return y if self.training else torch.where(x.abs() > 50, x, y)


def make_lying_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), LyingBN(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 10))


def make_conv_bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))


def _weights(tmp_path, model, name):
    model = randomize_stats(model)
    with torch.no_grad():
        model[0].weight.mul_(100)  # conv outputs far above 50
    path = tmp_path / name
    torch.save(model.state_dict(), path)
    return str(path)


def _one_line_failure(capsys, argv) -> tuple[str, str]:
    from bnlab.cli import main

    assert main(argv) == 1
    out = capsys.readouterr()
    err = out.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return out.out, err


def test_broken_eager_parity_fails_the_command(tmp_path, capsys):
    w = _weights(tmp_path, make_lying_net(), "lying.pt")
    out, err = _one_line_failure(capsys, ["fold", "--model-entry", "test_fold:make_lying_net",
                                          "--weights", w, "--dataset", "synthetic",
                                          "--repeats", "1"])
    assert "folded model differs from the unfolded one" in err and "FAILS the limit" in out


def test_broken_onnx_parity_fails_the_command(tmp_path, capsys, monkeypatch):
    """A real ONNX file of other weights than the folded model it is checked against."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import copy

    from bnlab.infer import export, fold_report

    def export_other_weights(model, example, path, dynamo=True):
        other = copy.deepcopy(model)
        with torch.no_grad():
            other[-1].bias.add_(1.0)
        return export.export_onnx(other, example, path, dynamo=False)

    monkeypatch.setattr(fold_report, "export_onnx", export_other_weights)
    w = _weights(tmp_path, make_conv_bn_net(), "net.pt")
    onnx = tmp_path / "net.onnx"
    out, err = _one_line_failure(capsys, ["fold", "--model-entry", "test_fold:make_conv_bn_net",
                                          "--weights", w, "--dataset", "synthetic",
                                          "--repeats", "1", "--onnx", str(onnx)])
    assert f"the ONNX model {str(onnx)!r} differs from PyTorch" in err
    assert "ok the limit" in out and "FAILS the limit" in out  # eager ok, ONNX not
