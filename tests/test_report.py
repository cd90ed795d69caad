"""`bench report`: tables, formats, figures and the CLI, on a store of real records with known numbers.

The store is written through `bench.record.Record` / `bench.store.Store` exactly as the jobs write
it: evaluate records with Metric dicts and sweeps, finetune and pretrain records linking to
`encoder.pt` files (tiny untrained ResNet-18s, for the t-SNE), a failed job and an unreadable
record. The tests check the numbers in every format against those records and the paper.
"""

from __future__ import annotations

import csv
import hashlib
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

from bench.record import Metric, Record, wilson_interval
from bench.store import Store

N = 1000
T_975_DF2 = 4.302653


# ---------------------------------------------------------------- building a store


def metric(correct: int, n: int = N, **protocol) -> dict:
    m = Metric.from_counts(correct, n, {"n": n, **protocol})
    return json.loads(json.dumps({"value": m.value, "n": m.n, "correct": m.correct, "ci95": list(m.ci95),
                                  "protocol": m.protocol}))


def ra_protocol(eps_255: float = 8, steps: int = 20) -> dict:
    return {"attack": "pgd", "eps": eps_255 / 255, "eps_255": eps_255, "alpha_255": 2, "steps": steps,
            "restarts": 1}


def sweeps(base_ra: int, n: int = 200) -> dict:
    """RA against eps (2..16/255) and steps (1..100), falling with strength; counts out of n."""
    eps = [(2, base_ra + 60), (4, base_ra + 35), (8, base_ra), (16, max(0, base_ra - 60))]
    steps = [(1, base_ra + 30), (10, base_ra + 4), (20, base_ra), (100, base_ra - 3)]
    return {"eps": [metric(c, n, **ra_protocol(e, 20)) for e, c in eps],
            "steps": [metric(c, n, **ra_protocol(8, s)) for s, c in steps]}


def digest(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:12]


def write_chain(store: Store, method: str, ft: str, source: str, target: str, seed: int, *, encoder: bool,
                config: dict | None = None) -> str:
    """pretrain (+ encoder.pt) and finetune records; returns the finetune key."""
    pre_key = f"pretrain-{method}-{source}-s{seed}-{digest(method, source, seed)}"
    ft_key = f"finetune-{method}-{ft}-{source}-{target}-s{seed}-{digest(method, ft, source, target, seed)}"
    if not store.has(pre_key):
        if encoder:
            import torch

            from bench.models import save_encoder
            from bench.models.resnet import ResNet18

            torch.manual_seed(seed + len(method))
            store.job_dir(pre_key).mkdir(parents=True, exist_ok=True)
            save_encoder(store.job_dir(pre_key) / "encoder.pt", ResNet18(width=2).eval(), {"method": method})
        store.write(Record(kind="pretrain", key=pre_key, seed=seed, method=method, source=source,
                           config=config or {}, metrics={"epochs": 1}))
    store.write(Record(kind="finetune", key=ft_key, seed=seed, method=method, finetuner=ft, source=source,
                       target=target, config=config or {}, inputs={"pretrain": pre_key}))
    return ft_key


def write_eval(store: Store, method: str, ft: str, source: str, target: str, seed: int, *, sa: int, ra: int,
               aa: int | None, n: int = N, sweep: bool = False, flags=(), warnings=(), encoder: bool = False,
               config: dict | None = None) -> str:
    ft_key = write_chain(store, method, ft, source, target, seed, encoder=encoder, config=config)
    key = f"evaluate-{method}-{ft}-{source}-{target}-s{seed}-{digest(ft_key)}"
    metrics = {"sa": metric(sa, n, attack=None), "ra": metric(ra, n, **ra_protocol()),
               "aa": metric(aa, n, attack="autoattack", aa_version="standard", eps_255=8) if aa is not None else None,
               "sweeps": sweeps(ra * 200 // n) if sweep else None}
    store.write(Record(kind="evaluate", key=key, seed=seed, method=method, finetuner=ft, source=source,
                       target=target, config=config or {}, inputs={"finetune": ft_key}, metrics=metrics,
                       warnings=list(warnings), flags=list(flags)))
    return key


SYNTHETIC = {"synthetic": {"n_train": 64, "n_test": 80, "image_size": 16}, "data": {"val_size": 8}}
FAILED_KEY = "evaluate-acl-aff-cifar10-s0-deadbeef0000"
UNREADABLE_KEY = "finetune-rocl-aff-cifar10-s0-badbadbadbad"
SANITY = "RA (0.6000) is above SA (0.5000, 95% CI up to 0.5300): the PGD attack is broken"
TEST_SELECTION_WARNING = ("the classifier was selected on the test set (selection=test): the numbers are "
                          "optimistic and not comparable with validation-selected ones")


def build_store(root: Path, *, scale: int = 0) -> Store:
    """The reference store. `scale` shifts every count (a second folder for --compare)."""
    store = Store(root)
    for seed, (sa, ra, aa) in enumerate([(800, 500, 420), (810, 505, 425), (820, 510, 430)]):
        write_eval(store, "advcl", "slf", "cifar10", "cifar10", seed, sa=sa + scale, ra=ra + scale, aa=aa + scale,
                   sweep=True)
    write_eval(store, "acl", "slf", "cifar10", "cifar10", 0, sa=780, ra=430, aa=390, sweep=True)
    write_eval(store, "advcl", "aff", "cifar10", "cifar10", 0, sa=830, ra=520, aa=490,
               flags=["selection=test"], warnings=[TEST_SELECTION_WARNING])
    write_eval(store, "rocl", "slf", "cifar10", "cifar10", 0, sa=500, ra=600, aa=280, warnings=[SANITY])
    write_eval(store, "supervised_at", "alf", "cifar10", "cifar10", 0, sa=790, ra=470, aa=None)
    write_eval(store, "advcl", "slf", "cifar10", "stl10", 0, sa=640, ra=360, aa=260)
    for method, (sa, ra) in {"simclr": (150, 40), "advcl": (120, 70)}.items():
        write_eval(store, method, "slf", "synthetic", "synthetic", 0, sa=sa, ra=ra, aa=None, n=200,
                   encoder=True, config=SYNTHETIC, sweep=True)
    if scale == 0:
        failed = store.job_dir(FAILED_KEY)
        failed.mkdir(parents=True)
        (failed / "job.json").write_text(json.dumps({"job": {
            "kind": "evaluate", "key": FAILED_KEY, "seed": 0, "method": "acl", "finetuner": "aff",
            "source": "cifar10", "target": "cifar10", "config": {}, "deps": {}}}))
        (failed / "failure.json").write_text(json.dumps({"error": "JobFailed: the attack ran out of memory"}))
        bad = store.job_dir(UNREADABLE_KEY)
        bad.mkdir(parents=True)
        (bad / "record.json").write_text("{ not json")
    return store


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
    assert sa.value == pytest.approx(81.0) and sa.spread == pytest.approx(1.0)
    assert sa.agg.seeds == [0, 1, 2] and sa.agg.n == [N, N, N]
    lo, hi = sa.agg.ci95
    half = T_975_DF2 * 0.01 / math.sqrt(3)
    assert (lo, hi) == (pytest.approx(0.81 - half, abs=1e-6), pytest.approx(0.81 + half, abs=1e-6))
    assert sa.agg.pooled_ci95 == pytest.approx(wilson_interval(2430, 3000))
    assert sa.ref == 80.85 and sa.diff == pytest.approx(0.15)
    ra = entry(t1, "advcl", "slf", "CIFAR-10", "ra")
    aa = entry(t1, "advcl", "slf", "CIFAR-10", "aa")
    assert (ra.value, ra.spread, ra.ref, ra.diff) == (pytest.approx(50.5), pytest.approx(0.5), 50.45,
                                                     pytest.approx(0.05))
    assert (aa.value, aa.ref, aa.diff) == (pytest.approx(42.5), 42.57, pytest.approx(-0.07))
    # one seed: spread = half the Wilson interval, interval = the record's
    acl = entry(t1, "acl", "slf", "CIFAR-10", "sa")
    wl, wh = wilson_interval(780, N)
    assert acl.value == pytest.approx(78.0) and acl.spread == pytest.approx(100 * (wh - wl) / 2)
    assert acl.agg.ci95 == pytest.approx((wl, wh)) and acl.ref == 77.88 and acl.diff == pytest.approx(0.12)
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
    assert states == {FAILED_KEY: "failed", UNREADABLE_KEY: "unreadable"}
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
    assert "—" in next(l for l in md.splitlines() if l.startswith("| ACL | AFF |"))
    assert "† = model selected on the test set" in md and "‡ = sanity warnings" in md
    assert "95% CI [78.52, 83.48]" in md
    assert "### Missing: 2 job(s)" in md and f"`{FAILED_KEY}`" in md and "**unreadable**" in md
    assert "Table 2" in md and "Table 3" in md


def test_latex_is_booktabs_and_ascii(results, tmp_path):
    from bench.report import render

    tex = render("tex", results)
    tex.encode("ascii")  # no unicode left: compiles with plain pdflatex
    for word in (r"\toprule", r"\midrule", r"\bottomrule", r"\cmidrule(lr){3-5}", r"\usepackage{booktabs}"):
        assert word in tex
    assert r"$81.00 \pm 1.00^{" in tex and "(80.85; $+0.15$)" in tex and r"\dag" in tex and r"\ddag" in tex
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
    assert {r["status"] for r in rows} == {"ok", "failed", "unreadable"}
    assert len({r["method"] for r in rows if r["status"] == "ok"}) == 5


# ---------------------------------------------------------------- figures and the CLI


def _nontrivial_png(path: Path) -> None:
    import numpy as np
    from PIL import Image

    assert path.stat().st_size > 5000, path
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300 and pixels.std() > 10, path


def test_cli_writes_every_format_and_figure(store_root, tmp_path):
    from bench.cli import main

    out = tmp_path / "report"
    res = CliRunner().invoke(main, ["report", "--results", str(store_root), "--out", str(out), "--tsne-n", "60"])
    assert res.exit_code == 0, res.output
    for name in ("report.md", "report.tex", "report.csv", "report.html"):
        assert (out / name).stat().st_size > 1000, name
    figures = out / "figures"
    pngs = sorted(p.name for p in figures.glob("*.png"))
    assert pngs == sorted(["fig1_sa_vs_ra_cifar10_cifar10.png", "fig1_sa_vs_ra_cifar10_stl10.png",
                           "fig1_sa_vs_ra_synthetic_synthetic.png", "fig3_ra_sweeps_cifar10_cifar10_slf.png",
                           "fig3_ra_sweeps_synthetic_synthetic_slf.png", "fig4_tsne_synthetic_synthetic.png"])
    for png in figures.glob("*.png"):
        _nontrivial_png(png)
        pdf = png.with_suffix(".pdf")
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 3000
    md = (out / "report.md").read_text()
    assert "fig4_tsne_synthetic_synthetic.png" in md
    # the cifar10 encoders do not exist: said so, the report goes on
    assert "t-SNE" in md and "no encoder.pt" in md


def test_tsne_embeds_each_encoder(results, tmp_path):
    from bench.report.tsne import tsne_figures

    out = tsne_figures(results, tmp_path, n=40)
    assert [f.name for f in out.figures] == ["fig4_tsne_synthetic_synthetic"]
    assert sum("no encoder.pt" in n for n in out.notes) == 5  # one per method and dataset pair


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
    build_store(other, scale=-20)  # 2 points lower on every advcl/slf/cifar10 count
    ours, theirs = load_results(store_root), load_results(other)
    from bench.report.tables import build_tables

    t1 = next(t for t in build_tables(ours, theirs) if t.id == "table1")
    e = entry(t1, "advcl", "slf", "CIFAR-10", "sa")
    assert e.value == pytest.approx(81.0) and e.ref == pytest.approx(79.0) and e.ref_spread == pytest.approx(1.0)
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


def test_store_with_only_failed_jobs_says_so(tmp_path):
    from bench.errors import BenchError
    from bench.report import load_results

    d = tmp_path / "results" / "pretrain-advcl-cifar10-s0-000000000000"
    d.mkdir(parents=True)
    (d / "failure.json").write_text(json.dumps({"error": "boom"}))
    with pytest.raises(BenchError, match=r"no results in .*run `bench run` first \(jobs without a usable record: "
                                         r"1 failed\)"):
        load_results(tmp_path / "results")


def test_smoke_run_results_if_present(tmp_path):
    """Reports a finished `bench run --preset smoke` folder named by BENCH_REPORT_SMOKE_RESULTS."""
    folder = os.environ.get("BENCH_REPORT_SMOKE_RESULTS")
    if not folder or not Path(folder).is_dir():
        pytest.skip("set BENCH_REPORT_SMOKE_RESULTS to the results folder of a finished smoke run")
    from bench.report import load_results, write_report

    results = load_results(folder)
    written = write_report(results, tmp_path / "smoke", tsne_n=64)
    rows = list(csv.DictReader(io.StringIO(written.files["csv"].read_text())))
    for cell in results.cells.values():
        for r in cell.records:
            sa = r.metrics["sa"]
            row = next(x for x in rows if (x["method"], x["finetuner"], x["target"], x["metric"], x["axis"])
                       == (r.method, r.finetuner, r.target, "sa", "") and x["status"] == "ok")
            if len(cell.records) == 1:
                assert float(row["value_pct"]) == pytest.approx(100 * sa["value"], abs=1e-3)
                assert int(row["n"]) == sa["n"]
    assert written.figures
