"""A class-balanced subset of an ImageNet-layout archive, small enough to carry to a lent GPU.

    python benchmarks/imagenette_subset.py ../shared/data/imagenette2-224.tar.gz \
        .gpu/imagenette-subset.tar --train-per-class 250 --val-per-class 80

Keeps the first N files (sorted by name) of every class of `train/` and `val/` and writes them,
unchanged, to an uncompressed tar in the same layout (JPEGs do not compress further). The
choice is deterministic, so two calls give the same subset. Imagenette at 224 px averages about
10.5 kB a file: 250 + 80 per class is about 36 MB, which leaves room for the CIFAR-10 archive
(20 MB) within a 64 MiB carry.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tarfile


def _split_and_class(name: str) -> tuple[str, str] | None:
    parts = name.split("/")
    for i, part in enumerate(parts[:-2]):
        if part in ("train", "val", "test"):
            return part, parts[i + 1]
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("source", help="a .tar or .tar.gz holding train/<class>/ and val/<class>/")
    ap.add_argument("dest", help="the .tar to write")
    ap.add_argument("--train-per-class", type=int, default=250)
    ap.add_argument("--val-per-class", type=int, default=80)
    args = ap.parse_args(argv)
    limits = {"train": args.train_per_class, "val": args.val_per_class,
              "test": args.val_per_class}
    if min(limits.values()) < 1:
        print("imagenette_subset: --train-per-class and --val-per-class must be at least 1",
              file=sys.stderr)
        return 2
    if not os.path.isfile(args.source):
        print(f"imagenette_subset: {args.source} is not a file", file=sys.stderr)
        return 2

    with tarfile.open(args.source) as src:
        members = [m for m in src.getmembers() if m.isfile() and _split_and_class(m.name)]
        by_class: dict[tuple[str, str], list[tarfile.TarInfo]] = collections.defaultdict(list)
        for m in members:
            by_class[_split_and_class(m.name)].append(m)
        keep = []
        for key in sorted(by_class):
            keep += sorted(by_class[key], key=lambda m: m.name)[: limits[key[0]]]
        tmp = args.dest + ".part"
        with tarfile.open(tmp, "w") as dst:
            for m in keep:
                dst.addfile(m, src.extractfile(m))
        os.replace(tmp, args.dest)
    counts = collections.Counter(_split_and_class(m.name)[0] for m in keep)
    print(f"{args.dest}: {dict(counts)} files from {len(by_class)} class folders, "
          f"{os.path.getsize(args.dest) / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
