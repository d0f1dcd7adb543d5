"""`bnlab norms --table`: each norm's output statistics on one fixed input batch."""

from __future__ import annotations

import torch

from bnlab.norm.factory import NORMS, make_norm

# -- forward statistics on one fixed batch (`bnlab norms --table`) -----------------------------
TABLE_SHAPE = (16, 4, 8, 8)   # N, C, H, W of the fixed input batch
TABLE_STEPS = 10              # training-mode passes before the eval-mode row


def table_input() -> torch.Tensor:
    """x[n, c, h, w] = (c + 1) * z + 2 c with z ~ N(0, 1) (seed 0): channel c has mean 2c and
    standard deviation c + 1, so a norm's effect on each channel is visible."""
    z = torch.randn(TABLE_SHAPE, generator=torch.Generator().manual_seed(0))
    c = torch.arange(TABLE_SHAPE[1], dtype=torch.float32).view(1, -1, 1, 1)
    return (c + 1) * z + 2 * c


def forward_stats() -> list[dict]:
    """Per-channel mean and std (biased, over N, H, W) of each norm's output on table_input().

    'train': the first training-mode pass of a freshly built layer (default options);
    'eval': eval mode after TABLE_STEPS training-mode passes over the same batch.
    """
    x = table_input()
    rows = []
    for name in NORMS:
        layer = make_norm(name, TABLE_SHAPE[1])
        with torch.no_grad():
            for mode in ("train", "eval"):
                if mode == "train":
                    layer.train()
                    y = layer(x)
                    for _ in range(TABLE_STEPS - 1):
                        layer(x)
                else:
                    layer.eval()
                    y = layer(x)
                rows.append({"norm": name, "mode": mode,
                             "mean": y.mean((0, 2, 3)).tolist(),
                             "std": y.std((0, 2, 3), unbiased=False).tolist()})
    return rows


def format_stats_table(rows: list[dict]) -> str:
    """A Markdown table of forward_stats() rows."""
    c = TABLE_SHAPE[1]
    head = ["norm", "mode"] + [f"mean c{i}" for i in range(c)] + [f"std c{i}" for i in range(c)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["norm"], r["mode"]] + [f"{v:+.3f}" for v in r["mean"]] + \
            [f"{v:.3f}" for v in r["std"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
