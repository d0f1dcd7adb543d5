"""A study defined, run and plotted from Python, as one would in a notebook.

BatchNorm against no normalization in a 3x100 sigmoid MLP on a small synthetic dataset, two
seeds each: the study is a dict, runs through the same runner as `bnlab study run` (resumable:
run it again and nothing is retrained), and its results come back as pandas DataFrames for a
plot of one's own, saved next to the study's report.

    python examples/notebook_study.py [OUT]      # default OUT: studies-out/notebook-demo
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # a file, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

import bnlab  # noqa: E402

out = Path(sys.argv[1] if len(sys.argv) > 1 else "studies-out/notebook-demo")

spec = {
    "name": "notebook-demo",
    "description": "BN vs no BN in a sigmoid MLP on synthetic data",
    "base": {"dataset": "synthetic", "model": "mlp3x100", "limit_train": 256,
             "limit_test": 128, "batch_size": 32, "epochs": 3, "lr": 0.05,
             "device": "cpu", "probe_every": 8},
    "grid": {"norm": ["bn", "none"], "seed": [0, 1]},
    "analysis": {"compare": True},  # the prediction comparison after the runs, as on the CLI
}

study = bnlab.Study.from_spec(spec)
counts = study.run(out=out)
print("statuses:", counts)

runs = bnlab.load_runs(out)  # one row per run: arm, seed, status, results, every option
curves = bnlab.load_metrics(out)  # long: run_id, arm, seed, epoch, metric, value
probes = bnlab.load_probes(out)  # long: run_id, arm, seed, step, layer, metric, value

print(runs[["arm", "seed", "status", "test_acc"]].to_string(index=False))
print(runs.groupby("arm")["test_acc"].agg(["mean", "std", "count"]).to_string())

# How far the median input of the last sigmoid moves during training, per arm
# (Ioffe & Szegedy 2015, Fig. 1: BN keeps it put)
p50 = probes[(probes.metric == "act_p50") & (probes.layer == "hidden.2.sigmoid")]
drift = p50.groupby(["arm", "seed"])["value"].agg(lambda v: v.iloc[-1] - v.iloc[0])
print("drift of the last sigmoid's median input:\n" + drift.to_string())

# One plot of our own: test accuracy per epoch, one line per run, one colour per arm
acc = curves[curves.metric == "test_acc"]
colours = dict(zip(sorted(acc.arm.unique()), ("tab:blue", "tab:orange", "tab:green")))
fig, ax = plt.subplots(figsize=(5, 3.2))
for (arm, seed), g in acc.groupby(["arm", "seed"]):
    ax.plot(g.epoch, 100 * g.value, marker="o", color=colours[arm],
            linestyle="-" if seed == 0 else "--", label=f"{arm}, seed {seed}")
ax.xaxis.set_major_locator(MaxNLocator(integer=True))
ax.set_xlabel("epoch")
ax.set_ylabel("test accuracy (%)")
ax.set_title(f"{study.name}: {len(runs)} runs")
ax.legend(fontsize=8)
fig.tight_layout()
plot = out / "test_acc_by_arm.png"
fig.savefig(plot, dpi=100)
print(f"wrote {plot}")

report = study.report()
print(f"report: {report['report.html']}")
