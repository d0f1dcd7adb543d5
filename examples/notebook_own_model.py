"""Your own network in a BN study, from Python, as one would in a notebook.

A small conv net defined below, trained with BatchNorm and without any norm through bnlab's
study runner (two seeds each, synthetic data): the network is the function `make_net(num_classes,
norm)`, whose norm layers are `norm(channels)`, named to the study as
"entry:<this file>:make_net". Its results come back as DataFrames for a plot of one's own, and
the BN arm, rebuilt in memory from the function and its trained weights, is diagnosed at
inference (train vs eval mode, batch-size dependence, the test accuracy with its BN statistics
recalibrated by PreciseBN in both definitions) and recalibrated as a tool (a copy with
recomputed statistics; the model passed in is never changed).

    python examples/notebook_own_model.py [OUT]      # default OUT: studies-out/own-net-demo

bnlab imports this file to build the network (as a module of its own, so the work below,
under `if __name__ == "__main__":`, does not run again); an edit to the file gives the runs
new ids, so running it again after an edit trains the edited network.
"""

import sys
from pathlib import Path

import torch
from torch import nn


class SmallConvNet(nn.Module):
    """Two conv layers, each followed by the run's norm and a ReLU, global pooling, a linear
    classifier. `norm.conv_bias` gives the convs a bias where the norm has no shift of its
    own (norm none), as bnlab's own models do."""

    def __init__(self, num_classes: int, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=norm.conv_bias)
        self.norm1 = norm(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=norm.conv_bias)
        self.norm2 = norm(32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm1(self.conv1(x)))
        x = torch.relu(self.norm2(self.conv2(x)))
        return self.head(x.mean((2, 3)))

def make_net(num_classes: int, norm) -> nn.Module:
    return SmallConvNet(num_classes, norm)

def main(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # a file, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    import bnlab

    spec = {
        "name": "own-net-demo",
        "description": "BN vs no BN in a network defined in examples/notebook_own_model.py",
        "base": {"dataset": "synthetic", "model": f"entry:{Path(__file__).resolve()}:make_net",
                 "limit_train": 256, "limit_test": 128, "batch_size": 32, "epochs": 4,
                 "lr": 0.2, "device": "cpu",
                 # tiny runs: skip building the fused CPU kernels (a minute, once per cache)
                 "cpu_kernels": False},
        "grid": {"norm": ["bn", "none"], "seed": [0, 1]},
    }
    study = bnlab.Study.from_spec(spec)
    counts = study.run(out=out)
    print("statuses:", counts)

    runs = bnlab.load_runs(out)  # one row per run: arm, seed, status, results, every option
    curves = bnlab.load_metrics(out)  # long: run_id, arm, seed, epoch, metric, value
    print(runs[["arm", "seed", "status", "test_acc"]].to_string(index=False))
    print(runs.groupby("arm")["test_acc"].agg(["mean", "std", "count"]).to_string())

    # One plot of our own: training loss per epoch, one line per run, one colour per arm
    loss = curves[curves.metric == "train_loss"]
    colours = dict(zip(sorted(loss.arm.unique()), ("tab:blue", "tab:orange")))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for (arm, seed), g in loss.groupby(["arm", "seed"]):
        ax.plot(g.epoch, g.value, marker="o", color=colours[arm],
                linestyle="-" if seed == 0 else "--", label=f"{arm}, seed {seed}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_title(f"{study.name}: SmallConvNet, {len(runs)} runs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    plot = out / "train_loss_by_arm.png"
    fig.savefig(plot, dpi=100)
    print(f"wrote {plot}")

    # The BN arm's first seed at inference, in memory: the network rebuilt from this file's
    # function with bnlab's norm factory and its trained weights, then diagnosed (eval vs train
    # mode, accuracy vs batch size, PreciseBN in both definitions, an answer) and recalibrated
    # (a copy whose BN statistics are recomputed from training batches; the model passed in is
    # never changed)
    bn = runs[(runs.norm == "bn") & (runs.seed == 0)].iloc[0]
    net = make_net(10, bnlab.NormFactory("bn"))
    ckpt = torch.load(out / bn.run_id / "checkpoint.pt", map_location="cpu", weights_only=True)
    net.load_state_dict(ckpt["model"])
    res = bnlab.diagnose(net, "synthetic", batch_sizes=(1, 8, 32), precise_batches=4)
    print(f"{bn.run_id}: eval-mode test accuracy {res['eval_acc']:.4f}")
    print("  train mode by batch size:", {b: round(a, 4) for b, a in
                                          res["train_mode_acc"].items() if a is not None})
    print(f"  recalibrated (pooled) {res['precise_acc']:.4f}, "
          f"(fvcore) {res['precise_fvcore_acc']:.4f}")
    for line in res["answer"]:
        print("  " + line)

    # The same recalibration as a tool: training images (normalized as the runs saw them) in
    # batches of 32, the pooled definition; the copy's running mean differs, the model's not
    from bnlab.data import load_data

    data = load_data("synthetic", limit_train=256, limit_test=128)
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    images = (data.train.x.float() / 255 - mean) / std
    loader = torch.utils.data.DataLoader(images, batch_size=32)
    fresh = bnlab.recalibrate(net, loader, definition="pooled")
    moved = (fresh.norm1.running_mean - net.norm1.running_mean).abs().max().item()
    print(f"  recalibrated copy: first BN layer's running mean moved by up to {moved:.4f}")

if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "studies-out/own-net-demo"))
