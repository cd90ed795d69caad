"""A method's configurations as separate labelled rows, Tables 4 and 5 from a small real run with the paper's
numbers beside ours, and Figures 5 and 6 (fim and landscape jobs) in the report of a smoke-sized run.

The real run is `bench run --preset smoke` (with its fim and landscape stages) cut to AdvCL and SimCLR with
SLF, twice into one results folder: `--vary advcl.views=4,7`
(Table 4's rows 4 and 7) and `--vary advcl.pseudo_labels=none,simclr advcl.cluster_ks=10` (Table 5's
w/o ClusterFit and (CIFAR-10, SimCLR) K = 10 rows).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench.record import Record
from bench.store import Store
from helpers import SMOKE_TINY
from report_store import metric, ra_protocol

GRID = ["--preset", "smoke", "--methods", "advcl,simclr", "--finetune", "slf", "--slots", "2", *SMOKE_TINY]


def run(results: Path, *args: str) -> None:
    from bench.cli import main

    res = CliRunner().invoke(main, ["run", *GRID, "--results", str(results), *args])
    assert res.exit_code == 0, res.output[-5000:]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    from bench.report import load_results, write_report

    root = tmp_path_factory.mktemp("variants")
    results = root / "results"
    run(results, "--vary", "advcl.views=4,7")  # the preset's stages: fim, landscape
    run(results, "--vary", "advcl.pseudo_labels=none,simclr advcl.cluster_ks=10", "--stages", "")
    report = write_report(load_results(results), root / "report", tsne=False)
    records = [json.loads(p.read_text()) for p in sorted(results.glob("*/record.json"))]
    return results, root / "report", records, report


def md_row(md: str, *labels: str) -> list[str]:
    line = next(l for l in md.splitlines() if l.startswith("| " + " | ".join(labels) + " |"))
    return [c.strip() for c in line.strip("|").split("|")]


@pytest.mark.slow
def test_two_variants_have_their_cells_share_their_pseudo_labels_and_are_separate_rows(real_run):
    _, out, records, _ = real_run
    evaluate = {r["variant"]: r for r in records if r["kind"] == "evaluate" and r["method"] == "advcl"}
    assert set(evaluate) == {"views=4", "views=7", "pseudo_labels=none, cluster_ks=10",
                             "pseudo_labels=simclr, cluster_ks=10"}
    by_key = {r["key"]: r for r in records}

    def pretrain(variant):
        return by_key[by_key[evaluate[variant]["inputs"]["classifier"]]["inputs"]["encoder"]]

    p4, p7 = pretrain("views=4"), pretrain("views=7")
    assert p4["config"]["advcl"]["views"] == ["adv_x", "tau1", "tau2"] and p4["key"] != p7["key"]
    assert p4["inputs"]["pseudo_labels"] == p7["inputs"]["pseudo_labels"]  # one pseudo-label job for both
    assert by_key[p4["inputs"]["pseudo_labels"]]["variant"] is None
    assert "pseudo_labels" not in pretrain("pseudo_labels=none, cluster_ks=10")["inputs"]
    md = (out / "report.md").read_text()
    rows = {label: md_row(md, label, "SLF") for label in ("AdvCL [views=4]", "AdvCL [views=7]", "SimCLR")}
    for label, variant in (("AdvCL [views=4]", "views=4"), ("AdvCL [views=7]", "views=7")):
        sa = 100 * evaluate[variant]["metrics"]["sa"]["value"]
        assert rows[label][4].startswith(f"{sa:.2f}") and "(" not in rows[label][4]  # a variant: no Table 1 value
    report_rows = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    assert {"advcl[views=4]", "advcl[views=7]", "simclr"} <= {r["method"] for r in report_rows}
    html = (out / "report.html").read_text()
    assert "AdvCL [views=4]" in html and "AdvCL [views=7]" in html


@pytest.mark.slow
def test_tables_4_and_5_render_with_the_papers_numbers_beside(real_run):
    _, out, records, report = real_run
    md = (out / "report.md").read_text()
    assert "### Table 4: AdvCL with different contrastive views" in md
    assert "### Table 5: AdvCL with different pretrained models f_pre" in md
    row4 = md_row(md, "4", "x + δ, τ₁(x), τ₂(x)")
    assert row4[2] == "views=4" and row4[3].endswith("(50.19)") and row4[4].endswith("(80.17)")
    assert md_row(md, "1", "τ₁(x) + δ₁, τ₂(x)")[3] == "— (42.12)"  # a paper row we did not run
    no_cf = md_row(md, "N/A", "w/o ClusterFit")
    assert no_cf[2] == "pseudo\\_labels=none, cluster\\_ks=10" and no_cf[3].endswith("(48.89)")
    k10 = md_row(md, "(CIFAR-10, SimCLR)", "10")
    assert k10[2] == "pseudo\\_labels=simclr, cluster\\_ks=10" and k10[3].endswith("(50.10)")
    evaluate = {r["variant"]: r for r in records if r["kind"] == "evaluate" and r["method"] == "advcl"}
    assert k10[3].startswith(f"{100 * evaluate['pseudo_labels=simclr, cluster_ks=10']['metrics']['ra']['value']:.2f}")
    rows = list(csv.DictReader(io.StringIO((out / "ablations.csv").read_text())))
    ours = [r for r in rows if r["variant"] == "views=4" and r["table"] == "table4" and r["metric"] == "sa"]
    assert len(ours) == 1 and ours[0]["paper_pct"] == "80.17" and ours[0]["diff_paper_pct"] == ""  # synthetic data
    tex = (out / "report.tex").read_text()
    assert r"\label{tab:bench-table4-synthetic-synthetic-slf}" in tex and "(80.17)" in tex
    html = (out / "report.html").read_text()
    assert 'id="table4-synthetic-synthetic-slf"' in html and "paper 48.89" in html
    assert report.files["ablations_csv"] == out / "ablations.csv"


@pytest.mark.slow
def test_the_smoke_sized_report_shows_figures_5_and_6_and_figure_1_under_aa(real_run):
    import numpy as np
    from PIL import Image

    _, out, _, report = real_run
    names = {f.name for f in report.figures}
    wanted = {"fig1_sa_vs_ra_synthetic_synthetic", "fig1_sa_vs_aa_synthetic_synthetic",
              "fig3_ra_sweeps_synthetic_synthetic_slf", "fig5_fim_synthetic_synthetic", "fig6_landscape_1d_synthetic_synthetic_slf",
              "fig6_landscape_2d_synthetic_synthetic_slf", "curves_advcl", "curves_simclr"}
    assert names == wanted
    html = (out / "report.html").read_text()
    for name in wanted:
        png, pdf = out / "figures" / f"{name}.png", out / "figures" / f"{name}.pdf"
        pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.float32)
        assert pixels.shape[0] > 200 and pixels.std() > 10 and pdf.read_bytes()[:5] == b"%PDF-", name
        assert f'<figure id="{name}">' in html
    fim = next(f for f in report.figures if f.name == "fig5_fim_synthetic_synthetic")
    assert "maximising" in fim.caption and "Engstrom" in fim.caption
    # three columns of maps: AdvCL's two view sets and SimCLR (three encoders, three fim jobs)
    assert {r["key"].split("-")[1] for r in report_records(out.parent / "results", "fim")} == {"advcl", "simclr"}
    assert len(report_records(out.parent / "results", "fim")) == 3
    assert len(report_records(out.parent / "results", "landscape")) == 3


def report_records(results: Path, kind: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in results.glob(f"{kind}-*/record.json")]


# ---------------------------------------------------------------- rows of unlabelled configurations


def write(store: Store, kind: str, key: str, config: dict, inputs: dict, seed: int, metrics=None, variant=None):
    store.write(Record(kind=kind, key=key, seed=seed, method="advcl", finetuner=None if kind == "pretrain" else "slf",
                       source="cifar10", target=None if kind == "pretrain" else "cifar10", config=config,
                       inputs=inputs, metrics=metrics or {"epochs": 1}, variant=variant))


def chain(store: Store, name: str, advcl: dict, seed: int, sa: int, variant=None) -> None:
    pre, ft, ev = f"pretrain-advcl-{name}-s{seed}", f"finetune-advcl-{name}-s{seed}", f"evaluate-advcl-{name}-s{seed}"
    write(store, "pretrain", pre, {"advcl": advcl, "encoder": {"width": 64}}, {}, seed, variant=variant)
    write(store, "finetune", ft, {"slf": {"epochs": 25}}, {"encoder": pre}, seed, {"selected_epoch": 1}, variant)
    write(store, "evaluate", ev, {"eval": {"n": 1000}}, {"classifier": ft}, seed,
          {"sa": metric(sa, attack=None), "ra": metric(500, **ra_protocol()), "aa": None}, variant)


def test_configurations_without_a_label_are_rows_named_by_the_settings_that_differ(tmp_path):
    from bench.report import load_results
    from bench.report.tables import build_tables

    store = Store(tmp_path)
    for seed in (0, 1):
        chain(store, "a", {"views": ["adv_x", "tau1", "tau2", "x_hfc"], "epochs": 400}, seed, 800 + seed)
        chain(store, "b", {"views": ["adv_x", "tau1", "tau2"], "epochs": 400}, seed, 790 + seed)
    chain(store, "c", {"views": ["adv_x", "tau1", "tau2"], "epochs": 100}, 0, 700, variant="short")
    results = load_results(tmp_path)
    cells = {k[0]: c for k, c in results.cells.items()}
    assert sorted(cells) == ["advcl[epochs=400, views=[adv_x,tau1,tau2,x_hfc]]",
                             "advcl[epochs=400, views=[adv_x,tau1,tau2]]", "advcl[short]"]
    a = cells["advcl[epochs=400, views=[adv_x,tau1,tau2,x_hfc]]"]
    assert a.seeds == [0, 1] and a.variant == "epochs=400, views=[adv_x,tau1,tau2,x_hfc]"
    assert a.settings == {"views": ["adv_x", "tau1", "tau2", "x_hfc"], "epochs": 400}  # what Tables 4 and 5 read
    assert a.paper("sa") is None  # a variant row is not the paper's Table 1 configuration
    assert cells["advcl[short]"].seeds == [0] and cells["advcl[short]"].metrics["sa"].mean == 0.7
    assert not [n for n in results.notes if "different configurations" in n]  # nothing left out
    (t1,) = build_tables(results)
    assert [r.labels[0] for r in t1.rows] == ["AdvCL [epochs=400, views=[adv_x,tau1,tau2,x_hfc]]",
                                              "AdvCL [epochs=400, views=[adv_x,tau1,tau2]]", "AdvCL [short]"]
    # one configuration, unlabelled: the method's own row, with the paper's value beside it
    single = tmp_path / "single"
    chain(Store(single), "a", {"views": ["adv_x", "tau1", "tau2", "x_hfc"]}, 0, 800)
    (cell,) = load_results(single).cells.values()
    assert cell.method == "advcl" and cell.variant is None and cell.paper("sa") == 80.85


def test_copied_variant_records_without_their_inputs_stay_separate_rows(tmp_path):
    from bench.report import load_results

    store = Store(tmp_path)
    for variant, sa in (("views=4", 700), ("views=7", 800)):
        write(store, "evaluate", f"evaluate-advcl-{variant[-1]}-s0", {"eval": {"n": 1000}},
              {"classifier": f"finetune-gone-{variant[-1]}"}, 0,
              {"sa": metric(sa, attack=None), "ra": metric(500, **ra_protocol()), "aa": None}, variant)
    results = load_results(tmp_path)
    assert sorted(k[0] for k in results.cells) == ["advcl[views=4]", "advcl[views=7]"]
    assert results.get("advcl[views=4]", "slf", "cifar10", "cifar10").metrics["sa"].mean == 0.7
