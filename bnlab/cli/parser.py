"""The flags of the `bnlab` command: one sub-parser per command, each bound to its cmd_*.

Everything imported here is torch-free, so `bnlab --help` and a mistyped flag answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import bnlab
from bnlab.cli.commands import (
    cmd_bench,
    cmd_compare,
    cmd_datasets,
    cmd_diagnose,
    cmd_fold,
    cmd_models,
    cmd_norms,
    cmd_runs,
    cmd_study,
    cmd_train,
)
from bnlab.config import FIELDS
from bnlab.console import FORMATS
from bnlab.errors import suggest
from bnlab.study.options import EXECUTORS, SlurmOptions


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr and exit code 2."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments:"):
            message += self._suggest_flag(message.split(":", 1)[1].split())
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)

    def _suggest_flag(self, tokens: list[str]) -> str:
        flags = set(self._option_string_actions)
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    flags |= set(sub._option_string_actions)
        for t in tokens:
            if t.startswith("--"):
                hint = suggest(t.split("=")[0], sorted(flags))
                if hint:
                    return hint
        return ""


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _flag_help(f: dataclasses.Field) -> str:
    unit = f.metadata.get("unit")
    return f.metadata["help"] + (f" [{unit}]" if unit else "")


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field; flags not given stay unset so a TOML file can fill them."""
    g = p.add_argument_group("run options (flags override --config)")
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        # a help text that explains its own default (data_dir's "$BNLAB_DATA, else ./data") is
        # not followed by the raw one
        said = "(default:" in f.metadata["help"]
        hlp = (_flag_help(f) + ("" if said else f" (default: {default!r})")).replace("%", "%%")
        if isinstance(default, bool):
            g.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=hlp)
        elif isinstance(default, dict):
            g.add_argument(flag, dest=name, type=_json_table, default=argparse.SUPPRESS,
                           metavar="JSON", help=hlp + ", as JSON")
        else:
            g.add_argument(flag, dest=name, type=str, default=argparse.SUPPRESS,
                           metavar=type(default).__name__.upper(), help=hlp)


def _json_table(text: str) -> dict:
    try:
        v = json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}")
    return v


def _positive_list(text: str) -> str:
    try:
        ok = all(int(b) > 0 for b in text.split(","))
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of positive integers: "
                                         f"{text!r}")
    return text


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v != v or abs(v) == float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}")
    return values


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = minimum - 1
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return v
    return parse


def _jobs(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return _count(1)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or auto, got {text!r}") \
            from None


def add_cluster_flags(p: argparse.ArgumentParser) -> None:
    """The executor options of `bnlab study run`."""
    g = p.add_argument_group("cluster execution (--executor slurm or node)")
    g.add_argument("--executor", choices=tuple(EXECUTORS), default="local",
                   help="; ".join(f"{k}: {v}" for k, v in EXECUTORS.items()))
    d = SlurmOptions()
    g.add_argument("--partition", default=d.partition, help="SLURM partition")
    g.add_argument("--account", default=d.account, help="SLURM account")
    g.add_argument("--gpus-per-run", type=int, default=d.gpus_per_run, metavar="N",
                   help="GPUs of one run (N > 1: data-parallel, one task per GPU on one node)")
    g.add_argument("--cpus-per-gpu", type=int, default=d.cpus_per_gpu, metavar="N",
                   help="CPU cores per GPU (DataLoader workers)")
    g.add_argument("--time", type=int, default=d.time, metavar="MINUTES",
                   help="time limit of one job; a run cut off is requeued and resumes")
    g.add_argument("--mem", type=int, default=d.mem_gb, metavar="GB",
                   help="memory per node (0 = the partition's default)")
    g.add_argument("--parallel", type=int, default=d.parallel, metavar="N",
                   help="runs at a time (0: no limit on SLURM, 1 with --executor node)")


def add_format_flag(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument("--format", choices=FORMATS, default="table",
                   help=f"table: aligned columns for reading; {text}, for other tools")


def build_parser() -> Parser:
    p = Parser(prog="bnlab", formatter_class=Formatter,
               description="Batch-normalization studies: real training runs, measured reports.")
    p.add_argument("--version", action="version", version=f"bnlab {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    t = sub.add_parser("train", help="train one run", formatter_class=Formatter,
                       description="Train one run and store it under OUT/<run_id>/.")
    t.add_argument("--config", metavar="FILE", default=None,
                   help="TOML file of run options (top level or a [run] table)")
    t.add_argument("--out", metavar="DIR", default="runs", help="output root")
    t.add_argument("--resume", action="store_true",
                   help="continue an existing run from its last checkpoint")
    t.add_argument("--nproc", metavar="N", type=int, default=0,
                   help="data-parallel on N local processes (GPUs, or CPU processes with gloo): "
                        "starts torchrun; batch_size stays the global batch")
    add_run_flags(t)
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("runs", help="list the runs of an output root", formatter_class=Formatter)
    r.add_argument("--out", metavar="DIR", default="runs", help="output root")
    add_format_flag(r, "csv/json: every result and config option of each run")
    r.add_argument("--rebuild-index", action="store_true",
                   help="rebuild OUT/index.sqlite from the run folders (they are the truth; a "
                   "damaged index is kept as index.sqlite.damaged)")
    r.set_defaults(func=cmd_runs)

    c = sub.add_parser("compare", help="compare the predictions of trained runs",
                       formatter_class=Formatter,
                       description="Accuracy, calibration (NLL, Brier, ECE, reliability), "
                       "agreement and flips, KL/JS between predictive distributions, and "
                       "accuracy under corruptions (with training statistics and after AdaBN), "
                       "for runs sharing a test set. Runs with the same label form an arm (one "
                       "run per seed); every pair of runs is compared, within and between arms.")
    c.add_argument("runs", nargs="*", metavar="RUN", help="run folders (OUT/<run_id>)")
    c.add_argument("--out", metavar="DIR", default=None,
                   help="where compare.json and figures go (default: <root of RUN 1>/analysis)")
    c.add_argument("--labels", metavar="A,B,...", default=None,
                   help="one label per run (runs first, then --weights); equal labels form "
                   "one arm (default: the config keys that differ, seed excepted)")
    c.add_argument("--no-corruptions", action="store_true", help="skip the corruption sweep")
    d = sub.add_parser("diagnose", help="BN inference diagnostics of a checkpoint",
                       formatter_class=Formatter,
                       description="Why is a model good in train mode and bad in eval mode? "
                       "Eval vs train-mode accuracy, accuracy vs batch size in train mode, "
                       "PreciseBN (pooled and fvcore statistics), statistics of the test images, "
                       "the layers whose running statistics disagree most with the data, "
                       "running-statistics checks.")
    d.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT",
                   help="checkpoint.pt or its run folder (or --model-entry for your own model)")
    d.add_argument("--batch-sizes", type=_positive_list, default="1,2,8,32,128,1000",
                   help="inference batch sizes with the norms using batch statistics")
    d.add_argument("--precise-batches", type=_count(0), default=100,
                   help="training batches averaged by PreciseBN (0 = skip)")
    d.add_argument("--max-images", type=_count(0), default=0,
                   help="use only N test images (fixed shuffle; 0 = all)")
    d.add_argument("--batch-size", type=_count(2), default=128,
                   help="your own model: the training batch size PreciseBN uses")
    d.add_argument("--mean", type=_floats, default=None, metavar="M[,M,...]",
                   help="your own model: the per-channel mean (of images in [0, 1]) its inputs "
                   "are normalized with (default: the dataset's training images')")
    d.add_argument("--std", type=_floats, default=None, metavar="S[,S,...]",
                   help="your own model: the per-channel std its inputs are divided by")
    d.add_argument("--write-recalibrated", metavar="FILE", default=None,
                   help="save the model's state_dict with the BN statistics recomputed on the "
                   "PreciseBN batches (pooled; bnlab.recalibrate) to FILE")
    f = sub.add_parser("fold", help="fold BN into conv/linear layers; parity, speed, ONNX",
                       formatter_class=Formatter,
                       description="Fold every BN that follows a conv or linear layer, check "
                       "the logits against the unfolded model, time both, optionally export "
                       "ONNX and check it with onnxruntime. Exit 1 when a parity check fails.")
    f.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT",
                   help="checkpoint.pt or its run folder (or --model-entry for your own model)")
    f.add_argument("--onnx", metavar="FILE", default=None, help="export the folded model here")
    f.add_argument("--repeats", type=_count(1), default=20, help="timed calls per measurement")
    for q in (c, d, f):
        q.add_argument("--data-dir", metavar="DIR", default=None,
                       help="dataset folder, when the runs' data moved (or your model's data)")
        q.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"),
                       help="where the models run")
        q.add_argument("--model-entry", metavar="MODULE:FUNCTION", default=None,
                       help="your own model: a function returning a torch.nn.Module "
                       "(package.module:function or path/to/file.py:function)")
        q.add_argument("--dataset", metavar="SPEC", default=None,
                       help="your own model's dataset: cifar10, mnist, imagefolder:PATH, ...")
    c.add_argument("--weights", metavar="FILE", action="append", default=None,
                   help="your own model's state_dict (torch.load weights_only); repeat for "
                   "several models")
    for q in (d, f):
        q.add_argument("--weights", metavar="FILE", default=None,
                       help="your own model's state_dict (torch.load weights_only)")
    c.set_defaults(func=cmd_compare)
    d.set_defaults(func=cmd_diagnose)
    f.set_defaults(func=cmd_fold)
    st = sub.add_parser("study", help="run a study (a grid of runs) and report on it",
                        formatter_class=Formatter,
                        description="Studies: grids of runs from a TOML spec or a built-in name "
                        "(see `bnlab study list`); resumable, safe to kill and restart.")
    ssub = st.add_subparsers(dest="study_command", metavar="ACTION", parser_class=Parser,
                             required=True)
    sr = ssub.add_parser("run", help="run every run of a study that has not finished",
                         formatter_class=Formatter)
    sr.add_argument("spec", metavar="SPEC", help="built-in study name or a .toml spec file")
    sr.add_argument("--out", metavar="DIR", default=None,
                    help="output folder (default: studies-out/<name>)")
    sr.add_argument("--no-pack", action="store_true",
                    help="train every run alone (by default CUDA runs that differ only in "
                         "seed, lr, ... train packed into one network)")
    sr.add_argument("--pack-cpu", action="store_true",
                    help="pack CPU runs too (slower than lone runs on a CPU: for a dry run of "
                         "the GPU path at tiny sizes)")
    sr.add_argument("--jobs", type=_jobs, default="auto", metavar="N",
                    help="runs trained at once, each in its own process (one GPU each when "
                    "several exist); auto: on a CPU, one single-threaded run per core for "
                    "bnlab's small networks, else 1")
    sr.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                    help="device of every run (default: the spec's, else auto)")
    sr.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a run option in every run (repeatable)")
    sr.add_argument("--seeds", type=_count(1), default=None, metavar="N",
                    help="seeds 0 .. N-1 in place of the spec's seed axis (the runs of seeds "
                    "already trained are kept: more seeds narrow a study's CIs)")
    sr.add_argument("--only", action="append", metavar="KEY=VALUE",
                    help="keep only runs with this value (repeatable; same key = any of)")
    sr.add_argument("--data-map", action="append", metavar="NAME=DATASET",
                    help="use DATASET wherever the spec says NAME, e.g. "
                    "cifar10=imagefolder:PATH (repeatable)")
    sr.add_argument("--yes", action="store_true",
                    help="start a study of more runs than its max_runs (default 1000) "
                    "without refusing")
    sr.add_argument("--tensorboard", action="store_true",
                    help="write every run's TensorBoard event files (epoch metrics; probes "
                    "where probe_every > 0) to OUT/tensorboard/<arm>/seed<k>, to watch the "
                    "study with `tensorboard --logdir OUT` (same as --set tensorboard=true)")
    add_cluster_flags(sr)
    for action, text in (("status", "counts by status and one line per run"),
                         ("report", "write report.html, report.md and figures")):
        sp = ssub.add_parser(action, help=text, formatter_class=Formatter)
        sp.add_argument("target", metavar="SPEC|DIR",
                        help="the study's output folder, or its spec (then --out or "
                        "studies-out/<name>)")
        sp.add_argument("--out", metavar="DIR", default=None, help="output folder of the study")
        if action == "report":
            sp.add_argument("--references", metavar="FILE", default=None,
                            help="TOML file of published numbers to show beside the study's "
                            "(default: the file shipped with a built-in study of that name)")
            sp.add_argument("--report-dir", metavar="DIR", default=None,
                            help="where the report goes (default: OUT/report); for a study on "
                            "read-only storage")
        if action == "status":
            add_format_flag(sp, "csv/json: one record per run with its axis values")
    ssub.add_parser("list", help="built-in studies with their size and estimated time")
    st.set_defaults(func=cmd_study)

    b = sub.add_parser("bench", help="images/s of bnlab against the textbook loop",
                       formatter_class=Formatter,
                       description="Training speed of the textbook loop and of bnlab (eager, "
                       "compiled, packed) on this device, one JSON line per variant.")
    b.add_argument("--data", default="synthetic", help="dataset spec (e.g. imagefolder:PATH); "
                   "synthetic = generated images of CIFAR-10's shape")
    b.add_argument("--data-dir", default="", help="folder of the dataset files")
    b.add_argument("--model", default="resnet20", help="model name")
    b.add_argument("--variants", default=",".join(("textbook", "eager", "compiled", "packed")),
                   help="comma-separated: textbook, eager, compiled, packed, packed-compiled")
    b.add_argument("--precision", default="fp32", help="fp32, bf16 or both (comma-separated; "
                   "the textbook loop is always fp32)")
    b.add_argument("--batch-size", type=int, default=128, help="batch size [images]")
    b.add_argument("--steps", type=int, default=20, help="timed steps per variant, after a "
                   "warm-up epoch of as many [steps]")
    b.add_argument("--k", type=int, default=4, help="runs per pack in the packed variants")
    b.add_argument("--device", default="auto", help="auto | cpu | cuda")
    b.add_argument("--workers", type=int, default=4, help="DataLoader workers of the "
                   "textbook loop [processes]")
    b.add_argument("--compile-mode", default="", help="torch.compile mode (default: "
                   "reduce-overhead on CUDA, default on CPU and for a step graphed whole)")
    b.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="bnlab's variants capture each training step in one CUDA graph on a "
                   "GPU (run option cuda_graph); --no-cuda-graph measures them without")
    b.add_argument("--cpu-kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="bnlab's variants fuse BatchNorm, ReLU and residual adds into one C++ "
                   "kernel on the CPU (run option cpu_kernels); --no-cpu-kernels measures "
                   "them with torch's ops")
    b.add_argument("--timeout", type=float, default=1800, help="per variant [s]")
    b.add_argument("--out", default=None, metavar="FILE", help="also write the JSON lines here")
    b.set_defaults(func=cmd_bench)

    sub.add_parser("datasets", help="list dataset names").set_defaults(func=cmd_datasets)
    sub.add_parser("models", help="list model names").set_defaults(func=cmd_models)
    nm = sub.add_parser("norms", help="list normalization layers with their formulas",
                        formatter_class=Formatter)
    nm.add_argument("--table", action="store_true",
                    help="print each norm's output statistics on one fixed input batch")
    nm.set_defaults(func=cmd_norms)
    return p


def _version() -> str:
    return bnlab.__version__
