"""One function per `bnlab` command: the parsed flags in, one call of the Python API, its
answer printed; the exit status out. The API (bnlab.api) does the work and every check.

The API is imported inside each command (the `# lazy` imports): it loads torch, about 2 s,
which `bnlab --help` and a mistyped flag should not pay; `study run` and `train` set
OMP_WAIT_POLICY before it loads.
"""

from __future__ import annotations

import os
import sys

from bnlab import machine
from bnlab.config import FIELDS
from bnlab.console import format_table, records_csv, records_json
from bnlab.errors import UserError


def run_overrides(args) -> dict:
    """The run options given as flags (those not given stay unset, so --config fills them)."""
    return {k: v for k, v in vars(args).items() if k in FIELDS}


def cpu_shared(jobs: int) -> bool:
    """Whether this command's runs will share the CPU: several jobs, or a machine already busy
    (bnlab.machine.cpu_busy, read before this command's own work loads it). Then idle OpenMP
    threads should sleep rather than spin; on a CPU of its own, spinning is faster (15-20% per
    ResNet-20 step on the 2-core reference machine)."""
    return jobs > 1 or machine.cpu_busy()


def _passive_openmp_if_shared(jobs: int) -> None:
    if cpu_shared(jobs):  # before torch loads
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see study.executors.passive_openmp


def _records(fmt: str, records: list[dict]) -> None:
    sys.stdout.write(records_csv(records) if fmt == "csv" else records_json(records))


# -- runs --------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    _passive_openmp_if_shared(max(1, args.nproc))
    from bnlab import api  # lazy

    try:
        run = api.train_run(out=args.out, config=args.config, resume=args.resume,
                            nproc=args.nproc, **run_overrides(args))
    except api.LaunchFailed as e:  # torchrun's processes said why
        return e.returncode
    if run.main_process and not args.nproc:  # with --nproc, rank 0's own process printed it
        print(run.line())
    return 0


def cmd_runs(args) -> int:
    from bnlab import api  # lazy

    if args.rebuild_index:
        path, n = api.rebuild_index(args.out)
        print(f"rebuilt {path} from {n} run folders",
              file=sys.stdout if args.format == "table" else sys.stderr)  # keep csv/json clean
    rows = api.run_rows(args.out)
    if args.format != "table":
        _records(args.format, api.load_runs(args.out, records=True))
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


# -- what bnlab offers -------------------------------------------------------------------------
def cmd_datasets(args) -> int:
    from bnlab import api  # lazy

    for name, text in api.list_datasets().items():
        print(f"{name:18s} {text}")
    return 0


def cmd_models(args) -> int:
    from bnlab import api  # lazy

    for name, text in api.list_models().items():
        print(f"{name:18s} {text}")
    print("\ntorchvision:NAME, by family:")
    for family, text in api.model_families():
        print(f"  {family:16s} {text}")
    return 0


def cmd_norms(args) -> int:
    from bnlab import api  # lazy

    if args.table:
        print(api.norm_output_table())
        return 0
    for name, (text, options) in api.list_norms().items():
        opts = ", ".join(f"{k}={v}" for k, v in options.items() if v is not None)
        print(f"{name:13s} {text}" + (f"\n{'':13s}   options: {opts}" if opts else ""))
    return 0


# -- inference tools ---------------------------------------------------------------------------
def _own_flags(args, weights) -> list[str]:
    return [f for f, v in (("--model-entry", args.model_entry), ("--weights", weights),
                           ("--dataset", args.dataset)) if v]


def _one_model(args, api):
    """The model `diagnose` or `fold` works on, as the API takes it: a checkpoint path or
    the user's own (which flags go together is the command line's to say)."""
    own = _own_flags(args, args.weights)
    if args.checkpoint and own:
        raise UserError(f"give a CHECKPOINT or your own model ({', '.join(own)}), not both")
    if args.checkpoint:
        return args.checkpoint
    if not own:
        raise UserError("give a CHECKPOINT (checkpoint.pt or its run folder), or your own model "
                        "with --model-entry MODULE:FUNCTION, --weights FILE and --dataset SPEC")
    missing = [f for f in ("--model-entry", "--weights", "--dataset") if f not in own]
    if missing:
        raise UserError(f"your own model needs --model-entry MODULE:FUNCTION, --weights FILE "
                        f"and --dataset SPEC; missing {', '.join(missing)}")
    return api.UserModel(args.model_entry, args.weights)


def cmd_compare(args) -> int:
    from bnlab import api  # lazy

    if (args.model_entry or args.dataset) and not args.weights:
        raise UserError("--model-entry and --dataset need --weights FILE (one per model)")
    if not args.runs and not args.weights:
        raise UserError("compare needs RUN folders, or --model-entry with --weights (one per "
                        "model) and --dataset")
    if args.weights and not (args.model_entry and args.dataset):
        missing = [f for f, v in (("--model-entry", args.model_entry),
                                  ("--dataset", args.dataset)) if not v]
        raise UserError(f"your own model needs --model-entry MODULE:FUNCTION, --weights FILE "
                        f"and --dataset SPEC; missing {', '.join(missing)}")
    models = [*args.runs, *(api.UserModel(args.model_entry, w) for w in args.weights or [])]
    res = api.compare(models, args.dataset, out=args.out,
                      labels=args.labels.split(",") if args.labels else None,
                      data_dir=args.data_dir, device=args.device,
                      corruptions=not args.no_corruptions, batch_size=128)
    print(res.text())
    print(f"\nwrote {res.written[0]} and {', '.join(p.name for p in res.written[1:])}")
    return 0


def cmd_diagnose(args) -> int:
    from bnlab import api  # lazy

    model = _one_model(args, api)
    res = api.diagnose(model, args.dataset, batch_sizes=[int(b) for b in
                                                         args.batch_sizes.split(",")],
                       precise_batches=args.precise_batches, max_images=args.max_images,
                       data_dir=args.data_dir, device=args.device, batch_size=args.batch_size,
                       mean=args.mean, std=args.std,
                       write_recalibrated=args.write_recalibrated)
    print(res.text())
    for path in (res.written, res.recalibrated):
        if path is not None:
            print(f"wrote {path}")
    return 0


def cmd_fold(args) -> int:
    from bnlab import api  # lazy

    model = _one_model(args, api)
    res = api.fold(model, data=args.dataset, onnx=args.onnx, repeats=args.repeats,
                   data_dir=args.data_dir, device=args.device)
    print(res.text())
    if res.written is not None:
        print(f"wrote {res.written}")
    if res.failure:
        print(res.failure, file=sys.stderr)
        return 1
    return 0


def cmd_bench(args) -> int:
    from bnlab import api  # lazy

    rows = api.bench_speed(
        [v.strip() for v in args.variants.split(",") if v.strip()],
        [p.strip() for p in args.precision.split(",") if p.strip()], args.timeout,
        args.out, print, records=True, data=args.data, data_dir=args.data_dir,
        model=args.model, batch_size=args.batch_size, steps=args.steps, k=args.k,
        device=args.device, workers=args.workers, compile_mode=args.compile_mode,
        cuda_graph=args.cuda_graph, cpu_kernels=args.cpu_kernels)
    return 0 if all("error" not in r for r in rows) else 1


# -- studies -----------------------------------------------------------------------------------
def cmd_study(args) -> int:
    if args.study_command == "run":  # auto: its parallel workers set their own (executors)
        _passive_openmp_if_shared(1 if args.jobs == "auto" else args.jobs)
    from bnlab import api  # lazy

    if args.study_command == "list":
        print(api.list_studies(text=True))
        return 0
    if args.study_command == "run":
        study = api.Study.from_spec(args.spec, set=args.set, only=args.only,
                                    data_map=args.data_map, device=args.device,
                                    tensorboard=args.tensorboard, out=args.out,
                                    seeds=args.seeds)
        slurm = None if args.executor == "local" else dict(
            partition=args.partition, gpus_per_run=args.gpus_per_run,
            cpus_per_gpu=args.cpus_per_gpu, time=args.time, mem_gb=args.mem,
            parallel=args.parallel, account=args.account)
        counts = study.run(jobs=args.jobs, pack=not args.no_pack, executor=args.executor,
                           slurm=slurm, pack_cpu=args.pack_cpu, yes=args.yes)
        print(f"study {study.name}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
              + f" -> {study.out} (next: bnlab study report {study.out})")
        return 1 if counts.unfinished else 0
    if args.study_command == "status":
        if args.format == "table":
            print(api.study_status_text(args.target, args.out))
        else:
            _records(args.format, api.study_status(args.target, args.out, records=True))
        return 0
    written = api.write_report(args.target, args.out, args.report_dir,
                               getattr(args, "references", None))
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0
