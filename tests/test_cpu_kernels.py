"""The fused CPU kernels (bnlab/fast/csrc): against float64 references, torch's own ops and the
loader's torch path; their fallbacks; and the run option that switches them."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnlab.config import RunConfig
from bnlab.data.loader import PAD, Normalizer, crop_flip, epoch_plan
from bnlab.fast import cpu_kernels
from bnlab.fast.cpu_kernels import BnActFunction, FusedNormAct, bn_act
from bnlab.models import build_model
from bnlab.models.norm_act import NormAct, use_fused_norm_act

CL = torch.channels_last

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler: the kernels cannot be built here")


@pytest.fixture(autouse=True)
def kernels():
    assert cpu_kernels.prepare(print), cpu_kernels.describe()
    cpu_kernels.set_enabled(True)
    yield
    cpu_kernels.set_enabled(True)


def _bn(c: int, seed: int = 0, momentum: float | None = 0.1) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c, momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return bn


def _reference(bn: nn.BatchNorm2d, x, residual, relu):
    """float64 torch ops on a float64 copy of the module: (output, copy)."""
    ref = copy.deepcopy(bn).double()
    y = ref(x)
    if residual is not None:
        y = y + residual
    return (F.relu(y) if relu else y), ref


# 16 and 32 channels take the AVX-512 path where the CPU has it (else AVX2), 8 and 24 the AVX2
# path where the CPU has it, 5 and 3 the portable one; an offset mean (+5) checks the shifted
# sums of squares
@pytest.mark.parametrize("c", [16, 32, 8, 24, 5, 3])
@pytest.mark.parametrize("residual,relu", [(False, True), (True, True), (True, False)])
def test_float32_matches_a_float64_reference(c, residual, relu):
    g = torch.Generator().manual_seed(c)
    x = (torch.randn(6, c, 7, 5, generator=g) * 3 + 5).contiguous(memory_format=CL)
    r = torch.randn(6, c, 7, 5, generator=g).contiguous(memory_format=CL) if residual else None
    gy = torch.randn(6, c, 7, 5, generator=g).contiguous(memory_format=CL)
    bn = _bn(c)
    xd = x.double().requires_grad_()
    rd = r.double().requires_grad_() if residual else None
    yd, ref = _reference(bn, xd, rd, relu)
    yd.backward(gy.double())

    x.requires_grad_()
    if residual:
        r.requires_grad_()
    y = bn_act(bn, x, r, relu)
    assert type(y.grad_fn).__name__ == "BnActFunctionBackward"
    y.backward(gy)

    def close(a, b, tol=2e-6):
        assert (a.double() - b).abs().max() <= tol * max(1.0, b.abs().max().item())

    close(y, yd.detach())
    close(x.grad, xd.grad)
    close(bn.weight.grad, ref.weight.grad)
    close(bn.bias.grad, ref.bias.grad)
    if residual:
        close(r.grad, rd.grad)
    close(bn.running_mean, ref.running_mean)
    close(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked) == 1


@pytest.mark.parametrize("c", [16, 8, 5])  # the three paths (as above)
def test_bfloat16_matches_torch_within_bfloat16_rounding(c):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, c, 6, 6, generator=g).to(torch.bfloat16).contiguous(memory_format=CL)
    r = torch.randn(8, c, 6, 6, generator=g).to(torch.bfloat16).contiguous(memory_format=CL)
    gy = torch.randn(8, c, 6, 6, generator=g).to(torch.bfloat16).contiguous(memory_format=CL)
    bn = _bn(c)
    xd, rd = x.double().requires_grad_(), r.double().requires_grad_()
    yd, ref = _reference(bn, xd, rd, True)
    yd.backward(gy.double())
    xb, rb = x.clone().requires_grad_(), r.clone().requires_grad_()
    y = bn_act(bn, xb, rb)
    y.backward(gy)
    assert y.dtype == xb.grad.dtype == rb.grad.dtype == torch.bfloat16
    assert bn.weight.grad.dtype == torch.float32
    eps = 2 ** -8  # bfloat16's relative rounding step
    assert (y.double() - yd).abs().max() <= 2 * eps * yd.abs().max()
    assert (xb.grad.double() - xd.grad).abs().max() <= 4 * eps * xd.grad.abs().max()
    assert torch.equal(rb.grad.double(), rd.grad)  # the masked gradient, exact in bfloat16
    # statistics and parameter gradients are accumulated in float32 from the bf16 values
    assert (bn.weight.grad.double() - ref.weight.grad).abs().max() <= 1e-4 * ref.weight.grad.abs(
    ).max()
    assert (bn.running_var.double() - ref.running_var).abs().max() <= 1e-5


def test_cumulative_momentum_counts_batches_like_torch():
    bn, twin = _bn(16, momentum=None), _bn(16, momentum=None)
    for i in range(3):
        x = torch.randn(4, 16, 5, 5, generator=torch.Generator().manual_seed(i)) + i
        x = x.contiguous(memory_format=CL)
        bn_act(bn, x)
        F.relu(twin(x))
    assert int(bn.num_batches_tracked) == int(twin.num_batches_tracked) == 3
    torch.testing.assert_close(bn.running_mean, twin.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, twin.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_passes_the_relu_as_in_torch(dtype):
    x = torch.randn(4, 16, 3, 3).to(dtype).contiguous(memory_format=CL)
    x[1, 2, 0, 0] = float("nan")
    y = bn_act(_bn(16), x)
    twin = F.relu(_bn(16)(x))
    assert torch.equal(torch.isnan(y), torch.isnan(twin))
    assert torch.isnan(y[:, 2]).all()  # the channel's statistics are NaN, so is its output


def test_results_do_not_depend_on_threads_or_on_the_other_channels():
    # 32 and 16 channels take the AVX-512 path where the CPU has it, 24 the AVX2 one (every
    # lane width does a channel's arithmetic the same way); on an AVX2 CPU all three take AVX2
    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, 32, 8, 8, generator=g).contiguous(memory_format=CL)
    gy = torch.randn(16, 32, 8, 8, generator=g).contiguous(memory_format=CL)
    wide = _bn(32)
    cases = [(a, gy, wide)]
    for c in (16, 24):  # the wide norm's last c channels
        narrow = nn.BatchNorm2d(c)
        narrow.load_state_dict({k: v[-c:] if v.dim() else v for k, v in wide.state_dict().items()})
        cases.append((a[:, -c:].contiguous(memory_format=CL),
                      gy[:, -c:].contiguous(memory_format=CL), narrow))
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for x, grad, norm in cases:
                bn = copy.deepcopy(norm)
                x = x.clone().requires_grad_()
                bn_act(bn, x).backward(grad)
                outs.append((x.grad[:, -16:], bn.weight.grad[-16:], bn.running_var[-16:]))
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        assert all(torch.equal(p, q) for p, q in zip(outs[0], other))


def test_where_the_fused_path_does_not_apply_torch_runs():
    x = torch.randn(4, 16, 5, 5, requires_grad=True)  # NCHW
    bn = _bn(16)
    assert type(bn_act(bn, x).grad_fn).__name__ != "BnActFunctionBackward"
    xc = x.detach().contiguous(memory_format=CL).requires_grad_()
    bn.eval()
    assert torch.equal(bn_act(bn, xc), F.relu(bn(xc)))  # eval: running statistics, torch's op
    bn.train()
    for register in (bn.register_forward_hook, bn.register_full_backward_hook):
        h = register(lambda *a: None)  # hooks that need the module's own call: torch's op
        assert type(bn_act(bn, xc).grad_fn).__name__ != "BnActFunctionBackward"
        h.remove()
    cpu_kernels.set_enabled(False)
    assert type(bn_act(bn, xc).grad_fn).__name__ != "BnActFunctionBackward"
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn_act(bn, torch.randn(1, 16, 1, 1).contiguous(memory_format=CL))  # torch's error


def test_forward_pre_hooks_see_the_input_as_probes_expect():
    seen = []
    bn = _bn(16)
    bn.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.randn(4, 16, 5, 5).contiguous(memory_format=CL).requires_grad_()
    y = bn_act(bn, x)
    assert len(seen) == 1 and seen[0] is x
    assert type(y.grad_fn).__name__ == "BnActFunctionBackward"


def test_the_ops_refuse_tensors_they_cannot_read():
    ops = cpu_kernels._state["ops"]
    bn = _bn(16)
    nchw = torch.randn(4, 16, 5, 5)
    with pytest.raises(RuntimeError, match="channels_last"):
        ops.bn_act_forward(nchw, bn.weight, bn.bias, None, bn.running_mean, bn.running_var,
                           0.1, 1e-5, True)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.bn_act_forward(nchw.double().contiguous(memory_format=CL), bn.weight, bn.bias, None,
                           bn.running_mean, bn.running_var, 0.1, 1e-5, True)
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.bn_act_forward(nchw.contiguous(memory_format=CL), bn.weight[:8], bn.bias, None,
                           bn.running_mean, bn.running_var, 0.1, 1e-5, True)


@contextlib.contextmanager
def counting_kernel_calls():
    """Count the fused kernel's forward calls: yields a list that grows by one a call."""
    calls = []
    orig = BnActFunction.forward

    def counting(ctx, *a):
        calls.append(1)
        return orig(ctx, *a)

    BnActFunction.forward = staticmethod(counting)
    try:
        yield calls
    finally:
        BnActFunction.forward = staticmethod(orig)


def _train(model, steps=3, precision="fp32"):
    g = torch.Generator().manual_seed(7)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(16, 3, 16, 16, generator=g).to(dtype).contiguous(memory_format=CL)
        y = torch.randint(0, 10, (16,), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.double() for k, v in model.state_dict().items()}


def test_a_resnet_trains_as_close_to_float64_as_with_torchs_ops():
    torch.manual_seed(0)
    base = build_model("resnet20", 10, image_size=16).to(memory_format=CL)
    exact = _train(copy.deepcopy(base).double())
    plain = _train(copy.deepcopy(base))
    model = copy.deepcopy(base)
    assert use_fused_norm_act(model)
    with counting_kernel_calls() as calls:
        fused = _train(model)
    assert len(calls) == 3 * 19  # every BN of ResNet-20, every step

    def err(s):  # worst difference to float64 over the weights, relative to each tensor
        return max(((s[k] - exact[k]).abs().max() / exact[k].abs().max().clamp_min(1e-3)).item()
                   for k in exact if k.endswith("weight"))

    # 3 SGD steps of a 16 px ResNet amplify float32 rounding to ~1e-3 (measured: fused 1.5e-3,
    # torch's ops 8e-3); the fused kernels must stay at least as close to float64 as torch's
    assert err(fused) < 1e-2
    assert err(fused) < 2 * err(plain)


def _fused_steps(model: nn.Module) -> int:
    return sum(type(m) is FusedNormAct for m in model.modules())


@pytest.mark.parametrize("name,steps", [("resnet20", 19), ("plain20", 19), ("vgg11", 8)])
def test_the_builder_swaps_every_norm_relu_step_and_keeps_the_parameters(name, steps):
    torch.manual_seed(0)
    plain = build_model(name, 10)
    torch.manual_seed(0)
    fused = build_model(name, 10, cpu_kernels=True)
    assert _fused_steps(plain) == 0
    assert _fused_steps(fused) == steps
    assert sum(type(m) is NormAct for m in plain.modules()) == steps
    a, b = plain.state_dict(), fused.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_model_without_a_batchnorm_keeps_torchs_step():
    """The kernel computes nn.BatchNorm2d alone: a model of other norms is not swapped."""
    model = build_model("resnet20", 10, norm="group", cpu_kernels=True)
    assert _fused_steps(model) == 0 and sum(type(m) is NormAct for m in model.modules()) == 19


def test_a_model_is_built_plain_where_the_kernels_cannot_be_built(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_state", dict(ops=None, error="no compiler", enabled=True,
                                                    built=False))
    assert _fused_steps(build_model("resnet20", 10, cpu_kernels=True)) == 0


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str,
          train: bool) -> list[torch.Tensor]:
    """One forward (and backward in training): [output, running statistics..., and in training
    the input's and parameters' gradients...]."""
    model.train(train)
    x = x.clone().requires_grad_(train)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = model(x)
    stats = [b for n, b in model.named_buffers() if "running" in n]
    if not train:
        return [out, *stats]
    F.cross_entropy(out.float(), y).backward()
    return [out, *stats, x.grad, *(p.grad for p in model.parameters())]


def _worst(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """The largest difference over the tensors, each relative to the largest value of `want`'s."""
    return max(((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
               for a, b in zip(got, want))


@pytest.mark.parametrize("name,size", [("resnet20", 16), ("vgg11", 32)])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("train", [True, False])
def test_a_fused_model_computes_what_the_plain_model_does(name, size, precision, train):
    """The same weights and batch through the model built plain, built fused, and in float64:
    outputs, running statistics and gradients agree up to float rounding."""
    torch.manual_seed(0)
    plain = build_model(name, 10, image_size=size).to(memory_format=CL)
    fused, double = copy.deepcopy(plain), copy.deepcopy(plain).double()
    assert use_fused_norm_act(fused)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 3, size, size, generator=g).contiguous(memory_format=CL)
    y = torch.randint(0, 10, (8,), generator=g)
    with counting_kernel_calls() as calls:
        got = _step(fused, x, y, precision, train)
    want = _step(plain, x, y, precision, train)
    exact = _step(double, x.double(), y, "fp32", train)
    assert len(calls) == (_fused_steps(fused) if train else 0)  # eval: running statistics
    if not train:  # both run torch's ops on the running statistics
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    elif precision == "fp32":
        # measured: resnet20 fused 1.8e-6 from float64, torch's ops 4.9e-3 (in a gradient);
        # vgg11 both 1.1e-2 (its last stages normalize 2x2 and 1x1 maps of 8 images)
        assert _worst(got, want) < 2e-2
        assert _worst(got, exact) < 2 * _worst(want, exact) + 1e-4
    else:
        # bf16 gradients of a fresh network are far from float64 either way (measured worst:
        # resnet20 fused 0.40, torch's ops 0.45; vgg11 0.70, 0.57); the outputs agree within a
        # few bf16 steps (measured 9e-3)
        assert _worst(got[:1], want[:1]) < 8 * 2 ** -8
        assert _worst(got, exact) < 2 * _worst(want, exact)


def test_resnet_can_still_be_traced_for_folding():
    model = build_model("resnet20", 10, cpu_kernels=True).to(memory_format=CL)
    gm = torch.fx.symbolic_trace(model)
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "n1" in called and "blocks.0.n2" in called


@pytest.mark.parametrize("c,size", [(3, 32), (1, 28)])
def test_batches_match_the_loaders_torch_path_bit_for_bit(c, size):
    g = torch.Generator().manual_seed(c)
    src = torch.randint(0, 256, (50, c, size, size), generator=g, dtype=torch.uint8)
    order, offsets, flips = epoch_plan(50, 3, 1, True, True)
    norm = Normalizer([0.4] * c, [0.25] * c, torch.device("cpu"), CL)
    idx = order[:20]
    want = norm(crop_flip(src[idx], offsets[idx], flips[idx]))
    got = cpu_kernels.crop_flip_normalize(src, idx, offsets[idx], flips[idx], norm.scale,
                                          norm.shift, PAD)
    assert got.is_contiguous(memory_format=CL) and torch.equal(got, want)
    plain = cpu_kernels.crop_flip_normalize(src, torch.arange(5, 15), None, None, norm.scale,
                                            norm.shift, 0)
    assert torch.equal(plain, norm(src[5:15]))
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_kernels.crop_flip_normalize(src, torch.tensor([50]), None, None, norm.scale,
                                        norm.shift, 0)


def test_a_failed_build_falls_back_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_state", dict(ops=None, error=None, enabled=True,
                                                    built=False))
    monkeypatch.setenv("BNLAB_CACHE", str(tmp_path))  # no earlier build to load
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    lines = []
    assert cpu_kernels.prepare(lines.append) is False
    assert len(lines) == 1 and "fused CPU kernels unavailable" in lines[0]
    assert cpu_kernels.describe().startswith("unavailable (")
    assert not cpu_kernels.active()
    x = torch.randn(4, 16, 5, 5).contiguous(memory_format=CL)
    bn = _bn(16)
    assert torch.equal(bn_act(bn, x), F.relu(_bn(16)(x)))  # torch's ops, same values


def test_cpu_kernels_is_an_execution_option_outside_the_run_id():
    cfg = RunConfig()
    assert cfg.cpu_kernels is True
    assert dataclasses.replace(cfg, cpu_kernels=False).run_id() == cfg.run_id()


def test_bench_passes_no_cpu_kernels_to_the_runs(monkeypatch):
    from bnlab import bench, cli

    seen = []
    monkeypatch.setattr(bench, "run_all", lambda a, *r, **k: seen.append(a) or [])
    assert cli.main(["bench", "--no-cpu-kernels", "--variants", "eager"]) == 0
    assert cli.main(["bench", "--variants", "eager"]) == 0
    assert [a.cpu_kernels for a in seen] == [False, True]


def test_the_environments_ninja_is_found_without_activating_it(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    cpu_kernels._ninja_on_path()
    assert shutil.which("ninja") is not None  # the `ninja` dependency's binary


def test_off_the_cpu_a_resnet_runs_the_torch_ops_it_always_ran():
    model = build_model("resnet20", 10).to(device="meta", memory_format=CL)
    out = model(torch.empty(2, 3, 32, 32, device="meta").contiguous(memory_format=CL))
    seen, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            todo += [f for f, _ in fn.next_functions]
    names = {type(f).__name__ for f in seen}
    assert "NativeBatchNormBackward0" in names and "ConstantPadNdBackward0" in names
    assert not names & {"BnActFunctionBackward", "_SubsamplePadBackward"}
