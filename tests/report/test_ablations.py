"""Tables 4 and 5 (bench.report.ablations): the published numbers, which paper row a variant's settings
give, and the Markdown / LaTeX / CSV layouts with the paper's numbers and our differences."""

from __future__ import annotations

import csv
import io

import pytest

from bench.report import paper
from bench.report.ablations import (VariantResult, ablation_csv, ablation_markdown, ablation_tex, build_table4,
                                    build_table5, table4_key, table5_key)
from bench.report.collect import aggregate
from report_store import metric

ENSEMBLE = (2, 10, 50, 100, 500)


def agg(*correct: int, n: int = 1000):
    return aggregate((seed, metric(c, n)) for seed, c in enumerate(correct))


def variant(views=7, pseudo_labels="simclr", ks=ENSEMBLE, ra=(500, 510), sa=(800, 810), label="", **where):
    from methods.advcl import TABLE4_VIEWS

    settings = {"views": TABLE4_VIEWS[views] if isinstance(views, int) else views, "pseudo_labels": pseudo_labels,
                "cluster_ks": ks}
    return VariantResult(settings, agg(*ra), agg(*sa), label=label, **where)


def test_published_numbers_and_view_sets_match_the_paper_and_advcl():
    from methods.advcl import TABLE4_VIEWS

    rows = paper.table4()["rows"]
    assert [r["row"] for r in rows] == list(range(1, 8))
    assert {r["row"]: tuple(r["views"]) for r in rows} == TABLE4_VIEWS
    assert [(r["ra"], r["sa"]) for r in rows] == [(42.12, 77.07), (42.48, 73.12), (43.51, 74.22), (50.19, 80.17),
                                                  (49.51, 79.83), (50.03, 80.14), (50.45, 80.85)]
    t5 = paper.table5()["rows"]
    assert len(t5) == 11 and paper.table5()["ensemble"] == list(ENSEMBLE)
    assert paper.table5_row("none", None) == {"f_pre": "none", "k": None, "ra": 48.89, "sa": 77.73}
    assert paper.table5_row("imagenet_supervised", 100)["sa"] == 78.08
    assert paper.table5_row("cifar10_simclr", 2) is None
    # row 7, Table 5's ensemble row and Table 1's AdvCL SLF CIFAR-10 cell are one configuration
    best = paper.published("advcl", "slf", "cifar10", "cifar10")
    assert (best["ra"], best["sa"]) == (rows[6]["ra"], rows[6]["sa"])
    assert paper.table5_row("imagenet_simclr", "ensemble")["ra"] == best["ra"]


def test_which_row_a_variant_is():
    from methods.advcl import TABLE4_VIEWS

    assert table4_key({"views": TABLE4_VIEWS[4]}) == 4
    assert table4_key({"views": ("tau2", "tau1", "adv_x")}) == 4  # any order
    assert table4_key({"views": 6}) == 6 and table4_key({"views": ("adv_x", "tau2")}) is None
    assert table4_key({}) is None
    assert table5_key({"pseudo_labels": "none"}) == ("none", None)
    assert table5_key({"pseudo_labels": "simclr", "ce_weight": 0}) == ("none", None)
    assert table5_key({"pseudo_labels": "simclr", "cluster_ks": (10,)}) == ("cifar10_simclr", 10)
    assert table5_key({"pseudo_labels": "imagenet", "cluster_ks": [100]}) == ("imagenet_supervised", 100)
    assert table5_key({"pseudo_labels": "file:/x/labels.npz", "cluster_ks": (500, 2, 10, 50, 100)}) == \
        ("imagenet_simclr", "ensemble")
    assert table5_key({"pseudo_labels": "file:/x/labels.npz", "cluster_ks": (2,)}) == ("imagenet_simclr", 2)
    assert table5_key({}) is None  # advcl's defaults (SimCLR on the same data, the K ensemble): no paper row
    assert table5_key({"pseudo_labels": "simclr", "cluster_ks": (2,)}) is None  # the paper has no such row
    assert table5_key({"pseudo_labels": "simclr", "cluster_ks": (10, 50)}) is None
    assert table5_key({"pseudo_labels": "file:/y", "cluster_ks": (10,)}, f_pre="imagenet_supervised") == \
        ("imagenet_supervised", 10)


def test_table4_layout_numbers_and_differences():
    entries = [variant(4, ra=(501, 503), sa=(801, 803), label="views=4"),
               variant(7, ra=(505, 507), sa=(810, 812), label="views=7"),
               variant(7, pseudo_labels="none", ra=(480, 482), sa=(770, 772), label="views=7, no ClusterFit"),
               variant(("adv_x", "tau2"), label="two views")]
    (t,) = build_table4(entries)
    assert t.id == "table4" and t.comparable
    assert [r.key for r in t.rows] == [1, 2, 3, 4, 5, 6, 7, 7]
    row4 = t.rows[3]
    assert row4.variant == "views=4" and row4.diff("ra") == pytest.approx(round(50.2, 2) - 50.19)
    assert [r.variant for r in t.rows[6:]] == ["views=7", "views=7, no ClusterFit"]
    assert t.rows[0].result is None and t.rows[0].diff("ra") is None
    assert [e.label for e in t.unmatched] == ["two views"]
    md = ablation_markdown(t)
    assert "| 4 | x + δ, τ₁(x), τ₂(x) | views=4 | 50.20 ± 0.14¹ (50.19; +0.01) | 80.20 ± 0.14¹ (80.17; +0.03) |" in md
    assert "| 1 | τ₁(x) + δ₁, τ₂(x) | — | — (42.12) | — (77.07) |" in md
    assert "- ¹ views=4: seeds 0, 1; RA n = 1000 per seed, 95% CI" in md
    assert "Variants without a row in the paper's Table 4:" in md and "two views (" in md
    assert "48.10 ± 0.14³ (50.45; −2.35)" in md
    tex = ablation_tex(t)
    tex.encode("ascii")
    assert r"$x + \delta, \tau_1(x), \tau_2(x)$ & views=4 & 50.20 $\pm$ 0.14$^{1}$ {\scriptsize(50.19; +0.01)}" in tex
    rows = list(csv.DictReader(io.StringIO(ablation_csv([t]))))
    r = next(r for r in rows if r["paper_row"] == "4" and r["metric"] == "ra")
    assert (r["variant"], r["value_pct"], r["paper_pct"], r["diff_paper_pct"], r["seeds"]) == \
        ("views=4", "50.2", "50.19", "0.01", "0;1")
    assert sum(r["matched"] == "False" for r in rows) == 2  # the unmatched variant's RA and SA


def test_table5_layout_and_a_run_off_the_papers_setting():
    entries = [variant(pseudo_labels="none", label="w/o"), variant(pseudo_labels="simclr", ks=(10,), label="K=10"),
               variant(pseudo_labels="file:/l.npz", label="ensemble"),
               variant(pseudo_labels="simclr", ks=(10,), label="synthetic K=10", source="synthetic",
                       target="synthetic")]
    cifar, synthetic = build_table5(entries)
    assert cifar.id == "table5" and synthetic.id == "table5-synthetic-synthetic-slf" and not synthetic.comparable
    assert len(cifar.rows) == 11 and [r.variant for r in cifar.rows if r.result] == ["w/o", "K=10", "ensemble"]
    md = ablation_markdown(cifar)
    assert "| N/A | w/o ClusterFit | w/o | 50.50 ± 0.71¹ (48.89; +1.61) |" in md
    assert "| (CIFAR-10, SimCLR) | 10 | K=10 |" in md and "|  | 100 | — | — (49.21) | — (79.52) |" in md
    assert "| (ImageNet, SimCLR) | 2 |" in md and "|  | Ensemble | ensemble | 50.50 ± 0.71³ (50.45; +0.05) |" in md
    smd = ablation_markdown(synthetic)
    assert "ours: synthetic, SLF" in synthetic.title
    assert "| (CIFAR-10, SimCLR) | 10 | synthetic K=10 | 50.50 ± 0.71¹ (50.10) |" in smd  # no difference
    assert "no difference is shown" in synthetic.caption
    tex = ablation_tex(cifar)
    tex.encode("ascii")
    assert tex.count(r"\midrule") == 4  # header rule + one between each f_pre block
    rows = list(csv.DictReader(io.StringIO(ablation_csv([cifar, synthetic]))))
    none = next(r for r in rows if r["paper_f_pre"] == "none" and r["metric"] == "sa")
    assert (none["paper_k"], none["paper_pct"], none["value_pct"]) == ("", "77.73", "80.5")
    syn = next(r for r in rows if r["source"] == "synthetic" and r["variant"] == "synthetic K=10" and r["metric"] == "ra")
    assert syn["diff_paper_pct"] == "" and syn["paper_pct"] == "50.1" and syn["paper_setting"] == "False"
