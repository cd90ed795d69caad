"""`bench report`: tables, formats, figures and the CLI.

Two stores (tests/report_store.py): the records of a tiny real `bench run` (every format and figure,
the numbers against the record files, flags, protocol labels), and a hand-built one with known numbers
for what a tiny run cannot have (CIFAR cells with the paper's values, cross-dataset and ALF tables,
comparisons); plus hand-made folders of failed and blocked jobs.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench.record import wilson_interval
from bench.store import Store
from report_store import (FAILED_KEY, N, SANITY, UNREADABLE_KEY, build_store, evaluate_records, run_tiny_grid,
                          write_eval, write_failed_job)

T_975_DF2 = 4.302653
T_975_DF1 = 12.706205
PAPER_NUMBERS = Path(__file__).resolve().parents[2] / "bench" / "report" / "paper_numbers.json"


@pytest.fixture(scope="module")
def store_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report") / "results"
    build_store(root)
    return root


@pytest.fixture(scope="module")
def results(store_root):
    from bench.report import load_results

    return load_results(store_root)


@pytest.fixture(scope="module")
def tables(results):
    from bench.report.tables import build_tables

    return {t.id: t for t in build_tables(results)}


def entry(table, method: str, finetuner: str | None, group_label: str, metric: str):
    for row in table.rows:
        if row.method == method and row.finetuner == finetuner:
            for g, entries in zip(table.groups, row.entries):
                if g.full_label == group_label:
                    return entries[g.metrics.index(metric)]
    raise KeyError((method, finetuner, group_label, metric))


def md_cells(md: str, *labels: str) -> list[str]:
    """The cells of the Markdown table row that starts with these row labels."""
    line = next(l for l in md.splitlines() if l.startswith("| " + " | ".join(labels) + " |"))
    return [c.strip() for c in line.strip("|").split("|")]


def csv_row(rows: list[dict], **match) -> dict:
    return next(r for r in rows if all(r[k] == v for k, v in match.items()))


def paper_value(method: str, finetuner: str, source: str, target: str, metric: str) -> float | None:
    """The published value, read from paper_numbers.json here (not through bench.report.paper)."""
    for table in json.loads(PAPER_NUMBERS.read_text())["tables"].values():
        for row in table["rows"]:
            if (row["method"], row["finetuner"], row["source"], row["target"]) == (method, finetuner, source, target):
                if metric in row:
                    return row[metric]
    return None


# ---------------------------------------------------------------- the published numbers


def test_paper_numbers_match_methods_section_7():
    from bench.report import paper

    tables = paper.numbers()["tables"]
    assert [len(tables[t]["rows"]) for t in ("table1", "table2", "table3")] == [20, 16, 8]
    assert paper.published("advcl", "slf", "cifar10", "cifar10") == {"aa": 42.57, "ra": 50.45, "sa": 80.85}
    assert paper.published("apdpe", "slf", "cifar100", "cifar100") == {"aa": 4.17, "ra": 6.23, "sa": 47.91}
    assert paper.published("acl", "aff", "cifar100", "cifar100", "sa") == 56.61
    assert paper.published("supervised_at", "aff", "cifar10", "stl10") == {"aa": 33.10, "ra": 36.70, "sa": 62.78}
    assert paper.published("acl", "slf", "cifar100", "stl10") == {"aa": 21.75, "ra": 26.32, "sa": 45.91}
    assert paper.published("advcl", "alf", "cifar10", "cifar10") == {"ra": 52.01, "sa": 79.39}
    assert paper.published("rocl", "alf", "cifar10", "cifar10", "aa") is None
    assert paper.published("simclr", "slf", "cifar10", "cifar10") is None
    # Table 3's SLF column repeats Table 1
    t1 = {(r["method"], r["finetuner"], r["source"]): r for r in tables["table1"]["rows"]}
    for r in tables["table3"]["rows"]:
        if r["finetuner"] == "slf":
            assert (r["ra"], r["sa"]) == (t1[(r["method"], "slf", "cifar10")]["ra"], t1[(r["method"], "slf", "cifar10")]["sa"])


# ---------------------------------------------------------------- the table model


def test_table1_numbers_are_the_records(tables):
    t1 = tables["table1"]
    assert [g.label for g in t1.groups] == ["CIFAR-10", "synthetic"]
    # three seeds: mean, std over seeds, Student-t interval; the paper beside it
    sa = entry(t1, "advcl", "slf", "CIFAR-10", "sa")
    assert sa.value == pytest.approx(81.0) and sa.agg.std == pytest.approx(0.01)
    assert sa.ours_text() == "81.00 ± 1.00"
    assert sa.agg.seeds == [0, 1, 2] and sa.agg.n == [N, N, N]
    lo, hi = sa.agg.ci95
    half = T_975_DF2 * 0.01 / math.sqrt(3)
    assert (lo, hi) == (pytest.approx(0.81 - half, abs=1e-6), pytest.approx(0.81 + half, abs=1e-6))
    assert sa.agg.pooled_ci95 == pytest.approx(wilson_interval(2430, 3000))
    assert sa.ref == paper_value("advcl", "slf", "cifar10", "cifar10", "sa") == 80.85
    assert sa.diff == pytest.approx(0.15)
    ra = entry(t1, "advcl", "slf", "CIFAR-10", "ra")
    aa = entry(t1, "advcl", "slf", "CIFAR-10", "aa")
    assert (ra.value, ra.agg.std, ra.ref, ra.diff) == (pytest.approx(50.5), pytest.approx(0.005), 50.45,
                                                      pytest.approx(0.05))
    assert (aa.value, aa.ref, aa.diff) == (pytest.approx(42.5), 42.57, pytest.approx(-0.07))
    # one seed: no spread over seeds; the cell shows the value, its 95% Wilson interval is in the hover
    acl = entry(t1, "acl", "slf", "CIFAR-10", "sa")
    wl, wh = wilson_interval(780, N)
    assert acl.value == pytest.approx(78.0) and acl.agg.std is None
    assert acl.ours_text() == "78.00" and "95% CI [75.33, 80.46] (Wilson)" in acl.hover("ACL / SLF / CIFAR-10")
    assert acl.agg.ci95 == pytest.approx((wl, wh))
    assert acl.ref == paper_value("acl", "slf", "cifar10", "cifar10", "sa") == 77.88
    assert acl.diff == pytest.approx(0.12)
    # no paper value for a dataset the paper does not have
    assert entry(t1, "simclr", "slf", "synthetic", "sa").ref is None
    assert entry(t1, "simclr", "slf", "synthetic", "aa").agg is None


def test_rows_columns_missing_and_flags(tables):
    t1 = tables["table1"]
    rows = [(r.method, r.finetuner) for r in t1.rows]
    # paper order: finetuner blocks SLF, AFF, ALF; methods Supervised, AP-DPE, RoCL, ACL, AdvCL, then others
    assert rows == [("rocl", "slf"), ("acl", "slf"), ("advcl", "slf"), ("simclr", "slf"), ("acl", "aff"),
                    ("advcl", "aff"), ("supervised_at", "alf")]
    # a cell that does not exist is a dash; the failed job is a dash with its state and a footnote
    assert entry(t1, "advcl", "aff", "synthetic", "sa").agg is None
    failed = entry(t1, "acl", "aff", "CIFAR-10", "ra")
    assert failed.agg is None and failed.status == "failed" and failed.note is not None
    assert failed.ref == paper_value("acl", "aff", "cifar10", "cifar10", "ra") == 52.82  # the paper's value stays
    note = next(f for f in t1.footnotes if f.number == failed.note)
    assert FAILED_KEY in note.text and "ran out of memory" in note.text
    # flags: selection on test = †, sanity warning = ‡ (the test-selection warning itself is not ‡)
    assert entry(t1, "advcl", "aff", "CIFAR-10", "sa").marks == "†"
    assert entry(t1, "rocl", "slf", "CIFAR-10", "ra").marks == "‡"
    assert entry(t1, "advcl", "slf", "CIFAR-10", "ra").marks == ""
    assert ("‡", "RoCL / SLF / CIFAR-10", SANITY) in t1.flagged
    assert any(m == "†" and label == "AdvCL / AFF / CIFAR-10" for m, label, _ in t1.flagged)
    # footnote of a three-seed cell: seeds, n, the intervals
    n3 = entry(t1, "advcl", "slf", "CIFAR-10", "sa").note
    text = next(f.text for f in t1.footnotes if f.number == n3)
    assert "seeds 0, 1, 2" in text and f"SA n = {N}" in text and "95% CI [78.52, 83.48]" in text


def test_table2_and_table3(tables):
    t2 = tables["table2"]
    assert [g.label for g in t2.groups] == ["CIFAR-10 → STL-10"]
    e = entry(t2, "advcl", "slf", "CIFAR-10 → STL-10", "ra")
    assert e.value == pytest.approx(36.0) and e.ref == 35.80 and e.diff == pytest.approx(0.2)
    t3 = tables["table3"]
    assert [g.full_label for g in t3.groups] == ["CIFAR-10 SLF", "CIFAR-10 ALF"]
    assert [r.method for r in t3.rows] == ["supervised_at", "rocl", "acl", "advcl"]
    alf = entry(t3, "supervised_at", None, "CIFAR-10 ALF", "ra")
    assert alf.value == pytest.approx(47.0) and alf.ref == 46.75 and alf.diff == pytest.approx(0.25)
    assert entry(t3, "supervised_at", None, "CIFAR-10 SLF", "ra").agg is None
    assert entry(t3, "advcl", None, "CIFAR-10 SLF", "sa").ref == 80.85


def test_missing_jobs_are_listed(results):
    states = {m.key: m.state for m in results.missing}
    assert states == {FAILED_KEY: "failed", UNREADABLE_KEY: "damaged"}
    assert results.evaluate_records == 10 and len(results.cells) == 8


def test_sweeps_aggregate_over_seeds(results):
    cell = results.get("advcl", "slf", "cifar10", "cifar10")
    eps = dict(cell.sweeps["eps"])
    steps = dict(cell.sweeps["steps"])
    assert sorted(eps) == [2, 4, 8, 16] and sorted(steps) == [1, 10, 20, 100]
    # base RA counts out of 200: 100, 101, 102 -> at eps 8 the mean is 50.5%
    assert eps[8].mean == pytest.approx(statistics.fmean([100 / 200, 101 / 200, 102 / 200]))
    assert eps[2].k == 3 and steps[100].mean < steps[1].mean


# ---------------------------------------------------------------- formats


def test_markdown(results):
    from bench.report import render

    md = render("md", results)
    assert "| Pretraining | Finetuning | CIFAR-10 AA | CIFAR-10 RA | CIFAR-10 SA |" in md
    line = next(l for l in md.splitlines() if l.startswith("| AdvCL | SLF |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2].startswith("42.50 ± 0.50") and cells[2].endswith("(42.57; −0.07)")
    assert cells[3].startswith("50.50 ± 0.50") and cells[3].endswith("(50.45; +0.05)")
    assert cells[4].startswith("81.00 ± 1.00") and cells[4].endswith("(80.85; +0.15)")
    acl = md_cells(md, "ACL", "SLF")
    assert acl[4] == "78.00 (77.88; +0.12)"  # one seed, like most cells: no note of its own
    failed = md_cells(md, "ACL", "AFF")
    assert failed[3].startswith("— failed") and failed[3].endswith("(52.82)")
    assert "± their standard deviation when there are several" in md
    # what most cells share, once: seed 0, n = N; the three-seed cell and the n = 200 cells have notes
    assert f"cells (the others: footnotes): seed 0; SA, RA and AA on n = {N} test images" in md
    assert "† = model selected on the test set" in md and "‡ = sanity warnings" in md
    assert "95% CI [78.52, 83.48]" in md
    assert "### Missing: 2 job(s)" in md and f"`{FAILED_KEY}`" in md and "**damaged**" in md
    assert "Table 2" in md and "Table 3" in md
    assert "official code" in md and "[`docs/fidelity.md`](docs/fidelity.md)" in md  # the header links the table


def test_latex_is_booktabs_and_ascii(results, tmp_path):
    from bench.report import render

    tex = render("tex", results)
    tex.encode("ascii")  # no unicode left: compiles with plain pdflatex
    for word in (r"\toprule", r"\midrule", r"\bottomrule", r"\cmidrule(lr){3-5}", r"\usepackage{booktabs}"):
        assert word in tex
    assert r"81.00 $\pm$ 1.00$^{" in tex and "(80.85; +0.15)" in tex and r"\dag" in tex and r"\ddag" in tex
    assert r"78.00 {\scriptsize(77.88; +0.12)}" in tex and "cells (the others: footnotes): seed 0" in tex
    assert r"CIFAR-10 $\rightarrow$ STL-10" in tex
    depth = 0
    for ch in tex.replace(r"\{", "").replace(r"\}", ""):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    assert depth == 0 and tex.count(r"\begin{table}") == tex.count(r"\end{table}") == 3
    pdflatex = shutil.which("pdflatex")
    if pdflatex:  # where TeX is installed (texlive-latex-recommended), the document must compile
        (tmp_path / "report.tex").write_text(tex)
        run = subprocess.run([pdflatex, "-interaction=nonstopmode", "-halt-on-error", "report.tex"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stdout[-3000:]
        assert (tmp_path / "report.pdf").stat().st_size > 10000


def test_csv_is_tidy_with_all_fields(results):
    from bench.report import render

    rows = list(csv.DictReader(io.StringIO(render("csv", results))))

    def row(method, ft, source, target, metric, axis="", x=""):
        return next(r for r in rows if (r["method"], r["finetuner"], r["source"], r["target"], r["metric"],
                                        r["axis"], r["x"]) == (method, ft, source, target, metric, axis, x))

    sa = row("advcl", "slf", "cifar10", "cifar10", "sa")
    assert float(sa["value_pct"]) == pytest.approx(81.0) and float(sa["std_pct"]) == pytest.approx(1.0)
    assert sa["seeds"] == "0;1;2" and sa["values_pct"] == "80.0000;81.0000;82.0000"
    assert int(sa["n"]) == N and int(sa["n_total"]) == 3 * N and int(sa["correct_total"]) == 2430
    assert float(sa["ci95_low_pct"]) == pytest.approx(78.5159, abs=1e-3)
    assert float(sa["paper_pct"]) == 80.85 and float(sa["diff_paper_pct"]) == pytest.approx(0.15)
    assert json.loads(sa["protocol"])["n"] == N
    flagged = row("advcl", "aff", "cifar10", "cifar10", "ra")
    assert flagged["selection_on_test"] == "True" and flagged["marks"] == "†"
    assert "selection=test" in flagged["flags"]
    point = row("acl", "slf", "cifar10", "cifar10", "ra", "eps", "16")
    assert float(point["value_pct"]) == pytest.approx(100 * (86 - 60) / 200)
    assert {r["status"] for r in rows} == {"ok", "failed", "damaged"}
    assert len({r["method"] for r in rows if r["status"] == "ok"}) == 5


# ---------------------------------------------------------------- figures and the CLI


def _nontrivial_png(path: Path) -> None:
    import numpy as np
    from PIL import Image

    assert path.stat().st_size > 5000, path
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300 and pixels.std() > 10, path


def test_cli_figures_per_dataset_pair_and_missing_encoders(store_root, tmp_path):
    from bench.cli import main

    out = tmp_path / "report"
    res = CliRunner().invoke(main, ["report", "--results", str(store_root), "--out", str(out), "--tsne-n", "60",
                                    "--format", "md"])
    assert res.exit_code == 0, res.output
    figures = out / "figures"
    pngs = sorted(p.name for p in figures.glob("*.png"))
    # Figure 1 under AutoAttack where AA was run (not on the synthetic cells here)
    assert pngs == sorted(["fig1_sa_vs_ra_cifar10_cifar10.png", "fig1_sa_vs_ra_cifar10_stl10.png",
                           "fig1_sa_vs_ra_synthetic_synthetic.png", "fig1_sa_vs_aa_cifar10_cifar10.png",
                           "fig1_sa_vs_aa_cifar10_stl10.png", "fig3_ra_sweeps_cifar10_cifar10_slf.png",
                           "fig3_ra_sweeps_synthetic_synthetic_slf.png", "fig4_tsne_synthetic_synthetic.png"])
    assert sorted(p.name for p in figures.glob("*.pdf")) == [p.replace(".png", ".pdf") for p in pngs]
    md = (out / "report.md").read_text()
    assert "fig4_tsne_synthetic_synthetic.png" in md
    # the cifar10 encoders do not exist: said so, the report goes on
    assert "t-SNE" in md and "encoder.pt does not exist" in md


def test_tsne_embeds_each_encoder(results, tmp_path):
    from bench.report.tsne import tsne_figures

    out = tsne_figures(results, tmp_path, n=40)
    assert [f.name for f in out.figures] == ["fig4_tsne_synthetic_synthetic"]
    assert sum("encoder.pt does not exist" in n for n in out.notes) == 5  # one per method and dataset pair


def test_cli_prints_markdown_to_the_terminal(store_root):
    from bench.cli import main

    res = CliRunner().invoke(main, ["report", "--results", str(store_root), "--methods", "advcl,acl"],
                             env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert "81.00 ± 1.00" in res.output and "(80.85; +0.15)" in res.output
    assert "RoCL" not in res.output.split("Missing")[0] and "Table 2" in res.output


def test_filters_and_csv_to_stdout(store_root):
    from bench.cli import main

    res = CliRunner().invoke(main, ["report", "--results", str(store_root), "--datasets", "*:stl10",
                                    "--format", "csv"])
    assert res.exit_code == 0, res.output
    rows = [r for r in csv.DictReader(io.StringIO(res.output)) if r.get("status") == "ok"]
    assert rows and {(r["source"], r["target"]) for r in rows} == {("cifar10", "stl10")}
    res = CliRunner().invoke(main, ["report", "--results", str(store_root), "--methods", "nope"])
    assert res.exit_code == 2 and "match --methods nope" in res.output
    res = CliRunner().invoke(main, ["report", "--results", str(store_root), "--format", "html"])
    assert res.exit_code == 2 and "--out" in res.output
    res = CliRunner().invoke(main, ["report", "--results", str(store_root), "--format", "pdf"])
    assert res.exit_code == 2 and "unknown report format pdf" in res.output


def test_compare_two_folders(store_root, tmp_path):
    from bench.report import load_results, render

    other = tmp_path / "other"
    store = build_store(other, scale=-20)  # 2 points lower on every advcl/slf/cifar10 count
    # two of our cells are not in the other folder: one has no folder at all, one's evaluate job failed there
    for method, ft in (("acl", "slf"), ("advcl", "aff")):
        key = next(r.key for r in store.records("evaluate")
                   if (r.method, r.finetuner, r.source, r.target) == (method, ft, "cifar10", "cifar10"))
        shutil.rmtree(store.job_dir(key))
    write_failed_job(store, "evaluate", "evaluate-advcl-aff-cifar10-s0-0123456789ab", "JobFailed: out of time",
                     method="advcl", finetuner="aff", source="cifar10", target="cifar10")
    ours, theirs = load_results(store_root), load_results(other)
    from bench.report.tables import build_tables

    t1 = next(t for t in build_tables(ours, theirs) if t.id == "table1")
    gone = entry(t1, "acl", "slf", "CIFAR-10", "sa")
    assert gone.value == pytest.approx(78.0) and gone.ref is None and gone.ref_text() == "—"
    assert "no result here" in next(f.text for f in t1.footnotes if f.number == gone.note)
    failed = entry(t1, "advcl", "aff", "CIFAR-10", "ra")
    assert failed.ref_text() == "— failed"
    assert "out of time" in next(f.text for f in t1.footnotes if f.number == failed.note)
    assert md_cells(render("md", ours, theirs), "ACL", "SLF")[4].endswith("(—)")  # SA: ours, the other's dash
    e = entry(t1, "advcl", "slf", "CIFAR-10", "sa")
    assert e.value == pytest.approx(81.0) and e.ref == pytest.approx(79.0) and e.ref_agg.std == pytest.approx(0.01)
    assert e.diff == pytest.approx(2.0)
    md = render("md", ours, theirs)
    assert "81.00 ± 1.00" in md and "(79.00 ± 1.00; +2.00)" in md and str(other) in md
    rows = list(csv.DictReader(io.StringIO(render("csv", ours, theirs))))
    sa = next(r for r in rows if (r["method"], r["finetuner"], r["target"], r["metric"], r["axis"])
              == ("advcl", "slf", "cifar10", "sa", ""))
    assert float(sa["other_value_pct"]) == pytest.approx(79.0) and float(sa["diff_other_pct"]) == pytest.approx(2.0)


def test_empty_and_absent_stores_exit_2(tmp_path):
    from bench.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(main, ["report", "--results", str(empty)])
    assert res.exit_code == 2 and f"no results in {empty}; run `bench run` first" in res.output
    absent = tmp_path / "absent"  # the real command line, once: exit status and message on stderr
    out = subprocess.run([sys.executable, "-m", "bench", "report", "--results", str(absent)], capture_output=True,
                         text=True, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 2 and f"no results in {absent}; run `bench run` first" in out.stderr


# ---------------------------------------------------------------- failed and blocked jobs

PRE_KEY = "pretrain-acl-cifar10-s0-aaaaaaaaaaaa"
PRE_ERROR = "RuntimeError: CUDA out of memory"


def failed_pretrain(store: Store, *, dependents: bool) -> list[str]:
    """ACL's pretraining failed. With `dependents`, the runner's folders of the jobs it blocked (finetune
    SLF and ALF, and their evaluations) as it writes them; without, an older run that left none."""
    write_failed_job(store, "pretrain", PRE_KEY, PRE_ERROR, method="acl", source="cifar10")
    keys = []
    if dependents:
        for ft in ("slf", "alf"):
            ft_key = f"finetune-acl-{ft}-cifar10-s0-bbbbbbbbbbb{ft[0]}"
            ev_key = f"evaluate-acl-{ft}-cifar10-s0-ccccccccccc{ft[0]}"
            for kind, key, deps in (("finetune", ft_key, {"pretrain": PRE_KEY}),
                                    ("evaluate", ev_key, {"finetune": ft_key})):
                write_failed_job(store, kind, key, f"blocked: {PRE_KEY} failed", blocked_by=PRE_KEY, method="acl",
                                 finetuner=ft, source="cifar10", target="cifar10", deps=deps)
                keys.append(key)
    return keys


def test_cells_blocked_by_a_failed_pretraining_are_missing_with_their_cause(tmp_path):
    from bench.report import load_results, render
    from bench.report.tables import build_tables

    store = Store(tmp_path / "results")
    write_eval(store, "advcl", "slf", "cifar10", "cifar10", 0, sa=800, ra=500, aa=420)
    blocked = failed_pretrain(store, dependents=True)
    results = load_results(store.root)
    states = {m.key: (m.state, m.blocked_by) for m in results.missing}
    assert states == {PRE_KEY: ("failed", None), **{k: ("blocked", PRE_KEY) for k in blocked}}
    tables = {t.id: t for t in build_tables(results)}
    t1, t3 = tables["table1"], tables["table3"]
    assert [(r.method, r.finetuner) for r in t1.rows] == [("acl", "slf"), ("advcl", "slf"), ("acl", "alf")]
    for table, ft, group in ((t1, "slf", "CIFAR-10"), (t1, "alf", "CIFAR-10"), (t3, None, "CIFAR-10 ALF")):
        e = entry(table, "acl", ft, group, "ra")
        assert e.agg is None and e.status == "blocked: pretrain failed"
        note = next(f.text for f in table.footnotes if f.number == e.note)
        assert f"pretrain job {PRE_KEY} failed: {PRE_ERROR}" in note
    assert entry(t1, "acl", "slf", "CIFAR-10", "sa").ref == paper_value("acl", "slf", "cifar10", "cifar10", "sa")

    md = render("md", results)
    row = next(l for l in md.splitlines() if l.startswith("| ACL | SLF |"))
    assert row.count("— blocked: pretrain failed") == 3
    missing = md.split("### Missing")[1]
    assert "5 job(s)" in missing.splitlines()[0]
    assert f"- pretrain `{PRE_KEY}` (ACL / CIFAR-10 / seed 0): **failed**: {PRE_ERROR}" in missing
    assert (f"- evaluate `{blocked[1]}` (ACL / SLF / CIFAR-10 / seed 0): **blocked**: pretrain job {PRE_KEY} "
            f"failed: {PRE_ERROR}") in missing
    tex = render("tex", results)
    assert r"{\scriptsize blocked: pretrain failed}" in tex
    rows = list(csv.DictReader(io.StringIO(render("csv", results))))
    assert {r["record_keys"]: r["status"] for r in rows if r["status"] not in ("ok", "missing")} == {
        PRE_KEY: "failed", **{k: "blocked" for k in blocked}}


def test_a_failed_pretraining_without_dependent_folders_is_listed(tmp_path):
    from bench.report import load_results, render

    store = Store(tmp_path / "results")
    write_eval(store, "advcl", "slf", "cifar10", "cifar10", 0, sa=800, ra=500, aa=420)
    failed_pretrain(store, dependents=False)
    results = load_results(store.root)
    assert [(m.key, m.kind, m.state, m.detail, m.method) for m in results.missing] == [
        (PRE_KEY, "pretrain", "failed", PRE_ERROR, "acl")]
    md = render("md", results)
    assert "ACL" not in md.split("### Missing")[0]  # no cell to show: which finetuners it had is unknown
    assert f"- pretrain `{PRE_KEY}` (ACL / CIFAR-10 / seed 0): **failed**: {PRE_ERROR}" in md


def test_a_store_of_failed_jobs_only_still_gets_a_report(tmp_path):
    from bench.cli import main

    store = Store(tmp_path / "results")
    blocked = failed_pretrain(store, dependents=True)
    out = tmp_path / "report"
    res = CliRunner().invoke(main, ["report", "--results", str(store.root), "--out", str(out), "--no-tsne"],
                             env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    message = f"No evaluate results in {store.root} yet: 5 job(s) without a usable record: 4 blocked, 1 failed"
    assert message in " ".join(res.output.split())
    assert sorted(p.name for p in out.iterdir()) == ["report.csv", "report.html", "report.md", "report.tex"]
    for name in ("report.md", "report.html"):
        text = (out / name).read_text().replace("\\_", "_")  # Markdown escapes the path's underscores
        assert message in text and PRE_KEY in text and PRE_ERROR in text and all(k in text for k in blocked)
    # the cells of the blocked evaluate jobs are in Table 1, as missing with their reason
    assert "| ACL | SLF | — blocked: pretrain failed¹ (" in (out / "report.md").read_text()
    # in the terminal too
    res = CliRunner().invoke(main, ["report", "--results", str(store.root)], env={"COLUMNS": "250"})
    assert res.exit_code == 0 and "Missing: 5 job(s)" in res.output and PRE_KEY in res.output


# ---------------------------------------------------------------- the records of a tiny real run


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A real `bench run` (tests/report_store.py: RUN_SETTINGS), then `bench report --out` on its folder.
    Returns (results folder, report folder, the evaluate records read from their JSON files)."""
    from bench.cli import main

    root = tmp_path_factory.mktemp("real_run")
    run_tiny_grid(root / "results")
    res = CliRunner().invoke(main, ["report", "--results", str(root / "results"), "--out", str(root / "report"),
                                    "--tsne-n", "32"])
    assert res.exit_code == 0, res.output
    return root / "results", root / "report", evaluate_records(root / "results")


def by_cell(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        assert (r["source"], r["target"]) == ("synthetic", "synthetic")
        out.setdefault((r["method"], r["finetuner"]), []).append(r)
    return out


def expected(points: list[dict]) -> dict:
    """Mean, std, 95% t-interval (2 seeds) and pooled Wilson interval of two seeds' Metric dicts, in %."""
    values = [p["value"] for p in points]
    mean, std = statistics.fmean(values), statistics.stdev(values)
    half = T_975_DF1 * std / math.sqrt(2)
    pooled = wilson_interval(sum(p["correct"] for p in points), sum(p["n"] for p in points))
    return {"mean": 100 * mean, "std": 100 * std, "lo": 100 * max(0.0, mean - half), "hi": 100 * min(1.0, mean + half),
            "pooled": (100 * pooled[0], 100 * pooled[1]), "n": points[0]["n"],
            "values": [100 * v for v in values]}


def sanity(records: list[dict]) -> list[str]:
    return [w for r in records for w in r["warnings"] if "selection=test" not in w]


@pytest.mark.slow
def test_real_run_writes_every_format_and_figure(real_run):
    _, out, records = real_run
    assert len(records) == 8 and sorted(by_cell(records)) == [("simclr", "aff"), ("simclr", "slf"),
                                                             ("supervised_at", "aff"), ("supervised_at", "slf")]
    for name in ("report.md", "report.tex", "report.csv", "report.html"):
        assert (out / name).stat().st_size > 1000, name
    names = ["fig1_sa_vs_ra_synthetic_synthetic", "fig1_sa_vs_aa_synthetic_synthetic",
             "fig3_ra_sweeps_synthetic_synthetic_slf", "fig3_ra_sweeps_synthetic_synthetic_aff",
             "fig4_tsne_synthetic_synthetic", "curves_simclr", "curves_supervised_at"]
    written = sorted(p.name for p in (out / "figures").iterdir())
    assert written == sorted(f"{n}.{e}" for n in names for e in ("png", "pdf"))
    for name in names:
        _nontrivial_png(out / "figures" / f"{name}.png")
        pdf = out / "figures" / f"{name}.pdf"
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 3000
    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == len(names)


@pytest.mark.slow
def test_real_run_tables_are_the_records(real_run):
    _, out, records = real_run
    cells = by_cell(records)
    rows = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    md = (out / "report.md").read_text()
    tex = (out / "report.tex").read_text()
    html = (out / "report.html").read_text()
    labels = {"simclr": "SimCLR", "supervised_at": "Supervised", "slf": "SLF", "aff": "AFF"}
    for (method, ft), recs in cells.items():
        assert [r["seed"] for r in recs] == [0, 1]
        shown_cells = dict(zip(("aa", "ra", "sa"), md_cells(md, labels[method], labels[ft])[2:]))
        for metric in ("aa", "ra", "sa"):
            e = expected([r["metrics"][metric] for r in recs])
            row = csv_row(rows, method=method, finetuner=ft, metric=metric, axis="")
            assert row["status"] == "ok" and row["seeds"] == "0;1" and int(row["n_seeds"]) == 2
            assert float(row["value_pct"]) == pytest.approx(e["mean"], abs=1e-4)
            assert float(row["std_pct"]) == pytest.approx(e["std"], abs=1e-4)
            assert [float(v) for v in row["values_pct"].split(";")] == pytest.approx(e["values"], abs=1e-4)
            assert int(row["n"]) == e["n"] == (8 if metric == "aa" else 32)
            ci = (float(row["ci95_low_pct"]), float(row["ci95_high_pct"]))
            pooled = (float(row["pooled_ci95_low_pct"]), float(row["pooled_ci95_high_pct"]))
            assert ci == pytest.approx((e["lo"], e["hi"]), abs=1e-3)
            assert pooled == pytest.approx(e["pooled"], abs=1e-3)
            assert row["paper_pct"] == "" and row["diff_paper_pct"] == ""  # the paper has no synthetic data
            assert json.loads(row["protocol"]) == recs[0]["metrics"][metric]["protocol"]
            # the Markdown, LaTeX and HTML show the same mean ± std; nothing beside it (no paper value)
            shown = f"{e['mean']:.2f} ± {e['std']:.2f}"
            assert shown_cells[metric].startswith(shown) and "(" not in shown_cells[metric], shown_cells
            assert shown.replace("±", "$\\pm$") in tex and f'<span class="v">{e["mean"]:.2f}</span>' in html
            number = shown_cells[metric][len(shown):].strip("†‡§")  # the superscript footnote number
            if number:  # a cell that differs from what the table's cells share has its own footnote
                footnote = next(l for l in md.splitlines() if l.startswith(f"- {number} "))
                name = metric.upper()
                assert f"{name} n = {e['n']}, 95% CI [{e['lo']:.2f}, {e['hi']:.2f}]" in footnote
                assert f"pooled Wilson [{e['pooled'][0]:.2f}, {e['pooled'][1]:.2f}]" in footnote
                assert "seeds 0, 1" in footnote
            else:  # said once under the title
                assert "Every cell: seeds 0, 1" in md
        # flags: † where the records say selection=test, ‡ where they carry a sanity warning
        test_selected = all("selection=test" in r["flags"] for r in recs)
        assert test_selected == (ft == "aff") and test_selected == any("selection=test" in r["flags"] for r in recs)
        for text in shown_cells.values():
            assert ("†" in text) == test_selected and ("‡" in text) == bool(sanity(recs)), (method, ft, text)
        for r in recs:
            for w in sanity([r]):  # each distinct warning once, with the cells it applies to
                line = f"- ‡ seed {r['seed']}: {w}".replace("_", "\\_")
                cell = f"{labels[method]} / {labels[ft]} / synthetic"
                assert any(l.startswith(line) and cell in l for l in md.splitlines()), line
        row = csv_row(rows, method=method, finetuner=ft, metric="ra", axis="")
        assert (row["selection_on_test"] == "True") == test_selected
        assert row["warnings"] == " | ".join(f"seed {r['seed']}: {w}" for r in recs for w in sanity([r]))
        # the sweeps, point by point
        for axis, xs in (("eps", (16, 0)), ("steps", (1, 2))):
            for i, x in enumerate(xs):
                e = expected([r["metrics"]["sweeps"][axis][i] for r in recs])
                point = csv_row(rows, method=method, finetuner=ft, axis=axis, x=str(x))
                assert float(point["value_pct"]) == pytest.approx(e["mean"], abs=1e-4)
                assert int(point["n"]) == 32
    # the tiny run is set up to leave sanity warnings on some cells and not on others (see RUN_SETTINGS)
    warned = [cell for cell, recs in cells.items() if sanity(recs)]
    assert 0 < len(warned) < len(cells), "the tiny run no longer trips the sweep sanity check on some cells"
    assert "† = model selected on the test set" in md and "‡ = sanity warnings" in md
    assert "Missing" not in md


@pytest.mark.slow
def test_real_run_labels_name_the_records_protocol(real_run, tmp_path, monkeypatch):
    from bench.report import figures, load_results

    results_dir, out, records = real_run
    ra = records[0]["metrics"]["ra"]["protocol"]
    assert (ra["steps"], ra["eps_255"]) == (2, 4.0)
    md = (out / "report.md").read_text()
    assert "RA PGD-2 eps 4/255 alpha 2/255, 1 restart(s), n=32" in md and "AA AutoAttack standard eps 4/255, n=8" in md
    labels = {}
    real_save = figures.save

    def save(fig, folder, name, title, caption):  # keep each figure's axis labels
        labels[name] = [ax.get_xlabel() for ax in fig.axes]
        return real_save(fig, folder, name, title, caption)

    monkeypatch.setattr(figures, "save", save)
    results = load_results(results_dir)
    made = {f.name: f for f in figures.scatter_figures(results, tmp_path) + figures.sweep_figures(results, tmp_path)}
    assert labels["fig1_sa_vs_ra_synthetic_synthetic"] == ["RA (%) — PGD-2, 4/255"] * 2
    # the eps axis runs 20 steps (bench.evaluation); the steps axis runs at eval.eps
    assert labels["fig3_ra_sweeps_synthetic_synthetic_slf"] == ["ε (× 1/255), PGD-20", "PGD steps, ε = 4/255"]
    assert "(PGD-20)" in made["fig3_ra_sweeps_synthetic_synthetic_slf"].caption
    assert "(ε = 4/255)" in made["fig3_ra_sweeps_synthetic_synthetic_slf"].caption
