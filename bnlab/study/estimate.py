"""How long a study takes, from measured throughput: per run, images to process over measured
images per second, on each device class bnlab has been measured on.

A run processes, per epoch, its training images and its evaluation images (test and
validation), an evaluation image counted as EVAL_COST of a training image (a forward pass
without backward). Its seconds are those images over the throughput measured for its model
family on the device class; on a GPU the runs a study would pack (bnlab.train.packed) take the
packed rate, counted in model-images per second. A model family without a measurement on a
device class gets no estimate there ("unmeasured"), never a guess. CIFAR ResNets other than
ResNet-20 are scaled from ResNet-20's measurement by their number of weight layers, ResNet-50
from ResNet-18's by their multiply-adds, and images of another side than the measured one by
their area; such estimates are marked as scaled. The estimate is of training and evaluation:
decoding a dataset the first time, building the CPU kernels, start-up and the analysis after
the runs are extra.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from bnlab.config import RunConfig
from bnlab.models.names import DEPTHS
from bnlab.train.packing import pack_groups

EVAL_COST = 1 / 3  # a forward pass of an evaluation image, in training images
PROBE_STEP_COST = 20  # training steps a probe step costs (docs/probes.md: 25.2 s vs 1.25 s)
# CPU time per training image relative to fp32 BN, measured on the idle 2-core CPU with
# `bnlab train` (ResNet-20, batch 128, one epoch of 6,400 CIFAR-10 images): BN 926 images/s in
# fp32 and 1,339 in bf16. Fixup against BN, both bf16: the unprobed runs of `quick` measured
# from a fresh clone (docs/results.md), Fixup 48.1 and 48.4 s, BN 54.5 and 60.8 s (once its
# scalars kept the activations in bf16; before, Fixup cost 1,339 / 789 = 1.70 times BN)
CPU_FACTORS = {"bf16": 926 / 1339, "fixup": 48.25 / 57.65}
MEASURED_ON = {"cpu": "a 2-core x86 CPU (AVX-512)", "gpu": "one NVIDIA H200"}

# the standard datasets: (training images, test images, side in px)
SIZES = {"cifar10": (50_000, 10_000, 32), "cifar100": (50_000, 10_000, 32),
         "mnist": (60_000, 10_000, 28), "fashion-mnist": (60_000, 10_000, 28),
         "synthetic": (1024, 512, 32)}
LARGE_SIDE = 224  # streamed images are cropped to image_size, default 224 px
# CIFAR VGG multiply-adds per 32 px image, in millions (bnlab.models.vgg's channel plans)
VGG_MACS = {"vgg11": 153, "vgg13": 229, "vgg16": 313, "vgg19": 399}
VGG16_PER_RESNET20 = 1.85  # CPU time per image, measured with bnlab bench (eager fp32, 2 cores)


MEASURED_SIDE = {"cifar-resnet": 32, "cifar-vgg": 32, "mlp": 28, "imagenet-resnet": 224}


@dataclass(frozen=True)
class Rate:
    """Measured images per second of one run (or model-images per second of a pack)."""

    images_per_s: float
    batch: int  # the batch it was measured at: per-step costs make other batches another rate
    source: str


# (model family, device class) -> lone-run rate; each number is a measurement, its source named
LONE = {
    ("cifar-resnet", "cpu"): Rate(
        1050, 128, "ResNet-20, batch 128, fp32 with the fused CPU kernels: 4 runs of 5,000 "
        "images x 4 epochs (+ 2,000 test images an epoch) in 20-23 s each (an earlier, "
        "4-epoch recipe of the quick study)"),
    ("cifar-resnet", "gpu"): Rate(
        55_800, 128, "ResNet-20, batch 128, bf16, one CUDA graph per step (docs/speed.md, "
        "bnlab bench, training steps)"),
    ("cifar-vgg", "cpu"): Rate(
        1050 / VGG16_PER_RESNET20, 128, "VGG-16: 1.85 times ResNet-20's CPU time per image "
        "(bnlab bench, eager fp32), on ResNet-20's rate above"),
    ("mlp", "cpu"): Rate(
        28_600, 60, "mlp3x100 on MNIST, batch 60, probes every 500 steps: 2 runs of 50 epochs "
        "in 3.5 minutes (bn-paper-mnist)"),
    ("imagenet-resnet", "cpu"): Rate(
        5.5, 32, "ResNet-18 at 224 px, batch 32, on a loaded 2-core CPU (1,000 Imagenette "
        "images)"),
}
# probed runs on a GPU run without the whole-step graph (a probe step is not capturable)
NO_GRAPH = {
    ("cifar-resnet", "gpu"): Rate(
        10_910, 128, "ResNet-20, batch 128, bf16, eager without the CUDA graph (docs/speed.md); "
        "the probe steps themselves are not counted"),
}
PACKED = {
    ("cifar-resnet", "gpu"): Rate(
        92_000, 128, "6 ResNet-20 runs in one pack, bf16, 30 epochs of CIFAR-10, training and "
        "per-epoch evaluation: 104 s (docs/speed.md)"),
}


def family(model: str) -> tuple[str, float]:
    """(model family, cost relative to the family's measured model)."""
    depth = DEPTHS.get(model) or DEPTHS.get(model.replace("plain", "resnet"))
    if depth is not None:  # a plain net has a ResNet's layers without the shortcuts
        return "cifar-resnet", (depth - 2) / (DEPTHS["resnet20"] - 2)
    if model in VGG_MACS:
        return "cifar-vgg", VGG_MACS[model] / VGG_MACS["vgg16"]
    if model.startswith("mlp"):
        return "mlp", 1.0
    if model == "resnet18":
        return "imagenet-resnet", 1.0
    if model == "resnet50":
        return "imagenet-resnet", 4.1 / 1.8  # GFLOPs per 224 px image, ResNet-50 / ResNet-18
    return model, 1.0


def dataset_size(cfg: RunConfig, sizes: dict[str, tuple]) -> tuple[int, int, int] | None:
    """(training images, test images, side in px the model sees) of a run's dataset."""
    known = sizes.get(cfg.dataset) or SIZES.get(cfg.dataset)
    if known is None:
        return None
    n_train, n_test = known[:2]
    side = known[2] if len(known) > 2 else LARGE_SIDE
    if side > 64:  # streamed: cropped to image_size
        side = cfg.image_size or LARGE_SIDE
    return n_train, n_test, side


def images(cfg: RunConfig, sizes: dict[str, tuple]) -> float | None:
    """Training-image equivalents of a whole run, or None for a dataset of unknown size."""
    known = dataset_size(cfg, sizes)
    if known is None:
        return None
    n_train, n_test, _ = known
    if cfg.limit_train:
        n_train = min(n_train, cfg.limit_train)
    if cfg.limit_test:
        n_test = min(n_test, cfg.limit_test)
    n_val = round(n_train * cfg.val_fraction)
    probes = 0
    if cfg.probe_every:  # at step 0, then every probe_every steps
        steps = cfg.epochs * ((n_train - n_val) // cfg.batch_size)
        probes = steps // cfg.probe_every + 1
    return (cfg.epochs * (n_train - n_val + EVAL_COST * (n_test + n_val))
            + probes * PROBE_STEP_COST * cfg.batch_size)


def cpu_cost(cfg: RunConfig, family_name: str) -> float:
    """CPU time per image of a CIFAR ResNet run relative to the table's rate (fp32, He init):
    the measured factors of bf16 and of Fixup's scalars (CPU_FACTORS); 1 for other families."""
    if family_name != "cifar-resnet":
        return 1.0
    factor = CPU_FACTORS["bf16"] if cfg.precision == "bf16" else 1.0
    return factor * (CPU_FACTORS["fixup"] if cfg.init == "fixup" else 1.0)


@dataclass
class Estimate:
    minutes: float | None  # None: some run has no measurement or no dataset size
    missing: str = ""  # why, when minutes is None
    sources: tuple[str, ...] = ()
    scaled: bool = False  # some rate was scaled from another model's measurement
    unscaled: tuple[str, ...] = ()  # CPU models at the table's rate, outside SPEED_FAMILIES


def rate_key(cfg: RunConfig) -> tuple:
    """What a measured rate of one run carries over to: runs of the same network, norm, init,
    precision, batch and device, with or without probes."""
    return (cfg.model, cfg.norm, cfg.init, cfg.precision, cfg.batch_size, cfg.device,
            bool(cfg.probe_every), cfg.cpu_kernels)


def own_rates(runs: Iterable[tuple[RunConfig, dict | None]],
              sizes: dict[str, tuple] | None = None) -> dict[tuple, float]:
    """Training-image equivalents per second (as `images` counts them: evaluation, probes and
    start-up included, being in the run's wall time) of the runs of an output folder that
    finished training, averaged per rate_key. Diverged runs stop early and say nothing of a
    whole run's cost; runs of a dataset of unknown size are left out."""
    by_key: dict[tuple, list[float]] = {}
    for cfg, summary in runs:
        s = summary or {}
        wall, done = s.get("wall_time"), s.get("epochs_done")
        if s.get("status") not in ("completed", "no_learning") or not isinstance(
                wall, int | float) or wall <= 0 or not isinstance(done, int) or done < 1:
            continue
        n = images(cfg, sizes or {})
        if n is None:
            continue
        by_key.setdefault(rate_key(cfg), []).append(n * min(done, cfg.epochs) / cfg.epochs
                                                     / wall)
    return {k: sum(v) / len(v) for k, v in by_key.items()}


OWN_SOURCE = "this output folder's own finished runs of the same network, norm, precision and batch"


CALIBRATED = "bnlab's table scaled to this CPU by a measured ResNet-20 step (bnlab.study.calibrate)"
# The families whose CPU rates this CPU's factor (a ResNet-20 step measured by bnlab.study.
# calibrate) scales. The CIFAR ResNets and plain nets are included because their rates are
# ResNet-20's, scaled by layers. The CIFAR VGGs are included because their rate is ResNet-20's
# divided by a measured ratio. The MLP's and the ImageNet ResNets' rates are measurements of
# their own, and ResNet-20's speed says little of theirs: bn-paper-mnist's MLP runs scaled by
# the 2-core Xeon's 0.27 x were estimated at 22 min and took 11.5 (docs/results.md). They keep
# the table's rate.
SPEED_FAMILIES = ("cifar-resnet", "cifar-vgg")


def estimate(cfgs: Iterable[RunConfig], device: str,
             sizes: dict[str, tuple[int, int]] | None = None,
             own: dict[tuple, float] | None = None, speed: float | None = None,
             workers: int = 1) -> Estimate:
    """Minutes to train `cfgs` on `device` ('cpu' or 'gpu'); on a GPU the packable runs as the
    study runner packs them. `own` (own_rates of an output folder) gives CPU runs of a
    measured rate_key that rate instead of the table's; `speed` (bnlab.study.calibrate) scales
    the table's CPU rates of SPEED_FAMILIES to this machine, the others stay the table's (and
    Estimate.unscaled names their models); `workers` CPU runs train at once (with the threads
    `speed` was measured at), so their time divides by it."""
    cfgs = list(cfgs)
    sizes = sizes or {}
    own = own or {}
    # packs as the runner forms them, judged by the networks' names (no torch; the same split
    # as building them: tests/test_packing_plan.py)
    groups = pack_groups(cfgs, 16, build=False) if device == "gpu" else [[c] for c in cfgs]
    seconds, sources, scaled, unscaled = 0.0, [], False, []
    for group in groups:
        mine = own.get(rate_key(group[0])) if device == "cpu" else None
        n = images(group[0], sizes)
        if mine is not None and n is not None:
            seconds += n / mine
            sources.append(OWN_SOURCE)
            continue
        fam, cost = family(group[0].model)
        table = LONE
        if len(group) > 1 and (fam, device) in PACKED:
            table = PACKED
        elif group[0].probe_every and (fam, device) in NO_GRAPH:
            table = NO_GRAPH
        rate = table.get((fam, device))  # a pack without a packed rate: its runs one by one
        if rate is None:
            return Estimate(None, f"{group[0].model} unmeasured on {MEASURED_ON[device]}")
        off = [c.batch_size for c in group if not rate.batch / 2 <= c.batch_size <= rate.batch * 2]
        if off:
            return Estimate(None, f"{group[0].model} at batch {off[0]} unmeasured on "
                                  f"{MEASURED_ON[device]} (measured at {rate.batch})")
        total = 0.0
        for c in group:
            n, known = images(c, sizes), dataset_size(c, sizes)
            if n is None or known is None:
                return Estimate(None, f"size of dataset {c.dataset!r} unknown")
            area = (known[2] / MEASURED_SIDE.get(fam, known[2])) ** 2
            total += n * area * (cpu_cost(c, fam) if device == "cpu" else 1.0)
            scaled = scaled or area != 1.0
        if device == "cpu" and speed and fam in SPEED_FAMILIES:
            seconds += total * cost / (rate.images_per_s * speed)
            sources.append(CALIBRATED)
        else:
            seconds += total * cost / rate.images_per_s
            sources.append(rate.source)
            if device == "cpu" and fam not in SPEED_FAMILIES:
                unscaled += [c.model for c in group]
        scaled = scaled or cost != 1.0
    if device == "cpu":
        seconds /= max(1, workers)
    return Estimate(seconds / 60, sources=tuple(dict.fromkeys(sources)), scaled=scaled,
                    unscaled=tuple(dict.fromkeys(unscaled)))
