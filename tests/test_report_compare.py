"""The report's prediction comparison over seeds: the between-arm rows beside the within-arm
(seed-to-seed) rows, AdaBN beside the training statistics, and findings that say n = 1."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from bnlab import cli
from bnlab.infer.compare import compare_runs
from bnlab.report import write_report
from bnlab.report.compare_findings import compare_sentences
from bnlab.report.compare_tables import BETWEEN, WITHIN, compare_tables
from bnlab.report.compose import compose
from bnlab.report.fmt import mean_std as ms
from bnlab.report.load import load_study

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = """
name = "tiny-compare"
[base]
dataset = "synthetic"
model = "mlp3x100"
limit_train = 128
limit_test = 128
batch_size = 32
epochs = 2
lr = 0.05
device = "cpu"
[grid]
norm = ["bn", "none"]
seed = [0, 1]
[analysis]
compare = true
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    spec = root / "spec.toml"
    spec.write_text(textwrap.dedent(SPEC))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; a second thread only waits on a busy CPU
    try:
        assert cli.main(["study", "run", str(spec), "--out", str(root / "out")]) == 0
    finally:
        torch.set_num_threads(threads)
    return root / "out"


def _tables(doc):
    return {t.anchor: t for t in doc.tables if t.anchor.startswith("compare")}


def _findings(doc) -> list[str]:
    return next(x for x in doc.blocks if type(x).__name__ == "Bullets").items


def test_agreement_table_sets_between_against_within(study):
    data = json.loads((study / "analysis" / "compare.json").read_text())
    loaded = load_study(study)
    assert [(c.folder, c.dataset) for c in loaded.comparisons] == [("analysis", "synthetic")]
    doc = compose(loaded).document
    t = _tables(doc)["compare-pairs"]
    assert [r[0] for r in t.rows] == [BETWEEN, WITHIN, WITHIN]
    assert [r[1:4] for r in t.rows] == [["norm=bn", "norm=none", "4 (2 × 2)"],
                                        ["norm=bn", "norm=bn", "1"],
                                        ["norm=none", "norm=none", "1"]]
    for row, stored in zip(t.rows, data["agreement"]):
        assert row[4] == ms(stored["agreement"]) and row[8] == ms(stored["kl_ab"], 1.0, 4)
    between = next(s for s in _findings(doc) if "predict the same class" in s)
    assert between.startswith("norm=bn and norm=none predict the same class on "
                              f"{ms(data['agreement'][0]['agreement'])}% of the test images "
                              "(mean ± sd over 4 pairs of runs)")
    assert f"two runs of norm=bn agree on {ms(data['agreement'][1]['agreement'])}%" in between
    assert between.endswith(f"({t.label}, rows 1, 2 and 3).")


def test_arms_and_corruptions_are_over_seeds_with_adabn(study):
    data = json.loads((study / "analysis" / "compare.json").read_text())
    doc = compose(load_study(study)).document
    tables = _tables(doc)
    arms = tables["compare-models"]
    assert [r[:3] for r in arms.rows] == [["norm=bn", "2", ms(data["arms"][0]["test_acc"])],
                                          ["norm=none", "2", ms(data["arms"][1]["test_acc"])]]
    assert " ± " in arms.rows[0][2]
    corr = tables["compare-corruptions"]
    assert [r[:2] for r in corr.rows] == [["norm=bn", "training"], ["norm=bn", "AdaBN"],
                                          ["norm=none", "training"],
                                          ["norm=none", "AdaBN: nothing to adapt"]]
    bn = data["arms"][0]
    assert corr.rows[1][-1] == ms(bn["adabn_acc"]["mean"])
    assert corr.rows[0][-1] == ms(bn["corruption_acc"]["mean"])
    items = _findings(doc)
    adabn = next(s for s in items if "(AdaBN)" in s)
    assert adabn.startswith("Re-estimating the norm statistics of norm=bn on the corrupted test "
                            "images (AdaBN)")
    assert f"({corr.label}, rows 1 and 2)" in adabn
    assert any(s.startswith("norm=none has no batch statistics, so there is nothing for AdaBN")
               for s in items)
    files = write_report(study)
    md = files["report.md"].read_text()
    assert "Agreement between arms against the agreement between seeds of one arm" in md
    assert "AdaBN: nothing to adapt" in md


def test_one_run_per_arm_says_n_is_1(study, tmp_path):
    doc_json = json.loads((study / "study.json").read_text())
    seed0 = [r["run_id"] for r in doc_json["runs"] if r["values"]["seed"] == 0]
    out = tmp_path / "analysis"
    compare_runs([study / rid for rid in seed0], out, corruptions=False, log=lambda m: None)
    compare = json.loads((out / "compare.json").read_text())
    # the bn arm could adapt, but without the corruption sweep nothing was measured
    assert [(a["adapts"], a["adabn_acc"]) for a in compare["arms"]] == [(True, None),
                                                                        (False, None)]
    tables = compare_tables(compare, 1)
    assert [t.anchor for t in tables] == ["compare-models", "compare-pairs"]
    assert [r[3] for r in tables[1].rows] == ["1 (1 × 1)", "0", "0"]
    assert tables[1].rows[1][4] == "–"  # no seed-to-seed baseline with one run
    sentences = compare_sentences(compare, tables)
    assert "one run, n = 1: no spread over seeds" in sentences[0]
    assert "Each arm has one run (n = 1), so there is no seed-to-seed agreement" in sentences[1]


def _agreement_sentence(between, within_a, within_b):
    """The finding of a hand-made comparison of arms A and B: between-arm agreement `between`,
    within-arm (mean, sd, pairs) of each arm."""
    from bnlab.report.document import Table

    def spread(mean, sd, n):
        return {"mean": mean, "sd": sd, "n": n}

    rows = [{"kind": "between", "arm_a": "A", "arm_b": "B", "runs_a": 3, "runs_b": 3,
             "pairs": 9, "agreement": spread(between, 0.01, 9)}]
    for label, (mean, sd, k) in (("A", within_a), ("B", within_b)):
        rows.append({"kind": "within", "arm_a": label, "arm_b": label, "runs_a": 3,
                     "runs_b": 3, "pairs": k, "agreement": spread(mean, sd, k)})
    compare = {"format": 2, "runs": [{}], "pairs": [{}], "arms": [], "agreement": rows}
    tables = [Table(1, "arms", [], [], anchor="compare-models"),
              Table(2, "pairs", [], [], anchor="compare-pairs")]
    (sentence,) = compare_sentences(compare, tables)
    return sentence


def test_arms_agree_less_than_seeds_only_when_the_gap_exceeds_the_seed_sd():
    firm = _agreement_sentence(0.80, (0.85, 0.02, 3), (0.86, 0.03, 3))
    assert ("the mean agreement between the arms is 5.00 points below the mean within A (sd "
            "over its pairs 2.00), and 6.00 points below the mean within B (sd over its pairs "
            "3.00): the arms agree less than seeds of either arm do") in firm
    # lower means, but by less than each arm's seed-to-seed sd: no firm verdict
    loose = _agreement_sentence(0.80, (0.81, 0.02, 3), (0.815, 0.03, 3))
    assert "1.00 points below the mean within A (sd over its pairs 2.00)" in loose
    assert "the arms agree less than seeds of" not in loose
    assert "no gap exceeds the seed-to-seed sd" in loose
    # one arm clearly, the other within its variation
    mixed = _agreement_sentence(0.80, (0.85, 0.02, 3), (0.81, 0.03, 3))
    assert ("the arms agree less than seeds of A do; below B the gap is within its "
            "seed-to-seed variation") in mixed
    # a single within-arm pair has no sd to judge a gap by
    single = _agreement_sentence(0.80, (0.90, None, 1), (0.90, None, 1))
    assert "(one pair: no sd)" in single and "arms agree less than seeds of" not in single
    # ... and is not said to lie within a seed-to-seed sd that was never measured
    assert "no gap exceeds the seed-to-seed sd" not in single
    assert ("A and B have one pair of seeds (no seed-to-seed sd to read the gap against), "
            "so this does not show that the arms agree less than seeds do") in single
    one_firm = _agreement_sentence(0.80, (0.85, 0.02, 3), (0.90, None, 1))
    assert ("the arms agree less than seeds of A do; B has one pair of seeds (no "
            "seed-to-seed sd to read the gap against)") in one_firm
    higher = _agreement_sentence(0.80, (0.78, 0.01, 3), (0.80, 0.01, 3))
    assert ("2.00 points above the mean within A (sd over its pairs 1.00), and equal to the "
            "mean within B") in higher
    assert higher.endswith("the arms agree no less than seeds of one arm do (Table 2, rows 1, "
                           "2 and 3).")


def test_a_diverged_arms_huge_nll_is_written_with_an_exponent():
    arm = {"label": "norm=none", "n": 2, "test_acc": {"mean": 0.1, "sd": 0.0},
           "nll": {"mean": 7.924745e36, "sd": 1.120728e37}, "brier": {"mean": 1.9, "sd": 0.0},
           "ece": {"mean": 0.95, "sd": 0.0}}
    compare = {"format": 2, "runs": [{}], "pairs": [], "arms": [arm], "agreement": []}
    (models, *_) = compare_tables(compare, 1)
    assert models.rows[0][3] == "7.92e+36 ± 1.12e+37"
    assert models.rows[0][4] == "1.9000 ± 0.0000"  # ordinary numbers keep their decimals


def test_bf16_runs_say_their_comparison_is_recomputed_in_fp32(study):
    """The comparison's predictions are computed in fp32 from the checkpoints; runs that
    trained and were tested in bf16 get a sentence saying why its accuracies can differ."""
    from bnlab.report.compose import PRECISION_NOTE

    def paragraphs(loaded):
        return [b.text for b in compose(loaded).document.blocks
                if type(b).__name__ == "Paragraph"]

    loaded = load_study(study)
    assert PRECISION_NOTE not in paragraphs(loaded)  # these runs trained in fp32
    for run in loaded.runs:
        run.config["precision"] = "bf16"
    assert PRECISION_NOTE in paragraphs(loaded)
