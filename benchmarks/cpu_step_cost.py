"""CPU cost per training image of a ResNet-20 step (batch 128) and of each loop's data work,
with ONE thread: CPU time then does not include OpenMP spin-waits, so it stays steady on a
machine shared with other work, where wall-clock rates do not.

    PYTHONPATH=. python benchmarks/cpu_step_cost.py ../shared/data/cifar10-jpg.tar.gz
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bnlab.data import load_data  # noqa: E402
from bnlab.data.imagefolder import extract_archive  # noqa: E402
from bnlab.data.loader import make_loader  # noqa: E402
from bnlab.models import build_model  # noqa: E402
from bnlab.models.grouped import pack_models  # noqa: E402

BATCH = 128


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def step_cost(fmt, precision: str, k: int = 1, steps: int = 2) -> float:
    """CPU ms per model-image of a forward+backward+SGD step (k > 1: a pack of k ResNet-20s)."""
    models = []
    for s in range(k):
        torch.manual_seed(s)
        models.append(build_model("resnet20", 10))
    model = (pack_models(models) if k > 1 else models[0]).to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(BATCH, 3 * k, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (BATCH, k))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(x)
        loss = F.cross_entropy(out.float().reshape(BATCH, k, -1).permute(0, 2, 1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    c0 = cpu()
    for _ in range(steps):
        step()
    return (cpu() - c0) / steps / (BATCH * k) * 1000


def textbook_data_cost(data: str, n: int = 512) -> float:
    """CPU ms per image of torchvision's per-image pipeline on the JPEG folder."""
    from torchvision import datasets
    from torchvision import transforms as T

    root = extract_archive(Path(data))
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))])
    ds = datasets.ImageFolder(str(root / "train"), transform=tf)
    idx = torch.randperm(len(ds))[:n].tolist()
    c0 = cpu()
    torch.stack([ds[i][0] for i in idx])
    return (cpu() - c0) / n * 1000


def bnlab_data_cost(data: str, batches: int = 8) -> float:
    """CPU ms per image of bnlab's batched crop/flip/normalize on the decoded uint8 data."""
    bundle = load_data("imagefolder:" + data)
    loader = make_loader(bundle, True, BATCH, torch.device("cpu"), True, 0, 0,
                         torch.channels_last)
    it = loader.epoch(1)
    next(it)
    c0 = cpu()
    for _ in range(batches):
        next(it)
    return (cpu() - c0) / (batches * BATCH) * 1000


def main() -> None:
    torch.set_num_threads(1)
    data = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/cifar10-jpg.tar.gz"
    print(f"data: textbook per-image transforms {textbook_data_cost(data):.3f} cpu-ms/img; "
          f"bnlab batched crop/flip/normalize {bnlab_data_cost(data):.3f} cpu-ms/img",
          flush=True)
    cl, nchw = torch.channels_last, torch.contiguous_format
    cases = (("nchw fp32", nchw, "fp32", 1), ("channels_last fp32", cl, "fp32", 1),
             ("channels_last bf16", cl, "bf16", 1), ("packed x4 channels_last fp32", cl,
                                                     "fp32", 4), ("nchw bf16", nchw, "bf16", 1))
    for rep in range(2):
        for name, fmt, precision, k in cases:
            print(rep, f"{name}: step {step_cost(fmt, precision, k):.2f} cpu-ms per "
                  "model-image", flush=True)


if __name__ == "__main__":
    main()
