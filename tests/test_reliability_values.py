"""Values are validated once, strictly: every numeric option refuses inf and nan, integer
options refuse floats and out-of-range values, norm and init options are type-checked per
option, and any input to the config and spec parsers either gives a valid config or the one-line
UserError (property-based, with hypothesis)."""

from __future__ import annotations

import dataclasses
import datetime
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnlab import cli
from bnlab.config import FIELDS, SEED_MAX, RunConfig, from_mapping, validate
from bnlab.errors import UserError
from bnlab.models.init import OPTIONS as INIT_OPTIONS
from bnlab.norm import OPTIONS as NORM_OPTIONS
from bnlab.norm import make_norm
from bnlab.study.spec import expand, parse_assignments, parse_spec
from bnlab.values import INT_MAX

FLOATS = [n for n, f in FIELDS.items() if type(f.default) is float]
INTS = [n for n, f in FIELDS.items() if type(f.default) is int]


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", float("inf"), float("nan"), "1e999"])
def test_every_float_option_refuses_non_finite_values(name, value):
    with pytest.raises(UserError, match=f"^{name} must be a finite number"):
        from_mapping({name: value})


def test_warmup_nan_no_longer_means_no_warmup(capsys):
    assert cli.main(["train", "--warmup-epochs", "nan"]) == 2
    assert "warmup_epochs must be a finite number, got 'nan'" in capsys.readouterr().err


@pytest.mark.parametrize("name", INTS)
@pytest.mark.parametrize("value", [1e12, 2.0, "1e12", "2.5", True])
def test_every_integer_option_refuses_floats_and_booleans(name, value):
    with pytest.raises(UserError, match=f"^{name} must be an integer"):
        from_mapping({name: value})


@pytest.mark.parametrize("seed", [-1, SEED_MAX + 1, 2**63, str(2**64)])
def test_seed_out_of_range_is_refused(seed):
    with pytest.raises(UserError, match="^seed must be"):
        from_mapping({"seed": seed})
    assert from_mapping({"seed": SEED_MAX}).seed == SEED_MAX


def test_integers_beyond_int64_are_refused():
    with pytest.raises(UserError, match="2\\^63-1"):
        from_mapping({"epochs": INT_MAX + 1})


@pytest.mark.parametrize("options, needle", [
    ({"momentum": "fast"}, "norm 'bn' option momentum must be a finite number"),
    ({"eps": float("inf")}, "norm_options eps must be a finite number"),
    ({"affine": 1}, "norm 'bn' option affine must be true or false"),
    ({"convention": 3}, "norm 'bn' option convention must be a string"),
    ({"momentum": [0.1]}, "norm_options momentum must be a boolean, a number or a string"),
])
def test_norm_options_are_type_checked_per_option(options, needle):
    with pytest.raises(UserError, match=f"^{needle}"):
        make_norm("bn", 4, **from_mapping({"norm_options": options}).norm_options)


def test_option_checks_cover_every_table_entry():
    """Each option of every norm and init accepts its own default and refuses a value of
    another type (an integer-valued option refuses 1.5; the others refuse a list's string)."""
    from bnlab.values import check_options

    for tables, kind in ((NORM_OPTIONS, "norm"), (INIT_OPTIONS, "init")):
        for name, table in tables.items():
            for key, default in table.items():
                value = 0.5 if default is None else default
                assert check_options(f"{kind} {name!r}", {key: value}, table) == {key: value}
                wrong = 1.5 if isinstance(default, int) and not isinstance(default, bool) \
                    else ("x" if not isinstance(default, str) else 7)
                with pytest.raises(UserError, match=f"option {key} must be"):
                    check_options(f"{kind} {name!r}", {key: wrong}, table)


@pytest.mark.parametrize("flag, value, needle", [
    ("--norm-options", '{"virtual_batch_size": 8.5}', "norm 'ghost' option virtual_batch_size "
                                                      "must be an integer, got 8.5"),
    ("--init-options", '{"gain": "big"}', "init 'xavier' option gain must be a finite number"),
])
def test_option_types_are_one_line_before_a_run_folder_exists(tmp_path, capsys, flag, value,
                                                                needle):
    argv = ["train", "--dataset", "synthetic", "--model", "mlp3x100", "--norm", "ghost",
            "--init", "xavier", "--device", "cpu", "--no-cpu-kernels", flag, value,
            "--out", str(tmp_path / "o")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    assert not list((tmp_path / "o").glob("*/config.json"))


def test_spec_estimate_refuses_nan():
    with pytest.raises(UserError, match="estimate"):
        parse_spec({"name": "t", "grid": {"seed": [0]}, "estimate": {"cpu_minutes": math.nan}})


# -- property-based: any input parses to a valid config, or is one UserError line ----------
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["inf", "nan", "-1", "0", "1e12", "3", "0.5", "true", "bn", "cifar10",
                     "resnet20", "a/b", "..", "imagefolder:", "\x00", "step"]),
    st.datetimes(min_value=datetime.datetime(2000, 1, 1), max_value=datetime.datetime(2030, 1,
                                                                                       1)))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.text(max_size=8) | st.sampled_from(["momentum", "eps", "mode"]), inner,
                    max_size=3)), max_leaves=6)
KEYS = st.sampled_from(list(FIELDS) + [k.replace("_", "-") for k in FIELDS] + ["bogus", ""])
NAMES = {"model": ["mlp3x100", "resnet20", "x/y"], "norm": ["bn", "none", "ghost", "bn_ref"],
         "init": ["kaiming", "xavier", "fixup"], "dataset": ["synthetic", "cifar10", "mnist"]}


def plausible(name: str):
    """Values of the field's own type and near its range (so that many inputs are valid),
    with its edges: 0, 1, negatives, the seed limit, choices and registry names."""
    f = FIELDS[name]
    if f.metadata.get("choices"):
        return st.sampled_from(list(f.metadata["choices"]) + ["other"])
    if name in NAMES:
        return st.sampled_from(NAMES[name])
    if f.default_factory is not dataclasses.MISSING:
        return st.dictionaries(st.sampled_from(["momentum", "eps", "mode", "gain"]),
                               st.floats(0, 1) | st.sampled_from(["fan_out", True]),
                               max_size=2)
    kind = type(f.default)
    if kind is bool:
        return st.booleans() | st.sampled_from(["true", "no", "1"])
    if kind is int:
        return st.integers(-2, 300) | st.sampled_from([SEED_MAX, SEED_MAX + 1, "7"])
    if kind is float:
        return st.floats(-0.5, 1.5) | st.sampled_from([0.0, 1.0, "0.5"])
    return st.text(max_size=6)


FIELD_VALUES = st.sampled_from(list(FIELDS)).flatmap(
    lambda k: st.tuples(st.just(k), plausible(k) | plausible(k) | VALUES))
MAPPINGS = st.lists(FIELD_VALUES | st.tuples(KEYS, VALUES), max_size=6).map(dict)
PROPERTY = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _valid(cfg: RunConfig) -> None:
    assert validate(cfg) is cfg
    for name, f in FIELDS.items():
        v = getattr(cfg, name)
        assert type(v) is type(f.default) if f.default_factory is dataclasses.MISSING \
            else isinstance(v, dict)
        if isinstance(v, float):
            assert math.isfinite(v)
    cfg.run_id()  # an id can always be made (and hashed) for a valid config


def _one_line(e: UserError) -> None:
    assert str(e) and "\n" not in str(e)


@PROPERTY
@given(MAPPINGS)
def test_config_parser_gives_a_valid_config_or_one_user_error(values):
    try:
        cfg = from_mapping(values)
    except UserError as e:
        _one_line(e)
        return
    _valid(cfg)


@PROPERTY
@given(st.lists(st.tuples(KEYS, VALUES.map(str)), max_size=4))
def test_set_assignments_give_valid_values_or_one_user_error(pairs):
    try:
        parse_assignments([f"{k}={v}" for k, v in pairs], "--set")
    except UserError as e:
        _one_line(e)


AXES = st.sampled_from(list(FIELDS)).flatmap(
    lambda k: st.tuples(st.just(k), st.lists(plausible(k), min_size=1, max_size=3)))
GRIDS = st.lists(AXES, min_size=1, max_size=3).map(dict) | st.dictionaries(KEYS, VALUES,
                                                                            max_size=2)
SECTIONS = st.fixed_dictionaries({"grid": GRIDS}, optional={
    "name": st.sampled_from(["t", "my-study", "a b", ""]) | SCALARS,
    "description": SCALARS, "base": MAPPINGS,
    "cases": st.lists(st.fixed_dictionaries({}, optional={
        "where": MAPPINGS, "set": MAPPINGS,
        "grid": st.lists(AXES, max_size=2).map(dict)}), max_size=2) | VALUES,
    "analysis": st.fixed_dictionaries({}, optional={
        "select_best": st.lists(KEYS, max_size=2) | VALUES, "compare": VALUES,
        "baseline": MAPPINGS}) | VALUES,
    "estimate": st.dictionaries(st.sampled_from(["cpu_minutes", "gpu_minutes", "x"]), SCALARS,
                                max_size=2),
    "bogus": VALUES})


@PROPERTY
@given(SECTIONS)
def test_spec_parser_gives_valid_runs_or_one_user_error(data):
    try:
        plan = expand(parse_spec(data))
    except UserError as e:
        _one_line(e)
        return
    assert plan.runs
    for r in plan.runs:
        _valid(r.cfg)
