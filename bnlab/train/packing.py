"""Deciding what trains together as a pack (bnlab.train.packed): which runs can share one
grouped network, and how a study's runs are split into packs and lone runs.

What may differ between the runs of a pack: PER_RUN below (their seeds, learning rates and
schedules, norm and init: a BN run, a plain no-BN run and a Fixup run share a pack, as
bnlab.models.grouped describes; their probes, each run's own). Everything in SHARED must be
equal; every other field must stay at its default.

Whether the networks themselves pack is decided by building them (`_build_and_check`, torch);
the estimate of a study's time asks the same question of the names alone (`build=False`:
bnlab's packable models and norms), so that `bnlab study list` runs without torch.
tests/test_packing_plan.py checks that the two answers split every built-in study alike.
"""

from __future__ import annotations

from bnlab.config import FIELDS, RunConfig
from bnlab.errors import UserError
from bnlab.models.names import PACKABLE_MODELS
from bnlab.norm import PACKABLE_NORMS

PER_RUN = ("seed", "norm", "init", "init_options", "lr", "momentum", "weight_decay",
           "decay_norm_and_bias", "schedule", "warmup_epochs", "tensorboard", "probe_every",
           "probe_step_sizes")
# fields that may be anything as long as it is the same for every run of the pack
SHARED = ("dataset", "data_dir", "download", "limit_train", "limit_test", "val_fraction",
          "augment", "model", "norm_options", "placement", "first_k", "batch_size", "epochs",
          "label_smoothing", "nesterov", "device", "precision", "eval_batch_size", "workers",
          "compile", "cuda_graph", "cpu_kernels")


def can_pack(cfgs: list[RunConfig], build: bool = True) -> str | None:
    """None when `cfgs` can train as one pack, else the reason they cannot (build=False: from
    the names of their models and norms, without building the networks)."""
    if len(cfgs) < 2:
        return "a pack needs at least 2 runs"
    if len({c.run_id() for c in cfgs}) < len(cfgs):
        return "two configs of the pack are the same run"
    first = cfgs[0]
    for name in FIELDS:
        if name in PER_RUN:
            continue
        values = {repr(getattr(c, name)) for c in cfgs}
        if name not in SHARED:  # a field packing does not implement must stay at its default
            default = RunConfig().__getattribute__(name)
            if any(getattr(c, name) != default for c in cfgs):
                return f"{name} is not supported by packed training (only its default)"
        elif len(values) > 1:
            return f"{name} differs between the runs ({', '.join(sorted(values))})"
    if first.model.startswith("torchvision:") or first.model in ("resnet18", "resnet50"):
        return (f"model {first.model!r} is not packable: the grouped network is built and "
                "tested for bnlab's own models, not for torchvision's block types (packable: "
                f"{', '.join(PACKABLE_MODELS)})")
    if first.model not in PACKABLE_MODELS:
        return f"model {first.model!r} is not packable (packable: {', '.join(PACKABLE_MODELS)})"
    for c in cfgs:
        if c.norm not in PACKABLE_NORMS:
            return f"norm {c.norm!r} is not packable (packable: {', '.join(PACKABLE_NORMS)})"
    if first.model == "mlp3x100" and first.placement != "post_conv":
        return "mlp3x100 supports placement post_conv only"
    return _structure_reason(cfgs) if build else None


_STRUCTURE: dict[tuple, str | None] = {}  # the networks of a call -> its answer


def _structure_reason(cfgs: list[RunConfig]) -> str | None:
    """Build each distinct (norm, init)'s model (RNG state kept) and look for layers without a
    packed form (norm variants of other classes, Fixup/SkipInit scalars, ...) and for networks
    that cannot share a pack. The answer depends on the networks alone (_network), so it is
    kept per process: a study's estimate asks it of the same few networks many times."""
    key = tuple(dict.fromkeys((*_network(c), c.model_source) for c in cfgs))
    if key not in _STRUCTURE:
        _STRUCTURE[key] = _build_and_check(cfgs)
    return _STRUCTURE[key]


def _build_and_check(cfgs: list[RunConfig]) -> str | None:
    import torch  # the networks are built here only: planning by names stays torch-free

    from bnlab.models import build_model
    from bnlab.models.grouped import NotPackable, check_packable, empty_pack

    seen, models = set(), []
    for c in cfgs:
        key = (c.norm, c.init, repr(c.init_options))
        if key in seen:
            continue
        seen.add(key)
        channels, size = (1, 28) if c.model.startswith("mlp") else (3, 32)
        # on the meta device: the layers' structure without allocating or initializing weights
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            try:
                model = build_model(c.model, 10, norm=c.norm, init=c.init, in_channels=channels,
                                    image_size=size, placement=c.placement, first_k=c.first_k,
                                    norm_options=c.norm_options, init_options=c.init_options)
                check_packable(model)
            except NotPackable as e:
                return f"{e} (init {c.init!r}, norm {c.norm!r})"
            except UserError as e:
                return str(e)
        models.append(model)
    if len(models) > 1:
        try:
            with torch.device("meta"):
                empty_pack(models)
        except NotPackable as e:
            return str(e)
    return None


def _names_reason(c: RunConfig) -> str | None:
    """Why `c`'s network is not packable, judged by its model's and norm's names alone."""
    if c.model not in PACKABLE_MODELS:
        return f"model {c.model!r} is not packable"
    if c.norm not in PACKABLE_NORMS:
        return f"norm {c.norm!r} is not packable"
    return None


def pack_groups(cfgs: list[RunConfig], max_k: int = 16,
                build: bool = True) -> list[list[RunConfig]]:
    """Split `cfgs` into packs (lists of 2..max_k packable runs, in input order) and lone
    runs (lists of one). A study runner trains each list of two or more with `train_packed`
    and each single one with its usual executor. Packing pays on GPUs, where one small run
    leaves most of the device idle; on a CPU a grouped convolution costs more per run than K
    plain ones (docs/speed.md), so runners pack CUDA runs only.

    Runs that share every SHARED field form a group. A group whose networks can share one
    pack (BN, no BN, Fixup, ...: bnlab.models.grouped) stays whole; otherwise it is split by
    norm, and where that is not enough by network (norm, init and its options). A group
    larger than max_k is cut into the fewest packs of at most max_k runs, of sizes as equal
    as they can be (21 runs, max_k 16: 11 and 10, not 16 and a small pack of 5).

    build=False decides from the names alone (see the module docstring): for estimates."""
    groups: dict[tuple, list[RunConfig]] = {}
    out: list[list[RunConfig]] = []
    alone: dict[tuple, bool] = {}  # a network that cannot be packed at all trains alone ...
    for c in cfgs:
        net = _network(c)
        if net not in alone:
            alone[net] = (_structure_reason([c]) if build else _names_reason(c)) is not None
        if alone[net]:  # ... and does not stop the others of its group from packing
            out.append([c])
            continue
        key = tuple(repr(getattr(c, n)) for n in FIELDS if n not in PER_RUN)
        groups.setdefault(key, []).append(c)
    for members in groups.values():
        for sub in _mixable(members, max_k, build):
            for chunk in _balanced(sub, max_k):
                if len(chunk) > 1 and can_pack(chunk, build) is None:
                    out.append(chunk)
                else:
                    out.extend([c] for c in chunk)
    return out


def _network(c: RunConfig) -> tuple:
    """What decides a run's network (the fields a pack may not vary are its group's)."""
    return (c.model, c.norm, c.init, repr(c.init_options), c.placement, c.first_k,
            repr(c.norm_options))


def _mixable(members: list[RunConfig], max_k: int, build: bool) -> list[list[RunConfig]]:
    """`members` as one list when their networks can share a pack, else split by norm, else
    by network."""
    for key in (lambda c: (), lambda c: c.norm, _network):
        subs: dict = {}
        for c in members:
            subs.setdefault(key(c), []).append(c)
        if all(len(s) < 2 or _one_pack_reason(s, max_k, build) is None
               for s in subs.values()):
            return list(subs.values())
    return list(subs.values())


def _one_pack_reason(members: list[RunConfig], max_k: int, build: bool) -> str | None:
    """can_pack of one run of each network in `members` (the networks decide whether they
    mix; the per-run fields always do), at most max_k of them."""
    firsts: dict[tuple, RunConfig] = {}
    for c in members:
        firsts.setdefault(_network(c), c)
    nets = list(firsts.values())[:max_k]
    return None if len(nets) < 2 else can_pack(nets, build)


def _balanced(runs: list[RunConfig], max_k: int) -> list[list[RunConfig]]:
    """`runs` in order, cut into the fewest chunks of at most max_k, sizes differing by <= 1."""
    n = len(runs)
    chunks = max(1, -(-n // max_k))
    size, extra = divmod(n, chunks)
    out, i = [], 0
    for j in range(chunks):
        take = size + (1 if j < extra else 0)
        out.append(runs[i:i + take])
        i += take
    return out
