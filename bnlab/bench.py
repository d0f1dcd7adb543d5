"""`bnlab bench`: training speed of bnlab against the textbook loop, measured in one run.

Variants (each in its own child process, so peak memory and thread pools are its own):
- textbook: torchvision transforms (pad-4 RandomCrop, flip, ToTensor, Normalize) applied per
  image in DataLoader workers, fp32, contiguous layout, `loss.item()` every step: the loop most
  tutorials teach. It reads the JPEG folder itself for imagefolder data (decoding every image
  every epoch), else PIL images made from the same uint8 arrays (as torchvision's CIFAR10 does).
- eager / compiled / packed / packed-compiled: the real `bnlab train` code path (`train_run`,
  or `train_packed` with K runs differing in seed), for two epochs of `steps` steps each;
  the first warms up (and compiles), the second is timed from its own metrics row
  (`train_images_per_s`: training steps only, evaluation excluded).

images_per_s counts the images of one run; model_images_per_s = images_per_s * K counts the
images of all K packed runs; ratio_vs_textbook = model_images_per_s / textbook images_per_s.
cpu_ms_per_image is the CPU time (all threads, and the DataLoader workers) per training image
of the timed part (for bnlab: the second epoch, its evaluation of `batch_size` test images
included): on a machine shared with other work, where wall-clock rates depend on the load,
it is the steadier measure of what each loop costs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import datasets
from torchvision import transforms as T

from bnlab.config import DEVICES, RunConfig
from bnlab.data import fingerprint, load_data
from bnlab.data.imagefolder import extract_archive, find_root
from bnlab.data.synthetic import make_synthetic
from bnlab.errors import UserError, unknown
from bnlab.fast import accel, cpu_kernels
from bnlab.models import build_model
from bnlab.models.build import MODELS
from bnlab.runtime import environment, resolve_device
from bnlab.store import Store, atomic_write_bytes
from bnlab.train import train_run
from bnlab.train.packed import train_packed

VARIANTS = ("textbook", "eager", "compiled", "packed", "packed-compiled")

# "" is bnlab's default for the device; the rest are torch.compile's modes
COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclasses.dataclass
class BenchArgs:
    data: str = "synthetic"  # a dataset spec (imagefolder:PATH, cifar10, ...) or synthetic
    data_dir: str = ""
    model: str = "resnet20"
    batch_size: int = 128
    steps: int = 20  # timed steps (the warm-up epoch has as many)
    precision: str = "fp32"
    k: int = 4
    device: str = "auto"
    workers: int = 4
    compile_mode: str = ""  # "" = bnlab's default for the device
    cuda_graph: bool = True  # RunConfig.cuda_graph of bnlab's variants
    cpu_kernels: bool = True  # RunConfig.cpu_kernels of bnlab's variants


def check_args(a: BenchArgs, variants: list[str], precisions: list[str], timeout: float) -> None:
    """The checks of `bnlab bench` (and bnlab.bench_speed), each a one-line UserError."""
    for v in variants:
        if v not in VARIANTS:
            raise unknown("variant", v, VARIANTS)
    for p in precisions:
        if p not in ("fp32", "bf16"):
            raise unknown("precision", p, ("fp32", "bf16"))
    for name, v in (("batch_size", a.batch_size), ("steps", a.steps), ("k", a.k),
                    ("timeout", timeout)):
        if v <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0, got {v}")
    if a.workers < 0:
        raise UserError(f"--workers must be >= 0, got {a.workers}")
    # names checked here, once, rather than failing inside every variant's row
    if a.device not in DEVICES:
        raise unknown("device", a.device, DEVICES)
    resolve_device(a.device)
    if a.model not in MODELS:
        raise unknown("model", a.model, MODELS)
    if a.compile_mode not in COMPILE_MODES:
        raise unknown("compile mode", a.compile_mode, COMPILE_MODES[1:])
    if a.data != "synthetic":
        fingerprint(a.data, a.data_dir or None)


def _load(a: BenchArgs, n_train: int):
    """The bundle every variant trains on: the real data (subset to n_train images) or a
    synthetic set of the same shape as CIFAR-10."""
    if a.data == "synthetic":
        return make_synthetic(n_train=n_train, n_test=a.batch_size)
    return load_data(a.data, a.data_dir or None, False, n_train, a.batch_size, True)


def _device(a: BenchArgs) -> torch.device:
    return resolve_device(a.device)


def cpu_seconds() -> float:
    """User + system CPU time of this process's threads and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _peaks(device: torch.device) -> dict:
    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
              resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    out = {"peak_rss_mb": round(rss, 1)}
    if device.type == "cuda":
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


# -- the textbook loop -------------------------------------------------------------------------
class _PilImages(torch.utils.data.Dataset):
    """uint8 arrays served as PIL images, the way torchvision's CIFAR10 dataset serves them."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform):
        self.x, self.y, self.transform = x.permute(0, 2, 3, 1).numpy(), y.tolist(), transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.x[i].squeeze(-1) if self.x.shape[-1] == 1 else self.x[i])
        return self.transform(img), self.y[i]


def _textbook_dataset(a: BenchArgs, bundle, n_train: int):
    tf = T.Compose([T.RandomCrop(bundle.image_size, padding=4), T.RandomHorizontalFlip(),
                    T.ToTensor(), T.Normalize(bundle.mean, bundle.std)])
    if a.data.startswith("imagefolder:"):
        path = Path(a.data.split(":", 1)[1]).expanduser()
        root = extract_archive(path) if path.is_file() else find_root(path, path)
        ds = datasets.ImageFolder(str(root / "train"), transform=tf)
        g = torch.Generator().manual_seed(0)
        pick = torch.randperm(len(ds), generator=g)[:n_train].tolist()
        return torch.utils.data.Subset(ds, pick)
    return _PilImages(bundle.train.x, bundle.train.y, tf)


def run_textbook(a: BenchArgs) -> dict:
    cpu_kernels.set_enabled(False)  # the textbook loop runs torch's own ops only
    device = _device(a)
    warm = min(a.steps, 5)
    n_train = (a.steps + warm) * a.batch_size
    bundle = _load(a, n_train)
    ds = _textbook_dataset(a, bundle, n_train)
    dl = torch.utils.data.DataLoader(ds, batch_size=a.batch_size, shuffle=True,
                                     num_workers=a.workers, drop_last=True,
                                     pin_memory=device.type == "cuda")
    cpu0 = cpu_seconds()
    torch.manual_seed(0)
    model = build_model(a.model, bundle.num_classes, in_channels=bundle.in_channels,
                        image_size=bundle.image_size).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model.train()
    running, t0, done = 0.0, None, 0
    for i, (x, y) in enumerate(dl):
        if i == warm:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        running += loss.item()
        done = i + 1
    seconds = time.perf_counter() - t0
    del dl  # its workers have exited, so their CPU time is counted below
    cpu = cpu_seconds() - cpu0
    timed = done - warm
    ips = timed * a.batch_size / seconds
    return {"images_per_s": ips, "model_images_per_s": ips, "k": 1, "steps": timed,
            "seconds": seconds, "precision": "fp32",
            "cpu_ms_per_image": round(1000 * cpu / (done * a.batch_size), 3), **_peaks(device)}


# -- bnlab's own path --------------------------------------------------------------------------
def run_bnlab(a: BenchArgs, variant: str) -> dict:
    device = _device(a)
    packed = variant.startswith("packed")
    k = a.k if packed else 1
    n_train = a.steps * a.batch_size
    bundle = _load(a, n_train)
    n_train = len(bundle.train)
    if a.compile_mode:
        accel.COMPILE_MODES[device.type] = a.compile_mode
    base = RunConfig(dataset=a.data, data_dir=a.data_dir, model=a.model,
                     batch_size=a.batch_size, epochs=2, device=device.type,
                     precision=a.precision, limit_train=n_train,
                     eval_batch_size=a.batch_size,
                     compile=variant.endswith("compiled"), schedule="constant",
                     cuda_graph=a.cuda_graph, cpu_kernels=a.cpu_kernels)
    cfgs = [dataclasses.replace(base, seed=s) for s in range(k)]
    marks: dict[str, float] = {}

    def log(line: str) -> None:  # CPU time at the end of each epoch's evaluation
        for e in ("1/2", "2/2"):
            if f"epoch {e} " in line and e not in marks:
                marks[e] = cpu_seconds()

    with tempfile.TemporaryDirectory(prefix="bnlab-bench-") as out:
        if packed:
            summaries = train_packed(cfgs, out, resume=False, log=log, bundle=bundle)
        else:
            summaries = [train_run(cfgs[0], out, log=log, bundle=bundle)]
        bad = [s for s in summaries if s["status"] not in ("completed", "no_learning")]
        if bad:
            raise RuntimeError(f"benchmark run ended {bad[0]['status']}: "
                               f"{bad[0].get('error', '')}")
        row = Store(out).run(cfgs[0].run_id()).metrics()[-1]
    ips = row["train_images_per_s"]
    steps = n_train // a.batch_size
    return {"images_per_s": ips, "model_images_per_s": ips * k, "k": k, "steps": steps,
            "seconds": steps * a.batch_size / ips, "precision": a.precision,
            "compile_mode": (a.compile_mode or None) if variant.endswith("compiled") else None,
            "cuda_graph": a.cuda_graph and device.type == "cuda",
            "cpu_kernels": _kernels_used(variant) if device.type == "cpu" else None,
            "test_acc_after_2_epochs": summaries[0]["test_acc"],
            "cpu_ms_per_image": round(1000 * (marks["2/2"] - marks["1/2"]) / (
                steps * a.batch_size * k), 3), **_peaks(device)}


def _kernels_used(variant: str) -> str:
    """Which of bnlab's fused CPU kernels a variant ran: a compiled model runs inductor's own
    kernels for its norms, so only the batch making is fused there."""
    state = cpu_kernels.describe()
    return "data only (compiled model)" if state == "fused" and "compiled" in variant else state


def run_one(a: BenchArgs, variant: str) -> dict:
    """One variant in this process; the row without ratio."""
    device = _device(a)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = run_textbook(a) if variant == "textbook" else run_bnlab(a, variant)
    env = environment(device)
    return {"variant": variant, "model": a.model, "data": a.data, "batch_size": a.batch_size,
            **result, "device": env["device"], "device_name": env["device_name"],
            "torch": env["torch"], "threads": env["torch_threads"]}


def run_all(a: BenchArgs, variants: list[str], precisions: list[str], timeout: float,
            emit, out_file: str | None = None) -> list[dict]:
    """Every variant in a child process; the textbook first, so each row carries its ratio."""
    rows: list[dict] = []
    base_ips = None
    plan = [("textbook", "fp32")] if "textbook" in variants else []
    plan += [(v, p) for p in precisions for v in variants if v != "textbook"]
    for variant, precision in plan:
        args = dataclasses.replace(a, precision=precision)
        cmd = [sys.executable, "-m", "bnlab.bench", variant, json.dumps(dataclasses.asdict(args))]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env=dict(os.environ))
            lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
            if proc.returncode == 0 and lines:
                row = json.loads(lines[-1])
            else:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                row = {"variant": variant, "precision": precision, "error": tail}
        except subprocess.TimeoutExpired:
            row = {"variant": variant, "precision": precision,
                   "error": f"timed out after {timeout:.0f} s"}
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        if variant == "textbook" and "images_per_s" in row:
            base_ips = row["images_per_s"]
        if "model_images_per_s" in row:
            row["ratio_vs_textbook"] = (round(row["model_images_per_s"] / base_ips, 3)
                                        if base_ips else None)
        rows.append(row)
        emit(json.dumps(row, sort_keys=True))
        if out_file:
            text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
            atomic_write_bytes(Path(out_file), text.encode())
    return rows


def main(argv: list[str]) -> int:
    variant, args = argv[0], BenchArgs(**json.loads(argv[1]))
    print(json.dumps(run_one(args, variant), sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
