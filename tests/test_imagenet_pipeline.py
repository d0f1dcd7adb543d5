"""ImageNet-style streaming at a chosen crop size, the recipe's transforms, and the CLI pieces
of data-parallel training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_image_folder
from PIL import Image

from bnlab.api.runs import _train_argv
from bnlab.cli import build_parser, run_overrides
from bnlab.config import load
from bnlab.data import load_data
from bnlab.data.imagefolder import large_transforms
from bnlab.errors import UserError


def test_image_size_sets_crop_of_streamed_images(tmp_path):
    write_image_folder(tmp_path / "big", size=80, n_per_class=2, fmt="JPEG")
    b = load_data(f"imagefolder:{tmp_path / 'big'}", image_size=48)
    assert b.streamed and b.image_size == 48
    assert b.train[0][0].shape == (3, 48, 48) and b.test[0][0].shape == (3, 48, 48)


def test_eval_transform_is_resize_then_center_crop():
    # 300x200 image: Resize(256) scales the short side to 256 (-> 384x256), CenterCrop(224)
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    im = Image.fromarray(a)
    got = large_transforms((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), train=False, augment=True)(im)
    ref = np.asarray(im.resize((384, 256), Image.BILINEAR), dtype=np.float32) / 255
    top, left = (256 - 224) // 2, (384 - 224) // 2
    ref = ref[top:top + 224, left:left + 224].transpose(2, 0, 1)
    assert got.shape == (3, 224, 224)
    # torchvision resizes with antialiasing like PIL; allow the rounding of the two paths
    assert np.abs(got.numpy() - ref).mean() < 2 / 255


def test_train_transform_is_random_resized_crop_and_flip():
    tf = large_transforms((0.0,) * 3, (1.0,) * 3, train=True, augment=True, size=32)
    names = [type(t).__name__ for t in tf.transforms]
    assert names[:2] == ["RandomResizedCrop", "RandomHorizontalFlip"]
    assert tf.transforms[0].size == (32, 32)


def test_imagenet_name_says_how_to_point_at_a_copy():
    with pytest.raises(UserError, match="data-map imagenet=imagefolder:PATH"):
        load_data("imagenet")


def test_nproc_argv_round_trip():
    argv = ["train", "--nproc", "2", "--out", "/tmp/o", "--resume", "--dataset", "synthetic",
            "--no-augment", "--norm-options", '{"momentum": 0.2}', "--batch-size", "64"]
    args = build_parser().parse_args(argv)
    inner = _train_argv(load(None, run_overrides(args)), args.out, args.resume)
    assert "--nproc" not in inner
    again = build_parser().parse_args(["train", *inner])
    assert (again.out, again.resume, again.nproc) == ("/tmp/o", True, 0)
    assert load(None, run_overrides(again)) == load(None, run_overrides(args))


def test_batch_not_divisible_by_processes_is_refused():
    from bnlab.train.distributed import Context, DistEnv

    ctx = Context(DistEnv(0, 3, 0, launched=True), torch.device("cpu"))
    with pytest.raises(UserError, match="not divisible by the 3 processes"):
        ctx.check_batch(128)
    ctx.check_batch(129)


@pytest.mark.parametrize("arch,blocks,m", [("resnet18", 8, 2), ("resnet50", 16, 3)])
def test_fixup_torchvision_scales_and_zeroes(arch, blocks, m):
    from bnlab.models import build_model
    from bnlab.models.imagenet import FixupBlock

    torch.manual_seed(0)
    ref = build_model(arch, 10, norm="none")
    torch.manual_seed(0)
    model = build_model(arch, 10, norm="none", init="fixup")
    fixed = [b for b in model.modules() if isinstance(b, FixupBlock)]
    assert len(fixed) == blocks and all(b.depth == m for b in fixed)
    factor = blocks ** (-1.0 / (2 * m - 2))  # 8^(-1/2) for ResNet-18, 16^(-1/4) for ResNet-50
    ref_p, got_p = dict(ref.named_parameters()), dict(model.named_parameters())
    for name, p in got_p.items():
        last = f"conv{m}.weight"
        if name.endswith(last) and "layer" in name:
            assert torch.count_nonzero(p) == 0, name
        elif "layer" in name and ".conv" in name and name.endswith("weight"):
            torch.testing.assert_close(p, ref_p[name] * factor, msg=name)
    assert torch.count_nonzero(model.classifier.weight) == 0
    # at initialization every block is relu(shortcut(x)): its branch contributes nothing
    x = torch.randn(2, 64 if m == 2 else 256, 8, 8)
    with torch.no_grad():
        b = model.net.layer1[1]
        torch.testing.assert_close(b(x), torch.relu(x))


@pytest.mark.parametrize("name,per_device", [("imagenet", 8), ("imagenette", 1)])
def test_builtin_scale_studies_expand(name, per_device):
    from bnlab.study.spec import expand, load_spec, parse_data_map

    plan = expand(load_spec(name), [], [],
                  parse_data_map([f"{name}=imagefolder:/data/{name}"]))
    cfgs = [r.cfg for r in plan.runs]
    assert len(cfgs) == 15
    assert {c.norm for c in cfgs} == {"bn", "group", "none"}
    assert all(c.model == "resnet50" and c.lr_scaling == "linear" for c in cfgs)
    # Wu & He's per-GPU batches 32 ... 2
    assert sorted({c.batch_size // per_device for c in cfgs}) == [2, 4, 8, 16, 32]
    assert all((c.init == "fixup") == (c.norm == "none") for c in cfgs)
    assert all(c.norm_options == {"groups": 32} for c in cfgs if c.norm == "group")
    assert all(c.dataset == f"imagefolder:/data/{name}" for c in cfgs)


def test_every_option_survives_the_flags_torchrun_gets():
    # the API hands the whole resolved config to the torchrun processes as flags
    from bnlab.config import from_mapping, to_flags

    cfg = from_mapping({"dataset": "synthetic", "norm": "gn", "augment": False, "lr": 0.037,
                        "norm_options": {"groups": 4}, "init": "normal",
                        "init_options": {"std": 0.05}, "val_fraction": 0.1, "seed": 7})
    args = build_parser().parse_args(["train", *to_flags(cfg.to_dict())])
    assert load(None, run_overrides(args)) == cfg


@pytest.mark.parametrize("flags,expected", [
    (["--batch-size", "128"], "batch_size 128 is not divisible by the 3 processes"),
    (["--batch-size", "129", "--dataset", "cifar10", "--data-dir", "{missing}"], "{missing}"),
])
def test_nproc_mistakes_are_one_line_before_torchrun_starts(flags, expected, tmp_path, capsys,
                                                           monkeypatch):
    import subprocess

    from bnlab.cli import main

    def no_torchrun(*a, **k):
        raise AssertionError("torchrun started")

    monkeypatch.setattr(subprocess, "run", no_torchrun)
    missing = str(tmp_path / "missing")
    argv = ["train", "--nproc", "3", "--dataset", "synthetic", "--device", "cpu",
            "--out", str(tmp_path / "o")] + [f.format(missing=missing) for f in flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected.format(missing=missing) in err[0]
