"""Activation statistics of the probes: pooled over a whole tensor, and per unit.

Percentiles. p15/p50/p85 are torch.quantile's (linear interpolation between order statistics)
of all elements when a tensor holds at most MAX_QUANTILE_ELEMENTS of them; of a larger tensor
they are taken on MAX_QUANTILE_ELEMENTS positions drawn uniformly at random, with replacement,
over all positions. Each draw is then an independent draw from the tensor's own distribution,
so the sample's q-quantile sits at a level of the whole tensor's distribution within
q ± sqrt(q (1 - q) / n) (one standard deviation of the binomial count of draws below the
q-quantile, n = MAX_QUANTILE_ELEMENTS): ±0.0014 at q = 0.15 or 0.85, ±0.0020 at q = 0.5.
A fixed stride would not do: in an NCHW tensor whose element count is a multiple of the stride
times W it reads the same columns (or channels) again and again.

The draws come from a torch.Generator seeded from (run seed, step, layer), never from torch's
global generator, so a probed run draws the same dropout masks and data order as an unprobed one
and two runs with the same seed record the same values.

Units. A unit of a (N, C) activation is one of its C features; of an (N, C, H, W) one a channel,
all N*H*W values of it (as a BN layer normalizes it). UNITS_PER_LAYER units per layer are chosen
once from the layer's name and width by a random permutation of the channels (choose_units), so
every run of a study (every arm and seed, a resumed run) follows the same unit indices.
"""

from __future__ import annotations

import hashlib

import torch

MAX_QUANTILE_ELEMENTS = 2 ** 16  # elements above which percentiles come from a random sample
QUANTILES = (0.15, 0.50, 0.85)
PERCENTILE_NAMES = ("p15", "p50", "p85")
UNITS_PER_LAYER = 3  # units with their own percentiles per probed layer


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from the parts' repr (Python's hash() of a str changes between processes)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def quantiles(v: torch.Tensor, gen: torch.Generator) -> list[float]:
    """QUANTILES of the 1-d float tensor v: exact, or on a uniform random sample (module doc)."""
    if v.numel() > MAX_QUANTILE_ELEMENTS:
        idx = torch.randint(v.numel(), (MAX_QUANTILE_ELEMENTS,), generator=gen, device=v.device)
        v = v[idx]
    q = torch.quantile(v, torch.tensor(QUANTILES, dtype=v.dtype, device=v.device))
    return [float(x) for x in q]


def activation_stats(t: torch.Tensor, gen: torch.Generator | None = None) -> dict[str, float]:
    """act_mean, act_std (population) and act_p15/p50/p85 of all elements of t; `gen` draws the
    sample of a large tensor (a generator seeded 0 when None)."""
    v = t.detach().float().flatten()
    mean = v.mean()
    std = ((v - mean) ** 2).mean().sqrt()
    gen = generator(0, v.device) if gen is None else gen
    out = {"act_mean": float(mean), "act_std": float(std)}
    out.update({f"act_{n}": q for n, q in zip(PERCENTILE_NAMES, quantiles(v, gen))})
    return out


def unit_values(t: torch.Tensor, units: list[int]) -> torch.Tensor:
    """(len(units), N*H*W): the values of each unit of an (N, C, ...) activation, one row each."""
    picked = t.detach()[:, units].float()
    return picked.transpose(0, 1).reshape(len(units), -1)


def unit_stats(t: torch.Tensor, units: list[int],
               gen: torch.Generator) -> dict[int, dict[str, float]]:
    """unit -> {"unit_p15", "unit_p50", "unit_p85"} of each unit's values (t is (N, C, ...))."""
    rows = unit_values(t, units)
    return {u: {f"unit_{n}": q for n, q in zip(PERCENTILE_NAMES, quantiles(row, gen))}
            for u, row in zip(units, rows)}


def choose_units(layer: str, n_units: int, k: int = UNITS_PER_LAYER) -> list[int]:
    """k of the n_units unit indices (all when n_units <= k), fixed by the layer's name and
    width alone, sorted: every seed and arm of a study follows the same units, so their curves
    overlay (in TensorBoard, one tag per unit)."""
    perm = torch.randperm(n_units, generator=generator(stable_seed("units", layer)))
    return sorted(int(u) for u in perm[:k])
