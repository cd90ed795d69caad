"""A report a person reads at a glance: what every cell shares said once per table, per-cell notes only
for what differs, identical flags listed once, others' published numbers labelled by source and
protocol, and every text from a record or a failure escaped in every format."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

import bench
from bench.report import load_results, paper, render
from bench.report.tables import build_tables, md_escape, tex_escape
from bench.store import Store
from report_store import write_eval, write_failed_job

BUDGET = "AutoAttack ran at 0.05 of its standard iterations and queries (eval.aa_budget): a smoke-test AA"
COLLAPSE = "collapsed classifier: class 3 (class_3) for 98.0% of the 200 clean test images (threshold 55.0%)"
SCRIPT = "<script>alert('x')</script>"
METHODS = ("supervised_at", "apdpe", "rocl", "acl", "advcl", "simclr")
PUBLISHED = Path(bench.__file__).resolve().parent / "report" / "published"


def smoke_like(root: Path) -> Store:
    """18 single-seed cells that all carry the same AutoAttack-budget warning; two also collapsed."""
    store = Store(root)
    for i, method in enumerate(METHODS):
        for ft in ("slf", "alf", "aff"):
            warnings = [BUDGET] + ([COLLAPSE] if (method, ft) in {("apdpe", "slf"), ("rocl", "alf")} else [])
            write_eval(store, method, ft, "synthetic", "synthetic", 0, sa=120 + 10 * i, ra=20 + i, aa=5, n=200,
                       warnings=warnings, flags=["collapsed-classifier"] if len(warnings) > 1 else ())
    return store


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("glance") / "results"
    smoke_like(root)
    return load_results(root)


def test_what_every_cell_shares_is_said_once_per_table(smoke_results):
    t1 = build_tables(smoke_results)[0]
    assert t1.shared_flags == [("‡", BUDGET)]
    assert t1.shared == ["Every cell: seed 0; SA, RA and AA on n = 200 test images. One seed: each value's 95% "
                         "Wilson interval is at most ±6.9 points wide at n = 200 (each cell's own: report.csv, "
                         "the HTML page's hover)."]
    assert t1.footnotes == []  # no cell differs from the others
    marks = {(r.method, r.finetuner): r.entries[0][0].marks for r in t1.rows}
    assert marks[("apdpe", "slf")] == "‡" and marks[("rocl", "alf")] == "‡" and marks[("acl", "slf")] == ""
    # the collapse warning of two cells: listed once, with both cells; its flag is not listed again (§)
    assert t1.flag_groups() == [("‡", COLLAPSE, ["AP-DPE / SLF / synthetic", "RoCL / ALF / synthetic"])]
    md = render("md", smoke_results)
    assert md.count("smoke-test AA") == 2  # once in Table 1, once in Table 3
    assert md.count("collapsed classifier") == 2 and "flag collapsed-classifier" not in md
    assert len(md.encode()) < 4500  # the same 18 cells took 14.5 KB with a footnote and flags per cell


def test_a_cell_that_differs_gets_its_note(tmp_path):
    store = smoke_like(tmp_path / "results")
    write_eval(store, "simclr", "slf", "synthetic", "synthetic", 1, sa=150, ra=10, aa=5, n=200, warnings=[BUDGET])
    t1 = build_tables(load_results(store.root))[0]
    (note,) = t1.footnotes
    assert note.label == "SimCLR / SLF / synthetic" and "seeds 0, 1" in note.text and "95% CI" in note.text
    assert t1.shared[0].startswith("17 of 18 cells (the others: footnotes): seed 0;")
    assert "flag collapsed-classifier" not in render("md", load_results(store.root))
    # a collapse in a two-seed cell: its warning carries the seed ("seed 1: collapsed ..."), its flag stays unlisted
    write_eval(store, "apdpe", "slf", "synthetic", "synthetic", 1, sa=150, ra=10, aa=5, n=200,
               warnings=[BUDGET, COLLAPSE], flags=["collapsed-classifier"])
    md = render("md", load_results(store.root))
    assert "seed 1: collapsed classifier" in md and "flag collapsed-classifier" not in md
    entry = next(r for r in t1.rows if (r.method, r.finetuner) == ("simclr", "slf")).entries[0][2]
    assert entry.note == 1 and entry.ours_text() == "80.00 ± 7.07"
    assert "95% CI" in entry.hover("x")  # every number's interval stays reachable in the HTML hover


def test_text_from_failures_and_warnings_is_escaped_in_every_format(tmp_path):
    store = Store(tmp_path / "results")
    write_eval(store, "acl", "slf", "cifar10", "cifar10", 0, sa=700, ra=400, aa=300,
               warnings=[f"a warning with {SCRIPT} | *bold* [x](javascript:alert(1))"])
    write_failed_job(store, "evaluate", "evaluate-acl-aff-cifar10-s0-0123456789ab", f"JobFailed: {SCRIPT}\nline 2",
                     method="acl", finetuner="aff", source="cifar10", target="cifar10")
    results = load_results(store.root)
    md, html, tex, text = (render(f, results) for f in ("md", "html", "tex", "csv"))
    assert "<script" not in md and md.count("&lt;script&gt;") == 3  # the warning, the footnote, the Missing list
    assert "](javascript" not in md and "\\| \\*bold\\*" in md
    assert "<script" not in html and "&lt;script&gt;" in html
    assert "<script" not in tex and r"\textless{}script\textgreater{}" in tex
    failed = next(r for r in csv.DictReader(io.StringIO(text)) if r["status"] == "failed")
    assert SCRIPT in failed["warnings"]  # CSV keeps the text as data, quoted by the csv module


def test_csv_cells_that_a_spreadsheet_would_run_get_an_apostrophe(tmp_path):
    store = Store(tmp_path / "results")
    write_eval(store, "acl", "slf", "cifar10", "cifar10", 0, sa=700, ra=400, aa=300, warnings=["=1+2"])
    rows = list(csv.DictReader(io.StringIO(render("csv", load_results(store.root)))))
    assert {r["warnings"] for r in rows if r["metric"]} == {"'=1+2"}


def test_escapes_are_literal():
    assert md_escape("a_b*c|d`e<f>&\ng") == "a\\_b\\*c\\|d\\`e&lt;f&gt;&amp; g"
    assert tex_escape("<x> & 5% | y") == r"\textless{}x\textgreater{} \& 5\% \textbar{} y"


def test_one_loader_normalizes_both_published_files():
    refs = paper.references()
    rows = sum(len(json.loads((PUBLISHED / name).read_text())["rows"]) for name in paper.PUBLISHED_FILES)
    assert len(refs) == rows
    labels = {r.source_label for r in refs}
    assert {"paper", "README", "RobustSSL_Benchmark reproduction", "authors' leaderboard"} <= labels
    assert all(r.protocol and r.values for r in refs)
    deacl = paper.references_for("deacl", "aff", "cifar10", "cifar10")
    readme = next(r for r in deacl if r.source_label == "README")
    assert readme.values == {"aa": 50.75, "ra": 54.23, "sa": 83.64} and dict(readme.std)["ra"] == 0.238
    assert readme.citation.startswith("pantheon5100/DeACL")  # `cite` in that file, `citation` in the other
    rcs = [r for r in paper.references_for("dynacl", "slf", "cifar10", "cifar10") if r.variant]
    assert rcs and all(r.label == "DynACL-RCS" and dict(r.settings)["select.method"] == "rcs" for r in rcs)


def test_tables_show_the_published_numbers_with_their_source(tmp_path):
    store = Store(tmp_path / "results")
    write_eval(store, "acl", "slf", "cifar10", "cifar10", 0, sa=780, ra=430, aa=390)
    write_eval(store, "deacl", "slf", "cifar10", "cifar10", 0, sa=790, ra=500, aa=420)
    results = load_results(store.root)
    t1 = build_tables(results)[0]
    assert [p.label for p in t1.published] == ["ACL / SLF / CIFAR-10", "DeACL / SLF / CIFAR-10"]
    sources = {ref.source_label for _, ref in t1.sources()}
    assert {"RobustSSL_Benchmark reproduction", "authors' leaderboard", "paper", "README"} <= sources
    md = render("md", results)
    assert "Published elsewhere for these cells, under other protocols" in md
    assert "DeACL / SLF / CIFAR-10: AA 45.31, RA 53.95, SA 80.17 [" in md
    assert "Sources: [a] " in md
    html = render("html", results)
    assert "Published elsewhere" in html and 'class="published sources"' in html
    rows = list(csv.DictReader(io.StringIO(render("csv", results))))
    assert any("RobustSSL_Benchmark reproduction" in r["published_elsewhere"] for r in rows if r["method"] == "acl")
