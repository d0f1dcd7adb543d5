"""The `bnlab` command: argument parsing only; the work is done by the modules it calls.

Each command imports the modules it calls when it runs (the `# lazy` imports below): torch takes
about 2 s to load, which `bnlab --help` and a mistyped flag should not pay, and `study run`
must set OMP_WAIT_POLICY before torch is loaded at all. Everything imported at the top of this
file is torch-free.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import sys
from pathlib import Path

import bnlab
from bnlab.config import FIELDS, load, to_flags
from bnlab.console import FORMATS, format_table, records_csv, records_json
from bnlab.errors import UserError, suggest
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


def run_overrides(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k in FIELDS}


# -- commands ----------------------------------------------------------------------------------
def cmd_train(args) -> int:
    if _cpu_shared(max(1, args.nproc)):  # before torch loads: as `study run` does
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see study.executors.passive_openmp
    from bnlab.train import train_run  # lazy
    from bnlab.train.distributed import detect, launch  # lazy

    cfg = load(args.config, run_overrides(args))
    if args.nproc:
        return launch(args.nproc, _train_argv(args), cfg)
    summary = train_run(cfg, args.out, resume=args.resume)
    if not detect().is_main:
        return 0
    acc = summary.get("test_acc")
    print(f"{summary['run_id']}: {summary['status']}, {summary['epochs_done']} epochs, "
          f"test acc {acc if acc is None else f'{acc:.4f}'}, "
          f"{summary['wall_time']:.1f} s -> {args.out}/{summary['run_id']}")
    return 0


def _train_argv(args) -> list[str]:
    """The `bnlab train` arguments of `args` without --nproc (for the processes torchrun starts)."""
    argv = ["--out", args.out] + (["--config", args.config] if args.config else [])
    argv += ["--resume"] if args.resume else []
    return argv + to_flags(run_overrides(args))


def cmd_runs(args) -> int:
    from bnlab.store import open_store  # lazy

    if args.rebuild_index:
        store = open_store(args.out, must_exist=True)
        print(f"rebuilt {store.index_path} from {store.rebuild_index()} run folders",
              file=sys.stdout if args.format == "table" else sys.stderr)  # keep csv/json clean
    # read-only where the folder cannot be written; the rows are checked against the run
    # folders (the truth), and a writable index is brought up to date
    rows = open_store(args.out, must_exist=True, readonly=None).reconcile()
    if args.format != "table":
        from bnlab.report.records import run_records  # lazy

        records = run_records(args.out)
        sys.stdout.write(records_csv(records) if args.format == "csv" else records_json(records))
        return 0
    if not rows:
        print(f"no runs in {args.out}")
        return 0
    head = ["run_id", "status", "dataset", "norm", "seed", "epochs", "test_acc", "wall_s"]
    table = [[r["run_id"], r["status"], r["dataset"], r["norm"], str(r["seed"]),
              f"{r['epochs_done']}/{r['epochs']}",
              "-" if r["test_acc"] is None else f"{r['test_acc']:.4f}",
              "-" if r["wall_time"] is None else f"{r['wall_time']:.1f}"] for r in rows]
    print(format_table(head, table))
    return 0


def cmd_datasets(args) -> int:
    from bnlab.data import DATASETS  # lazy

    for name, text in DATASETS.items():
        print(f"{name:18s} {text}")
    return 0


def cmd_models(args) -> int:
    from bnlab.models import MODELS, family_lines  # lazy

    for name, text in MODELS.items():
        print(f"{name:18s} {text}")
    print("\ntorchvision:NAME, by family:")
    for family, text in family_lines():
        print(f"  {family:16s} {text}")
    return 0


def cmd_norms(args) -> int:
    from bnlab.norm import FORMULAS, OPTIONS  # lazy
    from bnlab.norm.table import (  # lazy
        TABLE_SHAPE,
        TABLE_STEPS,
        format_stats_table,
        forward_stats,
    )

    if args.table:
        print(f"Per-channel mean and std of each norm's output on one fixed batch of shape "
              f"{TABLE_SHAPE} (channel c: mean 2c, std c+1); train = first training-mode pass, "
              f"eval = after {TABLE_STEPS} training-mode passes; default options.\n")
        print(format_stats_table(forward_stats()))
        return 0
    for name, text in FORMULAS.items():
        opts = ", ".join(f"{k}={v}" for k, v in OPTIONS[name].items() if v is not None)
        print(f"{name:13s} {text}" + (f"\n{'':13s}   options: {opts}" if opts else ""))
    return 0


def _user_model(args, weights):
    """A user's own model from --model-entry, `weights` and --dataset."""
    from bnlab.infer.usermodel import load_user_model  # lazy

    missing = [f for f, v in (("--model-entry", args.model_entry), ("--weights", weights),
                              ("--dataset", args.dataset)) if not v]
    if missing:
        raise UserError(f"your own model needs --model-entry MODULE:FUNCTION, --weights FILE "
                        f"and --dataset SPEC; missing {', '.join(missing)}")
    return load_user_model(args.model_entry, weights, args.dataset, args.data_dir, args.device,
                           getattr(args, "batch_size", 128))


def _one_model(args):
    """The model `diagnose` or `fold` works on: a bnlab checkpoint or the user's own."""
    from bnlab.infer.loading import load_model  # lazy

    own = [f for f, v in (("--model-entry", args.model_entry), ("--weights", args.weights),
                          ("--dataset", args.dataset)) if v]
    if args.checkpoint and own:
        raise UserError(f"give a CHECKPOINT or your own model ({', '.join(own)}), not both")
    if args.checkpoint:
        return load_model(args.checkpoint, args.data_dir, args.device)
    if not own:
        raise UserError("give a CHECKPOINT (checkpoint.pt or its run folder), or your own model "
                        "with --model-entry MODULE:FUNCTION, --weights FILE and --dataset SPEC")
    return _user_model(args, args.weights)


def cmd_compare(args) -> int:
    from bnlab.infer.compare import compare_models, format_compare  # lazy
    from bnlab.infer.loading import load_model  # lazy
    from bnlab.store import RunDir  # lazy

    runs = [RunDir(Path(r).parent if Path(r).is_file() else Path(r)) for r in args.runs]
    for r, arg in zip(runs, args.runs):
        if not r.exists():
            raise UserError(f"{arg!r} is not a run folder (no config.json)")
    if (args.model_entry or args.dataset) and not args.weights:
        raise UserError("--model-entry and --dataset need --weights FILE (one per model)")
    if not runs and not args.weights:
        raise UserError("compare needs RUN folders, or --model-entry with --weights (one per "
                        "model) and --dataset")
    loaded = [load_model(r.path, args.data_dir, args.device) for r in runs]
    loaded += [_user_model(args, w) for w in args.weights or []]
    if args.out:
        out = Path(args.out)
    elif runs:
        out = runs[0].path.parent / "analysis"
    else:
        raise UserError("comparing your own models needs --out DIR (where compare.json goes)")
    labels = args.labels.split(",") if args.labels else None
    result = compare_models(loaded, out, labels, corruptions=not args.no_corruptions,
                            log=lambda m: None)
    print(format_compare(result))
    print(f"\nwrote {out / 'compare.json'} and {', '.join(result['figures'])}")
    return 0


def cmd_diagnose(args) -> int:
    from bnlab.infer.diagnose import diagnose, format_diagnose  # lazy

    loaded = _one_model(args)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    res = diagnose(loaded, sizes, args.precise_batches, args.max_images, log=lambda m: None)
    print(format_diagnose(res))
    run = loaded.run_dir
    if run is not None:
        run.write_json("diagnose.json", res)
        print(f"wrote {run.path / 'diagnose.json'}")
    return 0


def cmd_fold(args) -> int:
    from bnlab.infer.fold_report import fold_command  # lazy

    return fold_command(_one_model(args), args.onnx, args.repeats)


def _positive_list(text: str) -> str:
    try:
        ok = all(int(b) > 0 for b in text.split(","))
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of positive integers: "
                                         f"{text!r}")
    return text


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


def cmd_bench(args) -> int:
    from bnlab.bench import BenchArgs, check_args, run_all  # lazy

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    a = BenchArgs(data=args.data, data_dir=args.data_dir, model=args.model,
                  batch_size=args.batch_size, steps=args.steps, k=args.k, device=args.device,
                  workers=args.workers, compile_mode=args.compile_mode,
                  cuda_graph=args.cuda_graph, cpu_kernels=args.cpu_kernels)
    check_args(a, variants, precisions, args.timeout)
    rows = run_all(a, variants, precisions, args.timeout, print, args.out)
    return 0 if all("error" not in r for r in rows) else 1


def _cpu_shared(jobs: int) -> bool:
    """Whether this study's runs will share the CPU: several jobs, or a machine already busy
    (1-minute load average of at least half its cores). Then idle OpenMP threads should sleep
    rather than spin; on a CPU of its own, spinning is faster (15-20% per ResNet-20 step on
    the 2-core reference machine)."""
    if jobs > 1:
        return True
    try:
        cores = len(os.sched_getaffinity(0))
        return os.getloadavg()[0] >= cores / 2
    except (AttributeError, OSError):
        return False


def cmd_study(args) -> int:
    if args.study_command == "run" and _cpu_shared(args.jobs):  # before torch loads
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see study.executors.passive_openmp
    from bnlab.study import spec as specs  # lazy
    from bnlab.study import status  # lazy

    if args.study_command == "list":
        print(status.list_text())
        return 0
    if args.study_command == "run":
        from bnlab.report.analysis import compare_selected  # lazy
        from bnlab.study.runner import run_study, unfinished  # lazy

        sp = specs.load_spec(args.spec)
        sets = specs.parse_assignments(args.set, "--set")
        if args.device:
            sets.append(("device", args.device))
        if args.tensorboard:
            sets.append(("tensorboard", True))
        plan = specs.expand(sp, sets, specs.parse_assignments(args.only, "--only"),
                            specs.parse_data_map(args.data_map))
        specs.preflight(plan)
        out = args.out or str(specs.DEFAULT_ROOT / sp.name)
        line, todo = status.plan_estimate(plan, out)
        print(line, flush=True)  # before anything starts, and before a refusal
        status.confirm_size(plan, todo, args.yes)
        counts = run_study(plan, out, jobs=args.jobs, pack=not args.no_pack,
                           executor=args.executor, options=_slurm_options(args),
                           pack_cpu=args.pack_cpu)
        compare_selected(out)
        print(f"study {sp.name}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
              + f" -> {out} (next: bnlab study report {out})")
        return 1 if unfinished(counts) else 0
    out = status.resolve_out(args.target, args.out)
    if args.study_command == "status":
        if args.format == "table":
            print(status.status_text(out))
        else:
            records = status.status_records(out)[2]
            sys.stdout.write(records_csv(records) if args.format == "csv"
                             else records_json(records))
        return 0
    from bnlab.errors import StorageError  # lazy
    from bnlab.report import write_report  # lazy

    refs = getattr(args, "references", None)
    try:
        written = write_report(out, args.report_dir, refs)
    except StorageError as e:
        if args.report_dir:
            raise
        raise StorageError(f"{e} (write the report elsewhere with --report-dir DIR)") from None
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


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


def _slurm_options(args) -> SlurmOptions | None:
    if args.executor == "local":
        return None
    return SlurmOptions(partition=args.partition, gpus_per_run=args.gpus_per_run,
                        cpus_per_gpu=args.cpus_per_gpu, time=args.time, mem_gb=args.mem,
                        parallel=args.parallel, account=args.account).validate()


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
    sr.add_argument("--jobs", type=int, default=1, metavar="N",
                    help="runs trained at once, each in its own process (one GPU each when "
                    "several exist)")
    sr.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                    help="device of every run (default: the spec's, else auto)")
    sr.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a run option in every run (repeatable)")
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


def _one_line(e: BaseException) -> str:
    # An error raised in a DataLoader worker comes back with the worker's traceback in its
    # message; its last line is the message that was raised.
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    for prefix in ("bnlab.errors.UserError: ", "bnlab.errors.StorageError: "):
        text = text.removeprefix(prefix)
    return text


# OSErrors that are the file system's answer about a path (full, read-only, no permission, a
# file where a folder should be): the user's to fix, so one line; any other stays a traceback
FILE_SYSTEM_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                      errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG,
                      errno.ENOENT}


def _quiet_stdout() -> None:
    """After a broken pipe (`bnlab norms --table | head -1`), send what is left of stdout to
    /dev/null, so Python's flush at exit does not report the pipe a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed
        return e.code if isinstance(e.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except UserError as e:
        sys.stderr.write(f"bnlab: error: {_one_line(e)}\n")
        return 2
    except BrokenPipeError:  # the reader went away: nothing left to say, to no one
        _quiet_stdout()
        return 141  # 128 + SIGPIPE, what a program killed by the broken pipe returns
    except OSError as e:
        if e.errno not in FILE_SYSTEM_ERRNOS or e.filename is None:
            raise
        sys.stderr.write(f"bnlab: error: cannot use {str(e.filename)!r}: {e.strerror}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("bnlab: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
