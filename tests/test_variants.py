"""Variants as a grid axis: --vary (a cartesian product), a preset's named variants, Table 4 row numbers as
view sets, shared jobs, content-defined keys, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from bench import grid
from bench.cli import main
from bench.config import Variant, parse_vary, split_values
from bench.errors import BenchError
from helpers import TINY
from methods.advcl import TABLE4_VIEWS


def plan(**kwargs):
    return grid.plan(fetch=False, **kwargs)


def jobs(graph, kind, method=None):
    return [j for j in graph if j.kind == kind and (method is None or j.method == method)]


def test_vary_is_the_cartesian_product_of_its_terms_in_order():
    variants = parse_vary(["advcl.pseudo_labels=none,simclr advcl.cluster_ks=10,100"])
    assert [v.label for v in variants] == ["pseudo_labels=none, cluster_ks=10", "pseudo_labels=none, cluster_ks=100",
                                          "pseudo_labels=simclr, cluster_ks=10", "pseudo_labels=simclr, cluster_ks=100"]
    assert variants[1].settings == {"advcl.pseudo_labels": "none", "advcl.cluster_ks": "100"}
    # repeated flags are the same as one flag with both terms
    assert parse_vary(["advcl.pseudo_labels=none,simclr", "advcl.cluster_ks=10,100"]) == variants
    # a key's tail is its label unless two varied keys share it
    assert [v.label for v in parse_vary(["advcl.epochs=1", "slf.epochs=2,3"])] == \
        ["advcl.epochs=1, slf.epochs=2", "advcl.epochs=1, slf.epochs=3"]
    # list values stay whole: commas inside brackets and quotes do not split
    assert split_values('[2,10,50],10,"a,b"') == ["[2,10,50]", "10", '"a,b"']
    lists = parse_vary(["advcl.cluster_ks=[2,10],[100]"])
    assert [v.settings["advcl.cluster_ks"] for v in lists] == ["[2,10]", "[100]"]
    assert parse_vary([]) == [] and parse_vary([" "]) == []


@pytest.mark.parametrize("bad, message", [
    ("advcl.views", "must look like section.key=V1,V2"),
    ("views=4,7", "must look like section.key=V1,V2"),
    ("advcl.views=4,,7", "an empty value"),
    ("advcl.views=4,4", "repeats a value"),
])
def test_bad_vary_terms_are_bench_errors(bad, message):
    with pytest.raises(BenchError, match=message):
        parse_vary([bad])
    with pytest.raises(BenchError, match="twice"):
        parse_vary(["advcl.views=4", "advcl.views=7"])


def test_a_table4_row_number_is_its_view_set():
    from bench.config import resolve

    for row, views in TABLE4_VIEWS.items():
        assert resolve({"advcl.views": str(row)}, ["advcl"])["advcl"].views == views  # from the command line
        assert resolve({"advcl.views": row}, ["advcl"])["advcl"].views == views       # from bench.toml
    assert resolve({"advcl.views": ["adv_x", "tau1"]}, ["advcl"])["advcl"].views == ("adv_x", "tau1")
    with pytest.raises(BenchError, match="unknown view"):
        plan(methods="advcl", finetune="slf", datasets="synthetic", overrides=[*TINY, "advcl.views=8"])


def test_two_variants_have_their_own_cells_and_share_what_they_can():
    """The must-show grid: advcl.views=4,7 (with SimCLR beside): both variants' cells exist with their own
    settings, they share the pseudo-label job and its SimCLR pretraining, and the keys are content-defined:
    the views=7 variant's jobs are the very jobs of a plain run with advcl.views=7."""
    request, graph, notes = plan(methods="advcl,simclr", finetune="slf,aff", datasets="synthetic", overrides=TINY,
                                 vary=["advcl.views=4,7"])
    assert [v.label for v in request.variants] == ["views=4", "views=7"] and notes == []
    pretrains = {j.variant: j for j in jobs(graph, "pretrain", "advcl")}
    assert sorted(pretrains) == ["views=4", "views=7"]
    assert pretrains["views=4"].config["advcl"]["views"] == list(TABLE4_VIEWS[4])
    assert pretrains["views=7"].config["advcl"]["views"] == list(TABLE4_VIEWS[7])
    (labels,) = jobs(graph, "pseudo_labels")  # one pseudo-label job for both view sets
    assert {p.deps["pseudo_labels"] for p in pretrains.values()} == {labels.key} and labels.variant is None
    evaluate = jobs(graph, "evaluate", "advcl")
    assert sorted((j.variant, j.finetuner) for j in evaluate) == [("views=4", "aff"), ("views=4", "slf"),
                                                                  ("views=7", "aff"), ("views=7", "slf")]
    # SimCLR (the grid's own row, also the pseudo-label source) is the same for both variants: one
    # pretraining, one cell per finetuner, no label
    assert len(jobs(graph, "pretrain", "simclr")) == 1 and len(jobs(graph, "evaluate", "simclr")) == 2
    assert all(j.variant is None for j in graph if j.method == "simclr")
    # the label is not in the key: views=7 is advcl's default, so its jobs are those of a plain run
    _, plain, _ = plan(methods="advcl,simclr", finetune="slf,aff", datasets="synthetic", overrides=TINY)
    assert {j.key for j in graph if j.variant != "views=4"} == set(plain.keys())
    assert all(j.variant is None for j in plain)


def test_variants_may_vary_finetuning_and_share_the_pretraining():
    _, graph, _ = plan(methods="acl", finetune="slf", datasets="synthetic", overrides=TINY,
                       vary=["slf.epochs=1,2"])
    (pretrain,) = jobs(graph, "pretrain")
    assert pretrain.variant is None  # shared by both variants: it belongs to neither
    assert sorted((j.variant, j.config["slf"]["epochs"]) for j in jobs(graph, "finetune")) == \
        [("epochs=1", 1), ("epochs=2", 2)]


def test_preset_table4_is_seven_view_sets_sharing_one_pseudo_label_job():
    request, graph, notes = plan(preset="table4", datasets="synthetic", overrides=TINY)
    assert [v.label for v in request.variants] == [f"row{r}" for r in range(1, 8)] and notes == []
    pretrains = jobs(graph, "pretrain", "advcl")
    assert sorted(tuple(j.config["advcl"]["views"]) for j in pretrains) == sorted(TABLE4_VIEWS.values())
    assert len(jobs(graph, "pseudo_labels")) == 1 and len(jobs(graph, "pretrain", "simclr")) == 1
    assert [j.finetuner for j in jobs(graph, "evaluate")] == ["slf"] * 7
    assert jobs(graph, "evaluate")[0].config["eval"]["aa_n"] == 0  # the preset's settings hold for every variant


def test_preset_table5_leaves_out_the_label_file_rows_with_a_note(monkeypatch, tmp_path):
    monkeypatch.delenv("BENCH_IMAGENET_SIMCLR_LABELS", raising=False)
    monkeypatch.delenv("BENCH_IMAGENET_SUPERVISED_LABELS", raising=False)
    request, graph, notes = plan(preset="table5", datasets="synthetic", overrides=TINY)
    assert [v.label for v in request.variants] == ["no_clusterfit", "cifar10_simclr_k10", "cifar10_simclr_k100",
                                                   "cifar10_simclr_ensemble"]
    assert len(notes) == 2 and "BENCH_IMAGENET_SIMCLR_LABELS" in notes[1] and "imagenet_simclr_k2" in notes[1]
    assert "left out" in notes[0] and "BENCH_IMAGENET_SUPERVISED_LABELS" in notes[0]
    no_cf = next(j for j in jobs(graph, "pretrain", "advcl") if j.variant == "no_clusterfit")
    assert no_cf.deps == {}  # w/o ClusterFit: no pseudo-label job
    assert sorted(j.config["pseudo_labels"]["ks"] for j in jobs(graph, "pseudo_labels")) == \
        [[2, 10, 50, 100, 500], [10], [100]]
    assert len(jobs(graph, "pretrain", "simclr")) == 1  # one f_pre for the three K settings
    # given a label file, its rows are in, each reading the file (its digest in the key)
    labels = tmp_path / "imagenet_simclr.npz"
    np.savez(labels, **{f"pseudo_train_{k}": np.arange(128) % k for k in (2, 10, 50, 100, 500)})
    monkeypatch.setenv("BENCH_IMAGENET_SIMCLR_LABELS", str(labels))
    request, graph, notes = plan(preset="table5", datasets="synthetic", overrides=TINY)
    assert len(request.variants) == 10 and len(notes) == 1
    files = [j for j in jobs(graph, "pseudo_labels") if j.config["pseudo_labels"]["source"] == "file"]
    assert len(files) == 6 and {j.config["pseudo_labels"]["file"] for j in files} == {str(labels)}


def test_the_cli_runs_variants_and_says_what_it_left_out(tmp_path, monkeypatch):
    monkeypatch.delenv("BENCH_IMAGENET_SIMCLR_LABELS", raising=False)
    res = CliRunner().invoke(main, ["run", "--methods", "advcl", "--finetune", "slf", "--datasets", "synthetic",
                                    "--vary", "advcl.views=4,7", "--results", str(tmp_path), "--dry-run", *TINY])
    assert res.exit_code == 0, res.output
    assert "[views=4]" in res.output and "[views=7]" in res.output  # the plan names each job's variant
    res = CliRunner().invoke(main, ["run", "--preset", "table5", "--datasets", "synthetic", "--results",
                                    str(tmp_path), "--dry-run", *TINY])
    assert res.exit_code == 0 and "BENCH_IMAGENET_SIMCLR_LABELS" in res.output


def test_bad_variants_are_bad_input_before_any_work(tmp_path):
    base = dict(methods="advcl", finetune="slf", datasets="synthetic")
    with pytest.raises(BenchError, match="set by an override and by the variants"):
        plan(**base, overrides=[*TINY, "advcl.views=3"], vary=["advcl.views=4,7"])
    with pytest.raises(BenchError, match="variants 'views=7' and 'views=.*' have the same settings"):
        plan(**base, overrides=TINY, vary=['advcl.views=7,["adv_x","tau1","tau2","x_hfc"]'])
    with pytest.raises(BenchError, match="variant 'epochs=0'.*below the minimum"):
        plan(**base, overrides=TINY, vary=["advcl.epochs=1,0"])
    with pytest.raises(BenchError, match="unknown config key advcl.view"):
        plan(**base, overrides=TINY, vary=["advcl.view=4,7"])
    res = CliRunner().invoke(main, ["run", "--methods", "advcl", "--datasets", "synthetic", "--vary", "advcl.views=4,9",
                                    "--results", str(tmp_path / "r"), *TINY])
    assert res.exit_code == 2 and "unknown view" in res.output and not (tmp_path / "r").exists()


def test_a_preset_whose_every_variant_is_left_out_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("BENCH_TEST_LABELS", raising=False)
    config = tmp_path / "bench.toml"
    config.write_text('[presets.p]\nmethods = ["advcl"]\ndatasets = ["synthetic"]\n'
                      '[presets.p.variants.a]\n"advcl.pseudo_labels" = "file:${BENCH_TEST_LABELS}"\n')
    with pytest.raises(BenchError, match="every variant was left out.*BENCH_TEST_LABELS"):
        plan(preset="p", config_path=config, overrides=TINY)
    config.write_text('[presets.p]\nmethods = ["advcl"]\ndatasets = ["synthetic"]\n[presets.p.variants]\na = 3\n')
    with pytest.raises(BenchError, match="variant 'a' must be a table of dotted settings"):
        plan(preset="p", config_path=config, overrides=TINY)
    assert Variant("x", {}) == Variant("x", {})


def test_the_documented_cpu_sized_run_plans_both_presets(tmp_path):
    """docs/running.md's CPU-sized override, as written, for table4 and table5."""
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "running.md").read_text()
    start = text.index("  bench run --preset table4 --datasets synthetic")
    lines = []
    for line in text[start:].splitlines():
        lines.append(line.rstrip("\\ "))
        if not line.endswith("\\"):
            break
    args = shlex.split(" ".join(lines))[2:]
    for preset in ("table4", "table5"):
        argv = ["run", *[preset if a == "table4" else a for a in args], "--results", str(tmp_path), "--dry-run"]
        res = CliRunner().invoke(main, argv)
        assert res.exit_code == 0, res.output
        label = "[row4]" if preset == "table4" else "[no_clusterfit]"
        assert "evaluate" in res.output and label in res.output
