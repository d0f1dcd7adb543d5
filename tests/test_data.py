import tarfile

import numpy as np
import pytest
import torch
from conftest import write_cifar, write_image_folder, write_mnist

from bnlab.data import Split, load_data
from bnlab.data.bundle import channel_stats
from bnlab.data.loader import MemoryLoader, crop_flip
from bnlab.errors import UserError


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles_roundtrip(tmp_path, name):
    written = write_cifar(tmp_path, name)
    b = load_data(name, tmp_path)
    assert b.num_classes == (10 if name == "cifar10" else 100)
    assert b.train.x.shape == (100 if name == "cifar10" else 20, 3, 32, 32)
    np.testing.assert_array_equal(b.train.x.numpy(), written["train"][0])
    np.testing.assert_array_equal(b.test.y.numpy(), written["test"][1])
    assert b.classes[3] == ("c3" if name == "cifar10" else "f3")


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_files_raw_and_gz(tmp_path, gz, name):
    arrays = write_mnist(tmp_path, gz=gz)
    b = load_data(name, tmp_path)
    x, y = arrays["train-images-idx3-ubyte"]
    assert b.in_channels == 1 and b.image_size == 28
    np.testing.assert_array_equal(b.train.x[:, 0].numpy(), x)
    np.testing.assert_array_equal(b.train.y.numpy(), y)
    assert len(b.test) == 30
    assert b.flip == (name == "fashion-mnist")


def test_idx_torchvision_layout_and_bad_magic(tmp_path):
    write_mnist(tmp_path / "MNIST" / "raw", gz=False)
    assert len(load_data("mnist", tmp_path).train) == 60
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x0d\x01abcd")
    with pytest.raises(UserError, match="bad magic"):
        load_data("mnist", tmp_path)


def test_small_image_folder_decoded_once_exact_pixels(tmp_path, monkeypatch):
    pixels = write_image_folder(tmp_path / "ds", size=16, eval_name="test")
    b = load_data(f"imagefolder:{tmp_path / 'ds'}")
    assert not b.streamed and b.classes == ["a", "b", "c"] and b.image_size == 16
    first = str(tmp_path / "ds" / "train" / "a" / "0000.png")
    np.testing.assert_array_equal(b.train.x[0].permute(1, 2, 0).numpy(), pixels[first])
    assert b.train.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # second load comes from the cache: decoding must not be called again
    import bnlab.data.imagefolder as imf

    monkeypatch.setattr(imf, "_decode_all", lambda *a: (_ for _ in ()).throw(AssertionError))
    b2 = load_data(f"imagefolder:{tmp_path / 'ds'}")
    assert torch.equal(b2.train.x, b.train.x)


def test_image_folder_from_tar_archive(tmp_path):
    write_image_folder(tmp_path / "src" / "myset", size=8)
    archive = tmp_path / "myset.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "src" / "myset", arcname="myset")
    b = load_data(f"imagefolder:{archive}")
    assert len(b.train) == 12 and len(b.test) == 12


def test_large_image_folder_streams_with_transforms(tmp_path):
    write_image_folder(tmp_path / "big", size=80, n_per_class=2, fmt="JPEG")
    b = load_data(f"imagefolder:{tmp_path / 'big'}")
    assert b.streamed and b.image_size == 224
    x, y = b.test[0]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == 0
    x_train, _ = b.train[0]
    assert x_train.shape == (3, 224, 224)


def test_channel_stats_match_float64_numpy():
    x = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    mean, std = channel_stats(x)
    ref = x.numpy().astype(np.float64) / 255
    np.testing.assert_allclose(mean, ref.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, ref.std(axis=(0, 2, 3)), rtol=1e-10)


def test_crop_flip_matches_per_image_reference():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (6, 3, 10, 12), dtype=torch.uint8, generator=g)
    offsets = torch.randint(0, 9, (6, 2), generator=g)
    flips = torch.rand(6, generator=g) < 0.5
    out = crop_flip(x, offsets, flips)
    for i in range(6):
        padded = np.zeros((3, 18, 20), dtype=np.uint8)
        padded[:, 4:14, 4:16] = x[i].numpy()
        r, c = offsets[i].tolist()
        ref = padded[:, r:r + 10, c:c + 12]
        if flips[i]:
            ref = ref[:, :, ::-1]
        np.testing.assert_array_equal(out[i].numpy(), ref)


def test_memory_loader_normalizes_and_orders_by_seed_and_epoch():
    b = load_data("synthetic")
    loader = MemoryLoader(b.train, b, 100, torch.device("cpu"), True, False, seed=5)
    (x1, y1), (x2, y2) = next(iter(loader.epoch(1))), next(iter(loader.epoch(1)))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(next(iter(loader.epoch(2)))[1], y1)
    assert len(loader) == len(b.train) // 100  # the partial batch is dropped in training
    test_loader = MemoryLoader(b.test, b, 100, torch.device("cpu"), False, False)
    xs = torch.cat([x for x, _ in test_loader.epoch(0)])
    ref = (b.test.x.double() / 255 - torch.tensor(b.mean).view(1, -1, 1, 1)) / torch.tensor(
        b.std).view(1, -1, 1, 1)
    torch.testing.assert_close(xs.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train,augment", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("chunk", [1, 3, 32])
def test_memory_loader_chunks_give_the_batches_of_one_at_a_time(monkeypatch, train, augment,
                                                                chunk):
    """Batches prepared a chunk at a time equal batches prepared one by one from the same
    epoch plan (the reference below), bit for bit, in the same layout; training drops the
    partial last batch, evaluation keeps it."""
    import bnlab.data.loader as L

    b = load_data("synthetic", limit_train=1000, limit_test=530)
    monkeypatch.setattr(L, "MAX_CHUNK_BATCHES", chunk)
    split = b.train if train else b.test
    loader = MemoryLoader(split, b, 128, torch.device("cpu"), train, augment, seed=3,
                          memory_format=torch.channels_last)
    got = list(loader.epoch(2))
    n = len(split.y)
    if train:
        order, offsets, flips = L.epoch_plan(n, 3, 2, augment, b.flip)
    else:
        order = torch.arange(n)
    steps = n // 128 if train else -(-n // 128)
    assert len(got) == len(loader) == steps
    for i, (x, y) in enumerate(got):
        idx = order[i * 128:(i + 1) * 128]
        ref = split.x[idx]
        if augment:
            ref = crop_flip(ref, offsets[idx], flips[idx])
        ref = loader.norm(ref)
        assert torch.equal(x, ref) and torch.equal(y, split.y[idx])
        assert x.is_contiguous(memory_format=torch.channels_last)
    assert sum(len(y) for _, y in got) == (n // 128 * 128 if train else n)


def test_limits_take_a_fixed_mixed_subset():
    b = load_data("synthetic", limit_train=100, limit_test=50)
    assert len(b.train) == 100 and len(b.test) == 50
    again = load_data("synthetic", limit_train=100)
    assert torch.equal(b.train.y, again.train.y)
    assert len(set(b.train.y.tolist())) == 10


def test_split_subset_type():
    s = Split(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.arange(4))
    assert len(s.subset(torch.tensor([1, 3]))) == 2


# -- the validation split ------------------------------------------------------------------------
def test_validation_split_is_stratified_fixed_and_disjoint():
    from bnlab.data.bundle import hold_out, stratified_hold_out

    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    keep, held = stratified_hold_out(y, 0.1)
    assert sorted(torch.bincount(y[held]).tolist()) == [2, 3, 5]  # round(0.1 * n) per class
    assert len(keep) + len(held) == 100 and not set(keep.tolist()) & set(held.tolist())
    assert torch.equal(held, stratified_hold_out(y, 0.1)[1])  # the same split every time
    from bnlab.data.synthetic import make_synthetic

    b = make_synthetic(n_train=200, n_test=50)  # 20 images of each of 10 classes
    v = hold_out(b, 0.25)
    assert len(v.val) == 50 and len(v.train) == 150 and v.test is b.test
    rows = {tuple(r.flatten()[:64].tolist()) for r in v.val.x}
    assert not rows & {tuple(r.flatten()[:64].tolist()) for r in v.train.x}
    assert torch.bincount(v.val.y).tolist() == [5] * 10
    limited = load_data("synthetic", limit_train=300)  # held out after limit_train
    assert torch.equal(load_data("synthetic", limit_train=300, val_fraction=0.25).val.x,
                       hold_out(limited, 0.25).val.x)
    assert hold_out(b, 0.0) is b


def test_streamed_validation_images_use_the_evaluation_transform(tmp_path):
    """A streamed training set keeps its augmenting transform; the images held out from it are
    read with the test set's transform (never augmented)."""
    from PIL import Image

    from bnlab.data.bundle import labels_of

    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(10 if split == "train" else 2):
                Image.new("RGB", (80, 80), (40 * i, 9, 9)).save(tmp_path / split / c / f"{i}.jpg")
    b = load_data(f"imagefolder:{tmp_path}", image_size=64, val_fraction=0.2)
    assert len(b.train) == 16 and len(b.val) == 4 and labels_of(b.val).tolist() == [0, 0, 1, 1]
    assert b.val.transform is b.test.transform and b.train.dataset.transform is not \
        b.test.transform
    x, _ = b.val[0]
    assert tuple(x.shape) == (3, 64, 64)
