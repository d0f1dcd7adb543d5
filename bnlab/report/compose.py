"""Put a study's report together: tables, then findings from them, figures, the appendix.

Table and figure numbers follow their order in the document; findings are generated after all
tables exist so every sentence can cite a row.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from bnlab.numbers import fmt_value
from bnlab.report import figures as F
from bnlab.report import probe_figures as P
from bnlab.report import tables as T
from bnlab.report.arms import build_arms, compare_picks, compare_skip
from bnlab.report.compare_tables import compare_tables
from bnlab.report.document import Bullets, Document, Figure, Heading, Paragraph
from bnlab.report.findings import findings
from bnlab.report.gradratio import grad_ratio_table
from bnlab.report.load import Study
from bnlab.report.provenance import provenance
from bnlab.report.references import Reference
from bnlab.report.stats import ALPHA
from bnlab.report.tuning import tuning_table
from bnlab.store import FINISHED

COMPARE_CAPTIONS = {
    "reliability.png": "Reliability diagram of each compared arm, the predictions of all its "
                       "runs pooled: accuracy against confidence per bin; the diagonal is "
                       "perfect calibration.",
    "confidence.png": "Distribution of the confidence (maximum softmax probability) of each "
                      "compared arm on the test set, all its runs pooled.",
    "corruptions.png": "Test accuracy of the compared arms under corruptions, by severity, mean "
                       "± sd over runs; dashed: after AdaBN (statistics re-estimated on the "
                       "corrupted images).",
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg")


@dataclass
class Composed:
    document: Document
    images: dict[str, bytes] = field(default_factory=dict)  # file name -> bytes


class _Numbers:
    def __init__(self):
        self.table = 0
        self.figure = 0

    def next_table(self) -> int:
        self.table += 1
        return self.table

    def next_figure(self) -> int:
        self.figure += 1
        return self.figure


def compose(study: Study, references: list[Reference] = ()) -> Composed:
    arms = build_arms(study)
    num = _Numbers()
    summary = T.summary_table(study, arms, num.next_table(), list(references))
    selection = T.selection_table(study, arms, num.table + 1)
    if selection:
        num.next_table()
    tuned = tuning_table(study, num.table + 1)
    if tuned:
        num.next_table()
    gap, gap_rows = T.gap_table(study, arms, num.table + 1)
    if gap:
        num.next_table()
    probe_rows = T.probe_rows(arms)
    probe = T.probe_table(probe_rows, num.table + 1)
    if probe:
        num.next_table()
    ratio = grad_ratio_table(arms, num.table + 1)
    if ratio:
        num.next_table()
    compared = []  # (comparison, its tables): analysis/ first, then analysis/<dataset>/
    for i, c in enumerate(study.comparisons):
        tables = compare_tables(c.data, num.table + 1, c.folder,
                                  c.dataset if len(study.comparisons) > 1 else None,
                                  "compare" if i == 0 else f"compare{i + 1}")
        num.table += len(tables)
        compared.append((c, tables))
    runs = T.runs_table(study, arms, num.next_table())

    n_runs = len(study.runs)
    subtitle = (study.description + " — " if study.description else "") + \
        f"{n_runs} runs; report generated {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC"
    doc = Document(f"Study report: {study.name}", subtitle)
    images: dict[str, bytes] = {}

    def add_figures(figs: list[F.FigureData]) -> None:
        for f in figs:
            images[f.file] = f.png
            doc.add(Figure(num.next_figure(), f.file, f.caption, f.alt))

    doc.add(Heading(2, "Results", "results"), Paragraph(_intro(study)), summary)
    if selection:
        doc.add(selection)
    if tuned:
        doc.add(tuned)
    doc.add(Heading(2, "Findings", "findings"),
            Paragraph("Generated from the numbers in the tables of this report; each sentence "
                      f"cites the row it comes from. Significance: two-sided Welch's t-test at "
                      f"α = {ALPHA:g}, without correction for multiple comparisons.",
                      small=True),
            Bullets(findings(arms, summary, selection, gap, gap_rows, probe, probe_rows,
                             [(c.data, tables, c.dataset if len(compared) > 1 else None)
                              for c, tables in compared], runs,
                             on_val=study.select_on == "val",
                             waiting=_waiting(study))
                    or ["No run has finished yet, so there is nothing to report."]))
    doc.add(Heading(2, "Training curves", "curves"))
    for ds in study.datasets:
        add_figures(F.curves(ds, [a for a in arms if a.dataset == ds]))
    if gap:
        doc.add(Heading(2, "Overfitting: train–test gap", "gap"), gap)
        for ds in study.datasets:
            add_figures(F.gap_curves(ds, [a for a in arms if a.dataset == ds]))
    if probe or any(r.probes for r in study.runs):
        doc.add(Heading(2, "Probes during training", "probes"))
        if probe:
            doc.add(probe)
        if ratio:
            doc.add(ratio)
        for ds in study.datasets:
            here = [a for a in arms if a.dataset == ds]
            add_figures(P.unit_percentiles(ds, probe_rows))
            add_figures(P.percentiles(ds, probe_rows))
            add_figures(P.grad_norms(ds, here))
            add_figures(P.ics(ds, here))
            add_figures(P.model_probe_metrics(ds, here))
    shown = [(c, tables) for c, tables in compared if tables or c.data.get("figures")]
    skipped = _compare_skipped(study, arms)
    if shown or skipped:
        doc.add(Heading(2, "Prediction comparison", "compare"))
    if shown and any(r.value("precision") == "bf16" for r in study.runs):
        doc.add(Paragraph(PRECISION_NOTE))
    for why in skipped:
        doc.add(Paragraph(why[0].upper() + why[1:] + "."))
    for i, (c, tables) in enumerate(shown):
        if len(shown) > 1:
            doc.add(Heading(3, f"On {c.dataset or c.folder}", f"compare-{i + 1}"))
        doc.add(*tables)
        for name, data in _compare_images(study.root / c.folder, c.data):
            key = f"compare-{name}" if c.folder == "analysis" else \
                f"compare-{c.folder.split('/', 1)[1]}-{name}"
            images[key] = data
            caption = COMPARE_CAPTIONS.get(name, f"Prediction comparison: {name}.")
            on = f" ({c.dataset})" if len(shown) > 1 and c.dataset else ""
            doc.add(Figure(num.next_figure(), key,
                           caption[:-1] + on + f". From {c.folder}/{name}.",
                           f"Comparison: {name}{on}"))
    doc.add(Heading(2, "All runs", "runs"), runs)
    doc.add(*provenance(study, arms))
    return Composed(doc, images)


PRECISION_NOTE = ("The predictions compared here are computed again from each run's final "
                  "checkpoint in fp32; the runs trained and were tested in bf16 autocast (the "
                  "accuracies of the tables above), so an accuracy here can differ from its "
                  "run's test accuracy above by a few tenths of a point.")


def _compare_skipped(study: Study, arms) -> list[str]:
    """Why analysis.compare, asked for by the spec, compared nothing on a dataset (once every
    run has ended; until then the comparison has not been tried)."""
    if not study.analysis.get("compare") or not study.runs or \
            any(r.status not in (*FINISHED, "failed") for r in study.runs):
        return []
    out = []
    for ds in study.datasets:
        why = compare_skip(arms, ds, [label for _, label in compare_picks(arms, ds)])
        if why:
            out.append(why)
    return out


def _intro(study: Study) -> str:
    # the axes that make arms, then the seed; the dataset is named on its own, and options that
    # leave a run's result unchanged (probe_every, ...) are said apart: they make no arm
    arm_axes = study.arm_axes + (["seed"] if "seed" in study.axes else [])
    axes = ", ".join(arm_axes) or "none"
    quiet = [a for a in study.axes if a not in arm_axes and a != "dataset"]
    if quiet:
        one = len(quiet) == 1
        axes += (f" ({', '.join(quiet)} also differ{'s' if one else ''} between runs but "
                 f"leave{'s' if one else ''} results unchanged and make{'s' if one else ''} "
                 "no arm)")
    base = ", ".join(f"{k}={fmt_value(v)}" for k, v in study.baseline.items())
    datasets = ", ".join(study.datasets) or "none"
    text = (f"Study “{study.name}”: {len(study.runs)} runs on {datasets}; axes varied: {axes}. "
            f"Each arm is one combination of the varied values except the seed; the baseline "
            f"arm is {base}.")
    if study.select_best:
        split = ("validation accuracy (images held out from the training set)"
                 if study.select_on == "val" else "test accuracy")
        text += (f" Within each arm, {', '.join(study.select_best)} was chosen from several "
                 f"values by mean final {split}.")
    if study.tuning.get("protocol"):
        text += (f" One arm's {study.tuning.get('protocol')} (the tuning table), then every "
                 "seed trained at the chosen value.")
    return text


def _compare_images(folder: Path, compare: dict) -> list[tuple[str, bytes]]:
    """The figure files a compare.json lists that exist in its folder (plain names only)."""
    out = []
    for name in compare.get("figures") or []:
        name = str(name)
        if PurePosixPath(name).name != name or not name.lower().endswith(IMAGE_SUFFIXES):
            continue
        path = folder / name
        if path.is_file():
            out.append((name, path.read_bytes()))
    return out


def _waiting(study) -> tuple[int, str]:
    """(runs of study.json's tuning that wait for their value, the tuned axis): in no arm yet."""
    n = study.tuning.get("waiting")
    ok = isinstance(n, int) and not isinstance(n, bool) and n > 0
    return (n if ok else 0), str(study.tuning.get("axis") or "")
