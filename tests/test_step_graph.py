"""Whole-step CUDA graphs (bnlab.fast.step_graph): a graphed run follows the run without the graph.

The comparisons need a CUDA GPU and are skipped without one; benchmarks/gpu_check.sh runs this
file first on the GPU machine.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from bnlab.config import RunConfig
from bnlab.data.synthetic import make_synthetic
from bnlab.fast import step_graph
from bnlab.store import Store
from bnlab.train import train_run
from bnlab.train.packed import train_packed
from bnlab.train.record import checkpoint_state

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_step_graph_refuses_a_device_without_cuda():
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        step_graph.StepGraph(lambda: (), torch.device("cpu"))
    assert not step_graph.supported(torch.device("cpu"))


def test_checkpoint_stores_a_device_tensor_lr_as_a_number():
    model = torch.nn.Linear(3, 2)
    lr = torch.full((), 0.05, dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for g in opt.param_groups:
        g["lr"] = lr
    state = checkpoint_state(RunConfig(), model, opt, 1, 10, 1.0, {}, torch.device("cpu"))
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [pytest.approx(0.05)]
    assert all(type(g["lr"]) is float for g in state["optimizer"]["param_groups"])
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)  # the live optimizer keeps it


class _Recorder(step_graph.StepGraph):
    made: list[step_graph.StepGraph] = []

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        _Recorder.made.append(self)


def _cfg(**over) -> RunConfig:
    # warm-up over half of the first epoch and the step schedule: the learning rate changes
    # on most steps, so a graph that kept the rate it was captured with would drift at once
    base = dict(dataset="synthetic", model="resnet20", batch_size=64, epochs=3, lr=0.1,
                warmup_epochs=0.5, schedule="step", device="cuda", eval_batch_size=256,
                seed=3)
    return dataclasses.replace(RunConfig(), **{**base, **over})


def _train(cfgs: list[RunConfig], out: Path, bundle, graph: bool, monkeypatch, lines) -> list:
    _Recorder.made = []
    monkeypatch.setattr(step_graph, "StepGraph", _Recorder)
    cfgs = [dataclasses.replace(c, cuda_graph=graph) for c in cfgs]
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    if len(cfgs) == 1:
        train_run(cfgs[0], out, log=lines.append, bundle=bundle)
    else:
        train_packed(cfgs, out, resume=False, log=lines.append, bundle=bundle)
    if graph:
        assert _Recorder.made and all(g.captured for g in _Recorder.made), lines
    else:
        assert not _Recorder.made
    store = Store(out)
    return [(store.run(c.run_id()).metrics(), store.run(c.run_id()).load_checkpoint())
            for c in cfgs]


def _assert_same_runs(a: list, b: list, rtol: float) -> None:
    for (rows_a, ck_a), (rows_b, ck_b) in zip(a, b):
        assert len(rows_a) == len(rows_b)
        for ra, rb in zip(rows_a, rows_b):
            for key in ("train_loss", "test_loss", "lr"):
                assert math.isclose(ra[key], rb[key], rel_tol=rtol, abs_tol=1e-6), (key, ra, rb)
            assert abs(ra["test_acc"] - rb["test_acc"]) <= 0.01, (ra, rb)
        for name, t in ck_a["model"].items():
            if t.is_floating_point():
                assert torch.allclose(t, ck_b["model"][name], rtol=rtol, atol=1e-5), name
            else:
                assert torch.equal(t, ck_b["model"][name]), name
        assert ck_a["step"] == ck_b["step"]


@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_graphed_run_follows_the_run_without_graph(tmp_path, monkeypatch, precision):
    bundle = make_synthetic(n_train=64 * 10, n_test=300)
    cfg = _cfg(precision=precision)
    lines: list[str] = []
    with_graph = _train([cfg], tmp_path / "graph", bundle, True, monkeypatch, lines)
    without = _train([cfg], tmp_path / "plain", bundle, False, monkeypatch, lines)
    assert not any("capture" in line and "failed" in line for line in lines), lines
    _assert_same_runs(with_graph, without, 1e-3 if precision == "fp32" else 2e-2)


@cuda
def test_a_graphed_mixed_pack_follows_the_pack_without_graph(tmp_path, monkeypatch):
    bundle = make_synthetic(n_train=64 * 10, n_test=300)
    cfgs = [_cfg(seed=0), _cfg(seed=1, lr=0.05), _cfg(seed=2, norm="none", lr=0.01)]
    lines: list[str] = []
    with_graph = _train(cfgs, tmp_path / "graph", bundle, True, monkeypatch, lines)
    without = _train(cfgs, tmp_path / "plain", bundle, False, monkeypatch, lines)
    assert not any("capture" in line and "failed" in line for line in lines), lines
    _assert_same_runs(with_graph, without, 1e-3)



def test_cuda_graph_is_an_execution_option_outside_the_run_id():
    assert RunConfig(cuda_graph=False).run_id() == RunConfig().run_id()
    assert RunConfig().cuda_graph is True


def test_a_graphed_step_compiles_the_model_without_its_own_cuda_graphs(monkeypatch):
    from bnlab.fast import accel

    modes = []
    monkeypatch.setattr(accel, "compile_model", lambda m, d, mode: modes.append(mode) or m)
    model, cuda = torch.nn.Linear(2, 2), torch.device("cuda")
    accel.prepare(model, cuda, True)
    accel.prepare(model, cuda, True, whole_step_graph=True)
    accel.prepare(model, cuda, True, mode="max-autotune", whole_step_graph=True)
    accel.prepare(model, torch.device("cpu"), True, whole_step_graph=True)
    assert modes == ["reduce-overhead", "default", "max-autotune-no-cudagraphs", "default"]
    assert accel.prepare(model, cuda, False, whole_step_graph=True) is model


def test_bench_passes_no_cuda_graph_to_the_runs(monkeypatch):
    from bnlab import bench, cli

    seen = []
    monkeypatch.setattr(bench, "run_all", lambda a, *rest, **kw: seen.append(a) or [])
    assert cli.main(["bench", "--variants", "eager", "--no-cuda-graph"]) == 0
    assert cli.main(["bench", "--variants", "eager"]) == 0
    assert [a.cuda_graph for a in seen] == [False, True]
