"""Corruptions against independent implementations (scipy, colorsys) and closed forms."""

import colorsys

import numpy as np
import pytest
import torch
from scipy import ndimage

from bnlab.infer.corrupt import CORRUPTIONS, corrupt, gaussian_blur, noise_generator, parameter

pytestmark = pytest.mark.usefixtures("one_thread")


def image(n=2, c=3, size=12, seed=0):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_blur_matches_scipy(severity):
    x = image()
    s = parameter("gaussian_blur", severity, x.shape[-1])
    got = gaussian_blur(x.double(), s)
    ref = np.stack([np.stack([ndimage.gaussian_filter(ch, s, mode="nearest", truncate=4.0)
                              for ch in img]) for img in x.double().numpy()])
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-12)


def test_blur_std_scales_with_image_side():
    assert parameter("gaussian_blur", 2, 64) == pytest.approx(2 * parameter("gaussian_blur", 2, 32))
    assert parameter("gaussian_blur", 5, 224) == 6.0  # ImageNet-C at its own size
    assert parameter("contrast", 1, 224) == 0.4 and parameter("contrast", 1, 32) == 0.75


def test_brightness_matches_colorsys():
    x = image(n=1, size=4)
    x[0, :, 0, 0] = 0.0  # a black pixel: hue and saturation undefined, becomes grey
    for severity in (1, 5):
        s = parameter("brightness", severity, 4)
        got = corrupt(x, "brightness", severity)
        for i in range(4):
            for j in range(4):
                h, sat, v = colorsys.rgb_to_hsv(*x[0, :, i, j].tolist())
                ref = colorsys.hsv_to_rgb(h, sat, min(v + s, 1.0))
                np.testing.assert_allclose(got[0, :, i, j].numpy(), ref, atol=1e-6)


def test_contrast_closed_form():
    x = image(n=1, c=1, size=4)
    m = float(x.mean())
    s = parameter("contrast", 4, 4)
    np.testing.assert_allclose(corrupt(x, "contrast", 4).numpy(),
                               ((x - m) * s + m).numpy(), atol=1e-6)


def test_noise_is_reproducible_and_has_its_std():
    x = torch.full((4, 3, 64, 64), 0.5)
    a = corrupt(x, "gaussian_noise", 3, noise_generator("gaussian_noise", 3))
    b = corrupt(x, "gaussian_noise", 3, noise_generator("gaussian_noise", 3))
    assert torch.equal(a, b)
    s = parameter("gaussian_noise", 3, 64)
    # 49152 draws: the sample std is within 2% of s, the mean within 5 standard errors of 0.5
    assert float((a - 0.5).std()) == pytest.approx(s, rel=0.02)
    assert abs(float(a.mean()) - 0.5) < 5 * s / 49152 ** 0.5


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruptions_stay_in_range_and_grow_with_severity(name):
    x = image(n=2, size=16)
    dist = []
    for s in range(1, 6):
        y = corrupt(x, name, s, noise_generator(name, s))
        assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
        dist.append(float((y - x).abs().mean()))
    assert dist == sorted(dist) and dist[0] > 0


# -- torchvision's transforms: where they agree with ImageNet-C's definitions, and where not --
def test_blur_equals_torchvision_away_from_the_edges_only():
    tf = pytest.importorskip("torchvision.transforms.v2.functional")
    x = image(size=20).double()
    s = 1.0
    r = int(4 * s + 0.5)
    ours, theirs = gaussian_blur(x, s), tf.gaussian_blur(x, [2 * r + 1] * 2, [s, s])
    torch.testing.assert_close(ours[..., r:-r, r:-r], theirs[..., r:-r, r:-r], rtol=0,
                               atol=1e-12)
    # reflection vs repeated edge pixels: a different image at the border
    assert float((ours - theirs).abs().max()) > 1e-3


def test_contrast_equals_torchvision_on_one_channel_only():
    tf = pytest.importorskip("torchvision.transforms.v2.functional")
    grey = image(c=1).double()
    torch.testing.assert_close(corrupt(grey, "contrast", 3),
                               tf.adjust_contrast(grey, parameter("contrast", 3, 12)),
                               rtol=0, atol=1e-12)
    rgb = image().double()
    assert float((corrupt(rgb, "contrast", 3)
                  - tf.adjust_contrast(rgb, parameter("contrast", 3, 12))).abs().max()) > 1e-3


def test_brightness_is_not_torchvision_s_multiplication():
    tf = pytest.importorskip("torchvision.transforms.v2.functional")
    x = image().double()
    s = parameter("brightness", 3, 12)
    assert float((corrupt(x, "brightness", 3) - tf.adjust_brightness(x, 1 + s)).abs().max()) \
        > 1e-2


def test_noise_equals_torchvision_given_the_same_random_numbers():
    """The same computation; ours takes its numbers from an explicit generator."""
    tf = pytest.importorskip("torchvision.transforms.v2.functional")
    x = image()
    s = parameter("gaussian_noise", 4, 12)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        theirs = tf.gaussian_noise(x, 0.0, s)
    ours = corrupt(x, "gaussian_noise", 4, torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-7)
