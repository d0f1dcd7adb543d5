"""Every public API function checks its arguments before any work: a wrong type or value is
one bnlab.UserError line, never a TypeError traceback, and never accepted silently."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import bnlab

# values of every kind a careless caller passes
ANY = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True),
                st.text(max_size=8), st.lists(st.integers(), max_size=3),
                st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                st.builds(object), st.binary(max_size=4))
NOT_A_PATH = ANY.filter(lambda v: not isinstance(v, str) or v == "")
NOT_A_BOOL = ANY.filter(lambda v: not isinstance(v, bool))
NOT_A_COUNT = ANY.filter(lambda v: not (isinstance(v, int) and not isinstance(v, bool)
                                        and v >= 1))
SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
CHEAP = dict(dataset="synthetic", model="mlp3x100", epochs=1, limit_train=16, limit_test=16,
             batch_size=8, device="cpu")


def one_line(call) -> str:
    with pytest.raises(bnlab.UserError) as e:
        call()
    text = str(e.value)
    assert text and "\n" not in text
    return text


# -- the cases, each with the line it gets ---------------------------------------------
def test_the_named_cases_are_one_line_user_errors(tmp_path):
    assert "out must be a path" in one_line(lambda: bnlab.train_run(out=123, **CHEAP))
    assert "nproc must be an integer >= 0, got '2'" in one_line(
        lambda: bnlab.train_run(out=tmp_path, nproc="2", **CHEAP))
    assert "resume must be True or False, got 'yes'" in one_line(
        lambda: bnlab.train_run(out=tmp_path, resume="yes", **CHEAP))
    text = one_line(lambda: bnlab.Study.from_spec({"name": "x", "base": {"lr": object()}}))
    assert "the spec['base']['lr']" in text and "object" in text
    assert "set must be" in one_line(lambda: bnlab.Study.from_spec("quick", set=5))
    assert "out must be a path" in one_line(lambda: bnlab.load_runs(None))
    text = one_line(lambda: bnlab.Study.from_spec("quick", data_map={"cifar10": 5}))
    assert "data_map" in text and "5" in text
    for jobs in (0, "two", True, 1.5):
        text = one_line(lambda j=jobs: bnlab.Study.from_spec("quick").run(jobs=j, out=tmp_path))
        assert "jobs must be an integer >= 1 or 'auto'" in text and repr(jobs) in text
    assert not list(tmp_path.iterdir())  # nothing was trained or written


@SETTINGS
@given(out=NOT_A_PATH)
def test_train_run_out(out):
    one_line(lambda: bnlab.train_run(out=out, **CHEAP))


@SETTINGS
@given(nproc=ANY.filter(lambda v: not (isinstance(v, int) and not isinstance(v, bool)
                                       and v >= 0)))
def test_train_run_nproc(nproc, tmp_path):
    one_line(lambda: bnlab.train_run(out=tmp_path, nproc=nproc, **CHEAP))


@SETTINGS
@given(resume=NOT_A_BOOL)
def test_train_run_resume(resume, tmp_path):
    one_line(lambda: bnlab.train_run(out=tmp_path, resume=resume, **CHEAP))


@SETTINGS
@given(key=st.sampled_from(["lr", "epochs", "norm", "augment", "norm_options", "seed"]),
       value=st.one_of(st.builds(object), st.binary(max_size=3), st.lists(st.builds(object),
                                                                           min_size=1)))
def test_train_run_options_of_no_accepted_type(key, value, tmp_path):
    one_line(lambda: bnlab.train_run(out=tmp_path, **{**CHEAP, key: value}))


@SETTINGS
@given(value=ANY.filter(lambda v: not isinstance(v, str | dict | list | type(None))
                        or (isinstance(v, list) and v)))
def test_study_set_and_only(value):
    one_line(lambda: bnlab.Study.from_spec("quick", set=value))
    one_line(lambda: bnlab.Study.from_spec("quick", only=value))


@SETTINGS
@given(mapping=st.dictionaries(st.sampled_from(["cifar10", "mnist"]),
                               ANY.filter(lambda v: not isinstance(v, str) or v == ""),
                               min_size=1, max_size=2))
def test_study_data_map_values_are_dataset_specs(mapping):
    one_line(lambda: bnlab.Study.from_spec("quick", data_map=mapping))


@SETTINGS
@given(spec=st.recursive(st.builds(object) | st.binary(max_size=2),
                         lambda inner: st.lists(inner, min_size=1, max_size=2)
                         | st.dictionaries(st.just("base"), inner, min_size=1)))
def test_study_spec_dict_holds_toml_values_only(spec):
    one_line(lambda: bnlab.Study.from_spec({"name": "x", "grid": {"lr": spec}}))


@SETTINGS
@given(flag=NOT_A_BOOL)
def test_study_flags(flag):
    one_line(lambda: bnlab.Study.from_spec("quick", tensorboard=flag))


@SETTINGS
@given(out=NOT_A_PATH)
def test_folders_of_results(out):
    for fn in (bnlab.load_runs, bnlab.load_metrics, bnlab.load_probes, bnlab.write_report,
               bnlab.run_rows, bnlab.rebuild_index, bnlab.study_status):
        one_line(lambda fn=fn: fn(out))


@SETTINGS
@given(sizes=ANY.filter(lambda v: not (isinstance(v, list) and v and all(
    isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in v))),
       count=ANY.filter(lambda v: not (isinstance(v, int) and not isinstance(v, bool)
                                       and v >= 0)))
def test_diagnose_arguments(sizes, count, tmp_path):
    one_line(lambda: bnlab.diagnose(tmp_path, batch_sizes=sizes))
    one_line(lambda: bnlab.diagnose(tmp_path, precise_batches=count))
    one_line(lambda: bnlab.diagnose(tmp_path, max_images=count))


@SETTINGS
@given(model=ANY, repeats=NOT_A_COUNT)
def test_fold_and_compare_arguments(model, repeats, tmp_path):
    one_line(lambda: bnlab.fold(tmp_path, repeats=repeats))
    if not isinstance(model, str) or not model:
        one_line(lambda: bnlab.fold(model))
    one_line(lambda: bnlab.compare([tmp_path], device=model if model != "cpu" else 1))


@SETTINGS
@given(definition=ANY.filter(lambda v: v not in ("pooled", "fvcore")),
       loader=st.one_of(st.none(), st.integers(), st.builds(object), st.text(max_size=3)))
def test_recalibrate_arguments(definition, loader):
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    batches = [torch.randn(5, 3)]
    one_line(lambda: bnlab.recalibrate(net, batches, definition=definition))
    one_line(lambda: bnlab.recalibrate(net, loader))
    one_line(lambda: bnlab.recalibrate(loader, batches))


@SETTINGS
@given(value=ANY.filter(lambda v: not isinstance(v, bool)))
def test_bench_speed_options(value):
    one_line(lambda: bnlab.bench_speed(variants=["eager"], cuda_graph=value))
    if not (isinstance(value, int) and not isinstance(value, bool)):
        one_line(lambda: bnlab.bench_speed(variants=["eager"], steps=value))


def test_a_valid_path_object_is_accepted_where_a_string_is(tmp_path):
    """pathlib.Path and str name the same folder: the same answer for both."""
    a = one_line(lambda: bnlab.load_runs(str(tmp_path / "none")))
    b = one_line(lambda: bnlab.load_runs(Path(tmp_path / "none")))
    assert a == b
