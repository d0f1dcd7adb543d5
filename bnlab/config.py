"""Run configuration: one frozen dataclass, loaded from TOML and/or flags, validated in one place.

Every field carries its help text and unit as metadata, so `bnlab train --help` and the README's
option table come from the same source as the defaults.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnlab.errors import StorageError, UserError, suggest
from bnlab.usercode import ENTRY, NOT_FOR_ENTRIES, model_tag, resolve_entry
from bnlab.values import finite, integer, kind_of, option_value


def _f(default, help: str, unit: str = "", choices: tuple = (), **kw):
    meta = {"help": help, "unit": unit, "choices": choices}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


SCHEDULES = ("step", "cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")  # what a run trains in
PRECISION_CHOICES = (*PRECISIONS, "auto")  # what a config may ask for (auto: chosen per machine)
PLACEMENTS = ("post_conv", "post_act", "first_k")
LR_SCALINGS = ("none", "linear")
PROBE_STEP_SIZES = "0.005,0.05,0.5"


@dataclass(frozen=True)
class RunConfig:
    # data
    dataset: str = _f("cifar10", "cifar10 | cifar100 | mnist | fashion-mnist | "
                      "imagefolder:PATH (a folder, or a .tar/.tar.gz of one) | synthetic")
    data_dir: str = _f("", "folder holding the dataset files (default: $BNLAB_DATA, "
                       "else ./data)")
    download: bool = _f(False, "download cifar/mnist files when missing (needs a network)")
    limit_train: int = _f(0, "use only the first N training images, chosen by a fixed "
                          "shuffle (0 = all)", "images")
    limit_test: int = _f(0, "use only the first N test images (0 = all)", "images")
    val_fraction: float = _f(0.0, "hold out this fraction of each class's training images "
                             "(after limit_train; a fixed split, the same for every run and "
                             "seed) as a validation set evaluated every epoch; studies select "
                             "tuned values on it (0 = none)", "fraction")
    image_size: int = _f(0, "side of the crops of streamed (large-image) data, 0 = 224 "
                         "(smaller sizes make CPU runs of ImageNet-style data affordable); for "
                         "small images (an image folder of at most 64 px) every image is "
                         "resized to it, 0 = their own common size", "px")
    augment: bool = _f(True, "pad-4 random crop + horizontal flip for small images; "
                       "RandomResizedCrop + flip for large ones")
    # model
    model: str = _f("resnet20", "resnet20|32|44|56|110 | plain20|32|44|56|110 | "
                    "vgg11|13|16|19 | mlp3x100 | resnet18 | resnet50 | torchvision:NAME "
                    "(see `bnlab models`) | entry:MODULE:FUNCTION (your own network: a "
                    "function of num_classes and norm, docs/models.md)")
    model_source: str = _f("", "set by bnlab for an entry: model (leave it unset): the first 16 "
                           "hex digits of the sha256 of the entry's module file, part of the "
                           "run id, so that an edited file makes new runs")
    norm: str = _f("bn", "normalization layer (see `bnlab norms`)")
    norm_options: dict = _f({}, "extra options for the norm layer, e.g. '{\"momentum\": 0.01}'")
    placement: str = _f("post_conv", "where norms sit in a CIFAR ResNet, plain net or VGG",
                        choices=PLACEMENTS)
    first_k: int = _f(1, "with placement=first_k: blocks (VGG: conv layers) that keep their "
                      "norms", "blocks")
    init: str = _f("kaiming", "weight initialization (see bnlab.models.init)")
    init_options: dict = _f({}, "extra options for the initialization, e.g. "
                          "'{\"mode\": \"fan_out\"}'")
    dropout: float = _f(0.0, "dropout probability before the classifier", "probability")
    # optimization
    lr: float = _f(0.1, "peak learning rate of SGD", "per step")
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(False, "Nesterov momentum")
    weight_decay: float = _f(1e-4, "L2 weight decay coefficient")
    decay_norm_and_bias: bool = _f(False, "also apply weight decay to norm parameters and "
                                   "biases")
    schedule: str = _f("step", "lr schedule: step (/10 at 50% and 75% of training, He et al. "
                       "2016) | cosine | constant", choices=SCHEDULES)
    warmup_epochs: float = _f(0.0, "linear lr warm-up from 0", "epochs")
    lr_scaling: str = _f("none", "none: lr is the peak lr | linear: the peak lr is "
                         "lr x batch_size / 256 (Goyal et al. 2017; lr=0.1 gives ResNet's "
                         "0.1 x batch/256)", choices=LR_SCALINGS)
    batch_size: int = _f(128, "GLOBAL training batch size: under data-parallel training each "
                         "of N processes gets batch_size / N", "images")
    epochs: int = _f(10, "training epochs", "epochs")
    grad_clip: float = _f(0.0, "clip the global gradient norm to this value before each step "
                          "(0 = off); lets a no-BN ResNet take larger learning rates")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy", "probability")
    seed: int = _f(0, "seed of initialization, data order and augmentation")
    # execution
    device: str = _f("auto", "auto | cpu | cuda", choices=DEVICES)
    precision: str = _f("fp32", "fp32 | bf16 (autocast; norm statistics stay fp32) | auto "
                        "(bf16 where it is measured faster on this machine, else fp32; chosen "
                        "by `bnlab train` and `study run` before the run starts, and the run's "
                        "config records the choice)", choices=PRECISION_CHOICES)
    eval_batch_size: int = _f(1000, "batch size of evaluation", "images")
    workers: int = _f(4, "DataLoader worker processes for streamed (large-image) data",
                      "processes")
    sync_bn: bool = _f(False, "data-parallel on GPUs: BatchNorm statistics over the global "
                       "batch (SyncBatchNorm) instead of each device's share")
    probe_every: int = _f(0, "record probes every N steps (0 = off)", "steps")
    probe_images: int = _f(1000, "the activation probes are taken on one fixed batch of this "
                           "many images, drawn once from the validation split (the test split "
                           "without one), the same for every step, arm and seed; 0 = on each "
                           "probe step's own training batch", "images")
    probe_step_sizes: str = _f(PROBE_STEP_SIZES, "absolute step sizes along -gradient of the "
                               "smoothness probes, comma-separated; keep them the same for "
                               "every arm of a study", "per step")
    tensorboard: bool = _f(False, "also write TensorBoard event files under OUT/tensorboard: "
                           "the epoch metrics, the first epoch's step losses, the run's "
                           "options and status for the HParams tab, and with probe_every > 0 "
                           "the probes as scalars and histograms (needs the tensorboard "
                           "package)")
    compile: bool = _f(False, "torch.compile the model (with CUDA graphs on a GPU); the first "
                       "steps are slower while it compiles")
    cuda_graph: bool = _f(True, "on a GPU, capture the whole training step (forward, backward, "
                          "update) in one CUDA graph after 3 ordinary steps and replay it")
    cpu_kernels: bool = _f(True, "on the CPU, run each BatchNorm with its ReLU and residual add "
                           "as one fused C++ kernel (built on first use; torch's ops where it "
                           "cannot be)")

    # -- derived -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field by name; containers copied (what dataclasses.asdict gives, at a tenth of
        its cost: a study's expansion asks it of every run)."""
        return {name: copy.deepcopy(v) if isinstance(v, dict | list | tuple) else v
                for name, v in ((f, getattr(self, f)) for f in _FIELD_NAMES)}

    def run_id(self) -> str:
        """Stable id: readable prefix + hash of every field that changes the result (fields
        of OPTIONAL_IN_ID only when they differ from their default, which is the behaviour
        runs had before the field existed: their ids stay valid). Computed once per config
        (the config is frozen)."""
        rid = self.__dict__.get("_run_id")
        if rid is None:
            rid = self._compute_run_id()
            object.__setattr__(self, "_run_id", rid)
        return rid

    def _compute_run_id(self) -> str:
        canon = {k: v for k, v in self.to_dict().items() if k not in NOT_IN_ID
                 and not (k in OPTIONAL_IN_ID and v == FIELDS[k].default)}
        if self.probe_every == 0:  # the probes' options change nothing without probes
            canon.pop("probe_step_sizes", None)
            canon.pop("probe_images", None)
        digest = hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()[:8]
        ds = dataset_tag(self.dataset)
        return f"{model_tag(self.model)}-{self.norm}-{ds}-s{self.seed}-{digest}"


def dataset_tag(dataset: str) -> str:
    """Short name of a dataset for ids: the folder or archive name for imagefolder:PATH."""
    if not dataset.startswith("imagefolder:"):
        return dataset
    name = Path(dataset.split(":", 1)[1].rstrip("/")).name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        name = name.removesuffix(suffix)
    return name or "folder"


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
_FIELD_NAMES = tuple(FIELDS)
# options that do not change what a run computes (where and how fast it runs)
NOT_IN_ID = {"device", "data_dir", "download", "eval_batch_size", "workers", "tensorboard",
             "compile", "cuda_graph", "cpu_kernels"}
# options that never tell two arms apart: the repetition (seed), the options that do not change
# what a run computes, and the probes, which measure without changing the trajectory. The report
# groups a study's runs into arms by the other options, and `compare` labels its runs by them.
NOT_ARM_KEYS = frozenset({"seed", "probe_every", "probe_step_sizes", "probe_images",
                          *NOT_IN_ID})
# options added later whose default is the earlier behaviour: in the id only when set
OPTIONAL_IN_ID = {"val_fraction", "probe_step_sizes", "model_source"}


@dataclass(frozen=True)
class Applies:
    """When an option changes what a run computes: `test` of the values of the options `reads`,
    and the same in words for the report's notes."""

    reads: tuple[str, ...]
    test: Callable[..., bool]  # of the values of `reads`, in order
    words: str


# Options that change a run only together with certain values of others. Such an option still
# has a value in every run (and in its id: the ids of runs already made must not change), but
# where it does not apply that value tells no two results apart, so the report leaves it out of
# the arm's label. The models read first_k only under placement first_k (bnlab.models), and a
# norm of none leaves every block without a norm whatever first_k says.
APPLIES = {
    "first_k": Applies(("placement", "norm"),
                       lambda placement, norm: placement == "first_k" and norm != "none",
                       "placement first_k with a norm other than none"),
}


def applies(key: str, value: Callable[[str], Any]) -> bool:
    """Whether option `key` changes what a run computes, given value(name), the run's value of
    another option (APPLIES). An option whose rule reads an unknown value (None) applies: a
    label that names a value too many misleads less than one that drops a difference."""
    rule = APPLIES.get(key)
    if rule is None:
        return True
    args = [value(k) for k in rule.reads]
    return any(a is None for a in args) or bool(rule.test(*args))


SEED_MAX = 2**32 - 1  # data-order generators are seeded with seed * 1_000_003 + epoch < 2**64
# model, norm, init: a plain name (a model may name its family: torchvision:NAME)
NAME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9_]*:)?[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def _coerce(name: str, value: Any) -> Any:
    """Convert a TOML/flag value to the field's type, or raise a one-line UserError."""
    default = FIELDS[name].default
    if FIELDS[name].default_factory is not dataclasses.MISSING:
        if not isinstance(value, dict):
            raise UserError(f"{name} must be a table like {{momentum = 0.1}}, got {value!r}")
        return {str(k): option_value(f"{name} {k}", v) for k, v in value.items()}
    kind = type(default)
    if name == "probe_step_sizes" and isinstance(value, list | tuple):  # a TOML array
        value = ",".join(str(v) for v in value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        s = str(value).lower() if isinstance(value, str | int) else ""
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise UserError(f"{name} must be true or false, got {value!r}")
    if kind is int:
        return integer(name, value)
    if kind is float:
        return finite(name, value)
    if not isinstance(value, str):
        raise UserError(f"{name} must be a string, got {kind_of(value)} ({value!r})")
    if not value.isprintable():
        raise UserError(f"{name} must be printable text, got {value!r}")
    return value


def require_trained_precision(cfg: RunConfig) -> None:
    """A run trains in fp32 or bf16: precision "auto" is chosen before it starts (by `bnlab
    train`, `study run` and bnlab.api, bnlab.study.calibrate.choose_precision)."""
    if cfg.precision not in PRECISIONS:
        raise UserError(f"run {cfg.run_id()} has precision {cfg.precision!r}: a run trains in "
                        f"{' or '.join(PRECISIONS)}; 'auto' is chosen by `bnlab train` and "
                        "`bnlab study run` (and bnlab.train_run, bnlab.Study) before it starts")


def validate(cfg: RunConfig) -> RunConfig:
    """Type, range and choice checks that need no imports of data or models; every value is
    checked again here, so a config made with dataclasses.replace is held to the same rules."""
    for name in FIELDS:
        _coerce(name, getattr(cfg, name))
    for name in ("model", "norm", "init"):
        if not (name == "model" and cfg.model.startswith(ENTRY)
                or NAME_RE.match(getattr(cfg, name))):
            raise UserError(f"{name} {getattr(cfg, name)!r} is not a name (letters, digits, "
                            "'_', '.', '+', '-')")
    if not 0 <= cfg.seed <= SEED_MAX:
        raise UserError(f"seed must be in 0..{SEED_MAX} (2^32-1), got {cfg.seed}")
    positive = {"lr": cfg.lr, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
                "eval_batch_size": cfg.eval_batch_size}
    for name, v in positive.items():
        if not v > 0:
            raise UserError(f"{name} must be > 0, got {v!r}")
    for name in ("limit_train", "limit_test", "weight_decay", "warmup_epochs", "momentum",
                 "workers", "probe_every", "probe_images", "image_size", "grad_clip", "first_k"):
        if getattr(cfg, name) < 0:
            raise UserError(f"{name} must be >= 0, got {getattr(cfg, name)!r}")
    if not 0.0 <= cfg.val_fraction <= 0.5:
        raise UserError(f"val_fraction must be in [0, 0.5], got {cfg.val_fraction!r}")
    for name in ("dropout", "label_smoothing"):
        v = getattr(cfg, name)
        if not 0.0 <= v < 1.0:
            raise UserError(f"{name} must be in [0, 1), got {v!r}")
    if cfg.warmup_epochs > cfg.epochs:
        raise UserError(f"warmup_epochs must be <= epochs ({cfg.epochs}), got {cfg.warmup_epochs}")
    for name, f in FIELDS.items():
        choices = f.metadata.get("choices")
        if choices and getattr(cfg, name) not in choices:
            v = getattr(cfg, name)
            raise UserError(f"{name} {v!r} is not accepted{suggest(v, choices)}; "
                            f"accepted: {', '.join(choices)}")
    step_sizes(cfg.probe_step_sizes)
    return _with_entry_source(cfg)


def _with_entry_source(cfg: RunConfig) -> RunConfig:
    """An entry: model's config with its .py path made absolute and its model_source filled in
    (bnlab.usercode.resolve_entry); a model_source on another model is refused."""
    if not cfg.model.startswith(ENTRY):
        if cfg.model_source:
            raise UserError(f"model_source is set by bnlab for entry: models only; model "
                            f"{cfg.model!r} takes none (got {cfg.model_source!r})")
        return cfg
    options = {k: (getattr(cfg, k), {} if k == "init_options" else FIELDS[k].default)
               for k in NOT_FOR_ENTRIES}
    model, digest = resolve_entry(cfg.model, cfg.model_source, options)
    if (model, digest) == (cfg.model, cfg.model_source):
        return cfg
    return dataclasses.replace(cfg, model=model, model_source=digest)


def step_sizes(text: str) -> tuple[float, ...]:
    """The step sizes of probe_step_sizes ("0.005,0.05,0.5"): finite numbers > 0, at least one."""
    try:
        out = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        out = ()
    if not out or not all(math.isfinite(v) and v > 0 for v in out):
        raise UserError(f"probe_step_sizes must be comma-separated numbers > 0 like "
                        f"{PROBE_STEP_SIZES!r}, got {text!r}")
    return out


def from_mapping(values: dict[str, Any], base: RunConfig | None = None,
                 where: str = "config") -> RunConfig:
    """Apply `values` (TOML table or flags) on top of `base`, checking every key."""
    out = {}
    for key, value in values.items():
        k = key.replace("-", "_")
        if k not in FIELDS:
            raise UserError(f"unknown key {key!r} in {where}{suggest(k, FIELDS)}; "
                            f"accepted: {', '.join(FIELDS)}")
        out[k] = _coerce(k, value)
    cfg = dataclasses.replace(base or RunConfig(), **out)
    return validate(cfg)


def to_flags(options: dict[str, Any]) -> list[str]:
    """The `bnlab train` flags that set `options` (the inverse of the flag parser: booleans as
    --x / --no-x, dicts as JSON), for the processes torchrun starts."""
    argv: list[str] = []
    for k, v in options.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            argv.append(flag if v else "--no-" + flag[2:])
        else:
            argv += [flag, json.dumps(v) if isinstance(v, dict) else str(v)]
    return argv


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {str(p)!r} " + ("is a folder, not a TOML file"
                                                     if p.is_dir() else "does not exist"))
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {str(p)!r} is not valid TOML: "
                        f"{' '.join(str(e).split())}") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {str(p)!r} is not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"cannot read config file {str(p)!r}: {e.strerror}") from None


def load(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """A RunConfig from an optional TOML file (top-level keys or a [run] table), then overrides."""
    base = RunConfig()
    if path is not None:
        data = read_toml(path)
        if "run" in data and isinstance(data["run"], dict):
            data = data["run"]
        base = from_mapping(data, where=str(path))
    return from_mapping(overrides or {}, base=base, where="flags")


def from_json_dict(d: dict[str, Any]) -> RunConfig:
    """Rebuild a stored config (config.json's `config` table); unknown keys are refused."""
    return from_mapping({k: v for k, v in d.items()}, where="stored config")


def cache_root() -> Path:
    """Where bnlab keeps what it can rebuild (decoded datasets, built kernels): $BNLAB_CACHE,
    else $XDG_CACHE_HOME/bnlab, else ~/.cache/bnlab; created on first use."""
    root = os.environ.get("BNLAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "bnlab")
    p = Path(root)
    try:
        p.mkdir(parents=True, exist_ok=True)
        if not os.access(p, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", str(p))
    except OSError as e:
        raise StorageError(f"cannot use the cache folder {str(p)!r}: "
                           f"{e.strerror or type(e).__name__} (set BNLAB_CACHE to a folder you "
                           "can write)") from None
    return p
