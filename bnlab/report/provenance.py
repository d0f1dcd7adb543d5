"""The reproducibility appendix: exact configurations, data sizes, versions and hardware.

Everything comes from the runs' own config.json files ("config", "data", "model", "env") and
study.json; a key is listed as common only when every run that has a config.json agrees on it.
"""

from __future__ import annotations

import json
import math
import re

from bnlab.numbers import fmt_value
from bnlab.report.arms import Arm
from bnlab.report.document import Block, Code, Heading, KeyValues, Paragraph
from bnlab.report.load import Study

ENV_KEYS = ("bnlab", "git_commit", "torch", "cuda", "python", "platform", "device",
            "device_name", "torch_threads")


def _json(v) -> str:
    return json.dumps(v, sort_keys=True)


def common_config(study: Study) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(keys equal in every run, keys that differ with their distinct values in run order)."""
    configs = [r.config for r in study.runs if r.config is not None]
    if not configs:
        return [], []
    common, varying = [], []
    for key in configs[0]:
        vals = list(dict.fromkeys(_json(c.get(key)) for c in configs))
        if len(vals) == 1:
            common.append((key, fmt_value(configs[0].get(key))))
        else:
            varying.append((key, ", ".join(fmt_value(json.loads(v)) for v in vals)))
    return common, varying


def provenance(study: Study, arms: list[Arm]) -> list[Block]:
    out: list[Block] = [Heading(2, "Configuration, data and environment", "provenance")]
    common, varying = common_config(study)
    if common:
        out.append(KeyValues("Run configuration shared by all runs", common))
    if varying:
        out.append(KeyValues("Configuration keys that vary between runs", varying))
    if any(a.label != a.full_label for a in arms):
        out.append(KeyValues("Full values of each arm (labels leave out values that follow "
                             "from the others or do not apply to the arm)",
                             list(dict.fromkeys((a.label, a.full_label) for a in arms))))
    overrides = [(f"--set {k}", fmt_value(v)) for k, v in study.sets.items()]
    overrides += [(f"--only {k}", fmt_value(v)) for k, v in study.only.items()]
    overrides += [(f"--data-map {k}", fmt_value(v)) for k, v in study.data_map.items()]
    if overrides:
        out.append(KeyValues("Command-line overrides of the spec", overrides))
    split = _batch_split(study)
    if split:
        out.append(KeyValues("Batch per device: BN normalizes over the normalization batch",
                             split))
    data = _data_pairs(study)
    if data:
        out.append(KeyValues("Data", data))
    sizes = _model_sizes(arms)
    if sizes:
        out.append(KeyValues("Model parameters", sizes))
    envs: dict[str, list[str]] = {}
    for r in study.runs:
        if r.env is not None:
            envs.setdefault(_json({k: r.env.get(k) for k in ENV_KEYS}), []).append(r.run_id)
    for i, (key, run_ids) in enumerate(envs.items(), 1):
        env = json.loads(key)
        title = "Software and hardware" + (f" ({i} of {len(envs)})" if len(envs) > 1 else "")
        pairs = [(k, fmt_value(env[k]) if env[k] is not None else "none") for k in ENV_KEYS]
        pairs.append(("runs", f"{len(run_ids)} of {len(study.runs)}"))
        out.append(KeyValues(title, pairs))
    walls = [w for w in (r.summary.get("wall_time") for r in study.runs)
             if isinstance(w, int | float) and math.isfinite(w)]
    if walls:
        total = sum(walls)
        took = f"{total / 60:.1f} minutes" if total >= 120 else f"{total:.1f} s"
        out.append(Paragraph(f"Total training time recorded by the runs: {took} over "
                             f"{len(walls)} runs "
                             "(sum of per-run wall times; runs may have overlapped).",
                             small=True))
    if study.spec:
        out.append(Code(to_toml(study.spec), "Study specification as loaded (study.json's "
                        "\"spec\", written back as TOML)", "toml"))
    return out


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else json.dumps(k)


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) \
            else repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }" \
            if v else "{}"
    return json.dumps(str(v))


def _table_array(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def to_toml(spec: dict) -> str:
    """The spec dict as TOML: top-level values, then [tables] and [[arrays of tables]]."""
    lines = [f"{_key(k)} = {_value(v)}" for k, v in spec.items()
             if not isinstance(v, dict) and not _table_array(v)]
    for k, v in spec.items():
        if isinstance(v, dict):
            lines += ["", f"[{_key(k)}]"] + [f"{_key(a)} = {_value(b)}" for a, b in v.items()]
        elif _table_array(v):
            for item in v:
                lines += ["", f"[[{_key(k)}]]"]
                lines += [f"{_key(a)} = {_value(b)}" for a, b in item.items()]
    return "\n".join(lines).strip() + "\n"


def _data_pairs(study: Study) -> list[tuple[str, str]]:
    seen: dict[tuple, str] = {}
    for r in study.runs:
        d = r.data
        if not d:
            continue
        source = (r.config or {}).get("dataset", r.dataset)
        key = (r.dataset, source, d.get("n_train"), d.get("n_test"))
        if key in seen:
            continue
        classes = d.get("classes") or []
        named = f"{source}: " if source != r.dataset else ""
        seen[key] = (f"{named}{d.get('n_train')} training and {d.get('n_test')} test images, "
                     f"{len(classes)} classes, {d.get('image_size')} px"
                     + (", streamed from disk" if d.get("streamed") else ""))
    return [(k[0], v) for k, v in seen.items()]


def _model_sizes(arms: list[Arm]) -> list[tuple[str, str]]:
    """Parameter count per architecture (lr, seed and the like do not change it)."""
    out = {}
    for a in arms:
        for r in a.runs:
            params = (r.model or {}).get("parameters")
            c = r.config
            if params is None or c is None:
                continue
            name = f"{c.get('model')}, norm={c.get('norm')}, placement={c.get('placement')}"
            if c.get("placement") == "first_k":
                name += f" (first_k={c.get('first_k')})"
            out.setdefault(f"{name} on {a.dataset}", f"{params:,}")
    return list(out.items())


def _batch_split(study: Study) -> list[tuple[str, str]]:
    """One line per distinct split of the global batch across processes (config.json's
    "distributed"), with its number of runs."""
    splits: dict[str, int] = {}
    for r in study.runs:
        d = r.distributed
        if not d:
            continue
        text = (f"{d['world_size']} x {d['per_device_batch']} = {d['global_batch']} images, "
                f"normalization batch {d['norm_batch']}" + (" (SyncBN)" if d["sync_bn"] else ""))
        splits[text] = splits.get(text, 0) + 1
    n = len(study.runs)
    return [(f"processes x per device = global ({k} of {n} runs)", text)
            for text, k in splits.items()]

