"""Common image corruptions at 5 severities, after ImageNet-C (Hendrycks & Dietterich 2019).

All four act on float images in [0, 1] of shape (N, C, H, W) and return images in [0, 1]:

    gaussian_noise  x + N(0, s^2) per pixel and channel, clipped
    gaussian_blur   separable Gaussian filter of std s px, kernel radius ceil(4 s), edges
                    replicated (scipy.ndimage's mode 'nearest', truncate 4)
    contrast        (x - m) * s + m, with m the per-image, per-channel mean over pixels
    brightness      HSV value v -> min(v + s, 1), hue and saturation kept; in RGB this is
                    x * v' / v where v = max_c x_c > 0 (and v' gray where v = 0); on grey
                    images it is min(x + s, 1)

These are ImageNet-C's definitions (its code: skimage's Gaussian filter with mode 'nearest',
per-channel means for contrast, the HSV value for brightness). torchvision's functional
transforms compute other things, so each is kept here, with the reason at its function; where
they agree (the blur away from the edges, contrast on one-channel images) tests/test_corrupt.py
checks ours against torchvision's.

Severity parameters s (index 1..5). Images of at most 64 px use the CIFAR-10-C values; larger
ones the ImageNet-C values. The blur std is given for the reference size (32 px for CIFAR-10-C,
224 px for ImageNet-C) and scaled linearly with the image side, so the blur covers the same
fraction of the image at any resolution; noise, contrast and brightness are per-pixel and need
no scaling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SEVERITIES = 5
SMALL = {  # CIFAR-10-C (Hendrycks & Dietterich 2019, make_cifar_c), reference 32 px
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
}
LARGE = {  # ImageNet-C, reference 224 px
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "gaussian_blur": (1.0, 2.0, 3.0, 4.0, 6.0),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
}
CORRUPTIONS = tuple(SMALL)
NOISE_SEED = 20190328  # one fixed noise stream, so every model sees the same corrupted images


def parameter(name: str, severity: int, image_size: int) -> float:
    """The parameter s of corruption `name` at `severity` (1..5) for images of `image_size` px."""
    table, ref = (SMALL, 32) if image_size <= 64 else (LARGE, 224)
    s = table[name][severity - 1]
    return s * image_size / ref if name == "gaussian_blur" else s


def gaussian_noise(x: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    # torchvision's gaussian_noise adds the same N(0, std^2) but draws from the global random
    # state of the image's device; an explicit CPU generator gives every model, on any device,
    # the same noise without touching anyone's random state.
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
    return (x + std * noise).clamp(0.0, 1.0)


def gaussian_kernel(std: float, truncate: float = 4.0) -> torch.Tensor:
    """Normalized 1-d Gaussian weights exp(-k^2 / (2 std^2)) for k = -r..r, r = int(truncate*std
    + 0.5) (scipy.ndimage's radius)."""
    r = int(truncate * std + 0.5)
    k = torch.arange(-r, r + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (k / std) ** 2)
    return w / w.sum()


def gaussian_blur(x: torch.Tensor, std: float) -> torch.Tensor:
    # torchvision's gaussian_blur pads by reflection where ImageNet-C repeats the edge pixels
    # (a different image near the border), and convolves with the full (2r+1)^2 kernel where
    # the separable filter needs 2 (2r+1) multiply-adds per pixel (at ImageNet-C's severity 5,
    # r = 24: 2401 against 98).
    w = gaussian_kernel(std).to(device=x.device, dtype=x.dtype)
    r = (len(w) - 1) // 2
    n, c, h, wd = x.shape
    y = x.reshape(n * c, 1, h, wd)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), w.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), w.view(1, 1, -1, 1))
    return y.reshape(n, c, h, wd).clamp(0.0, 1.0)


def contrast(x: torch.Tensor, factor: float) -> torch.Tensor:
    # torchvision's adjust_contrast blends towards one mean per image, that of its luma
    # (0.299 R + 0.587 G + 0.114 B); ImageNet-C uses each channel's own mean. They agree on
    # one-channel images only.
    m = x.mean(dim=(2, 3), keepdim=True)
    return ((x - m) * factor + m).clamp(0.0, 1.0)


def brightness(x: torch.Tensor, shift: float) -> torch.Tensor:
    # torchvision's adjust_brightness multiplies every pixel by a factor; ImageNet-C adds the
    # shift to the HSV value, which keeps hue and saturation and lifts dark pixels as well.
    if x.shape[1] == 1:
        return (x + shift).clamp(0.0, 1.0)
    v = x.max(dim=1, keepdim=True).values
    v2 = (v + shift).clamp(max=1.0)
    scaled = x * (v2 / v.clamp(min=1e-12))
    return torch.where(v > 0, scaled, v2.expand_as(x)).clamp(0.0, 1.0)


def corrupt(x: torch.Tensor, name: str, severity: int, generator: torch.Generator | None = None
            ) -> torch.Tensor:
    """Apply corruption `name` at `severity` to images x in [0, 1] (N, C, H, W)."""
    s = parameter(name, severity, x.shape[-1])
    if name == "gaussian_noise":
        if generator is None:
            generator = torch.Generator().manual_seed(NOISE_SEED)
        return gaussian_noise(x, s, generator)
    if name == "gaussian_blur":
        return gaussian_blur(x, s)
    if name == "contrast":
        return contrast(x, s)
    if name == "brightness":
        return brightness(x, s)
    raise ValueError(f"unknown corruption {name!r}")


def noise_generator(name: str, severity: int) -> torch.Generator:
    """The generator of one (corruption, severity) pass over the test set."""
    return torch.Generator().manual_seed(NOISE_SEED + 1000 * CORRUPTIONS.index(name) + severity)


__all__ = ["CORRUPTIONS", "SEVERITIES", "corrupt", "noise_generator", "parameter",
           "gaussian_kernel"]
