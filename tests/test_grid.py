"""Grid expansion: job counts, dependencies, deduplication, stable keys, bad input, dry runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from bench import grid
from bench.cli import main
from bench.errors import BenchError
from bench.store import Store

TINY = ["encoder.width=4", "synthetic.n_train=128", "synthetic.n_test=32", "data.val_size=16",
        "pretrain.epochs=1", "pretrain.batch_size=16", "pretrain.steps_per_epoch=1", "pretrain.warmup_epochs=0",
        "finetune.epochs=1", "finetune.batch_size=16", "finetune.steps_per_epoch=1", "finetune.attack_steps=1",
        "eval.n=16", "eval.aa_n=0", "eval.sweep_n=0", "eval.val_n=16", "eval.batch_size=16", "eval.steps=1",
        "eval.selection_steps=1"]
KEY = re.compile(r"^[a-z_]+(-[a-z0-9_]+)+-s\d+-[0-9a-f]{12}$")


def plan(**kwargs):
    return grid.plan(**kwargs)[1]


def by_kind(graph, kind):
    return [j for j in graph if j.kind == kind]


def test_expansion_counts_dependencies_and_dedupe():
    graph = plan(methods="advcl,acl,simclr", finetune="slf,aff", datasets="synthetic,synthetic:cifar10",
                 seeds="0,1", overrides=TINY)
    # per seed: pretrain advcl, acl, simclr (simclr is both a method and advcl's pseudo-label source: once)
    assert len(by_kind(graph, "pretrain")) == 3 * 2
    assert len(by_kind(graph, "pseudo_labels")) == 1 * 2
    # per seed: 3 methods x 2 finetuners x 2 (source -> target) pairs
    assert len(by_kind(graph, "finetune")) == 3 * 2 * 2 * 2
    assert len(by_kind(graph, "evaluate")) == 3 * 2 * 2 * 2
    keys = graph.keys()
    for job in graph:
        assert KEY.match(job.key), job.key
        for dep in job.deps.values():  # topological order: dependencies come first
            assert keys.index(dep) < keys.index(job.key)
    advcl = [j for j in by_kind(graph, "pretrain") if j.method == "advcl" and j.seed == 0][0]
    labels = graph[advcl.deps["pseudo_labels"]]
    simclr = graph[labels.deps["pretrain"]]
    assert (simclr.method, simclr.source, simclr.seed) == ("simclr", "synthetic", 0)
    assert labels.config["pseudo_labels"]["source"] == "simclr" and "simclr" in labels.config
    assert set(labels.config) == {"pseudo_labels", "encoder", "data", "synthetic", "simclr"}
    assert set(advcl.config) == {"encoder", "data", "advcl", "synthetic"}
    ft = [j for j in by_kind(graph, "finetune") if j.target == "cifar10"][0]
    assert set(ft.config) == {"encoder", "data", "eval", ft.finetuner}  # cifar10 has no settings
    assert (ft.source, ft.target) == ("synthetic", "cifar10") and ft.deps["pretrain"].startswith("pretrain-")
    ev = [j for j in by_kind(graph, "evaluate") if j.target == "synthetic"][0]
    assert set(ev.config) == {"eval", "data", "synthetic"} and graph[ev.deps["finetune"]].kind == "finetune"


def test_pretrained_encoder_is_shared_by_every_finetuner_and_target():
    graph = plan(methods="acl", finetune="slf,alf,aff", datasets="synthetic,synthetic:cifar10", overrides=TINY)
    (pre,) = by_kind(graph, "pretrain")
    assert {j.deps["pretrain"] for j in by_kind(graph, "finetune")} == {pre.key}
    assert len(by_kind(graph, "finetune")) == 6
    assert pre.key.startswith("pretrain-acl-synthetic-s0-")
    cross = [j for j in by_kind(graph, "finetune") if j.target == "cifar10"][0]
    assert cross.key.startswith(f"finetune-acl-{cross.finetuner}-synthetic-cifar10-s0-")


def test_keys_are_stable_and_change_exactly_with_what_determines_the_job(monkeypatch):
    args = dict(methods="advcl,acl", finetune="slf", datasets="synthetic", overrides=TINY)
    base = {(j.kind, j.method, j.finetuner): j.key for j in plan(**args)}
    assert base == {(j.kind, j.method, j.finetuner): j.key for j in plan(**args)}  # deterministic

    def changed(**extra):
        new = {(j.kind, j.method, j.finetuner): j.key for j in plan(**{**args, **extra})}
        return {k for k in base if base[k] != new.get(k)}

    # an AdvCL setting changes AdvCL's pretrain and everything downstream of it, nothing else
    assert changed(overrides=TINY + ["advcl.epochs=2"]) == {
        ("pretrain", "advcl", None), ("finetune", "advcl", "slf"), ("evaluate", "advcl", "slf")}
    # a finetuner setting leaves every pretraining alone
    diff = changed(overrides=TINY + ["slf.epochs=2"])
    assert diff and all(kind in ("finetune", "evaluate") for kind, _, _ in diff)
    # the pseudo-label source's setting reaches AdvCL through the pseudo-label job's key
    assert ("pretrain", "advcl", None) in changed(overrides=TINY + ["simclr.epochs=2"])
    assert ("pretrain", "acl", None) not in changed(overrides=TINY + ["simclr.epochs=2"])
    # the seed, the dataset and the code version are part of every key
    seed1 = {(j.kind, j.method, j.finetuner): j.key for j in plan(**{**args, "seeds": "1"})}
    assert not set(seed1.values()) & set(base.values())
    cross = {(j.kind, j.method, j.finetuner): j.key for j in plan(**{**args, "datasets": "synthetic:cifar10"})}
    assert {k for k in base if base[k] != cross[k]} == {k for k in base if k[0] in ("finetune", "evaluate")}
    monkeypatch.setattr(grid, "CODE_VERSION", grid.CODE_VERSION + 1)
    assert not {j.key for j in plan(**args)} & set(base.values())


def test_presets_fill_the_grid_and_flags_override_them():
    graph = plan(preset="smoke", methods="acl", finetune="slf", overrides=["encoder.width=8"])
    assert {j.method for j in graph if j.method} == {"acl"}
    assert all(j.config["encoder"]["width"] == 8 for j in graph if "encoder" in j.config)


@pytest.mark.parametrize("args,message", [
    (["--methods", "advlc", "--datasets", "synthetic"], "Did you mean 'advcl'"),
    (["--methods", "acl", "--finetune", "slff", "--datasets", "synthetic"], "unknown finetuners 'slff'"),
    (["--methods", "acl", "--datasets", "synthetic:cifar11"], "unknown datasets 'cifar11'"),
    (["--methods", "acl", "--datasets", "a:b:c"], "SOURCE:TARGET"),
    (["--preset", "smok"], "Did you mean 'smoke'"),
    (["--methods", "acl", "--datasets", "synthetic", "acl.epochz=3"], "Did you mean acl.epochs"),
    (["--methods", "acl", "--datasets", "synthetic", "acl.epochs=three"], "expected an integer"),
    (["--methods", "acl", "--datasets", "synthetic", "eval.eps=2.0"], "above the maximum"),
    (["--methods", "acl", "--datasets", "synthetic", "--seeds", "x"], "not an integer"),
    (["--methods", "acl", "--datasets", "synthetic", "--executor", "dask"], "unknown executors 'dask'"),
    (["--methods", "acl", "--datasets", "synthetic", "--slots", "0"], "at least 1"),
    (["--datasets", "synthetic"], "no methods"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, args, message):
    results = tmp_path / "results"
    result = CliRunner().invoke(main, ["run", "--results", str(results), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert not results.exists()
    # an existing results folder is left exactly as it was
    results.mkdir()
    (results / "keep.txt").write_text("x")
    result = CliRunner().invoke(main, ["run", "--results", str(results), *args])
    assert result.exit_code == 2
    assert [p.name for p in results.iterdir()] == ["keep.txt"]


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    results = tmp_path / "results"
    result = CliRunner().invoke(main, ["run", "--methods", "advcl", "--finetune", "slf", "--datasets", "synthetic",
                                       "--results", str(results), "--dry-run", *TINY])
    assert result.exit_code == 0, result.output
    text = result.output
    for kind in ("pretrain", "pseudo_labels", "finetune", "evaluate"):
        assert kind in text
    assert "1 pseudo_labels, 2 pretrain, 1 finetune, 1 evaluate" in " ".join(text.split())
    assert "pending" in text and not results.exists()


def test_errors_name_the_problem_before_any_work():
    with pytest.raises(BenchError, match="no datasets"):
        grid.build_request(methods="acl")
    with pytest.raises(BenchError, match="seed -1"):
        grid.build_request(methods="acl", datasets="synthetic", seeds="-1")


def bench(*args: str, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.mark.slow
def test_two_methods_three_finetuners_two_targets_pretrain_exactly_twice(tmp_path, cifar_dir):
    """The real grid: 2 x 3 x 2 cells share 2 pretrained encoders (counted in the store)."""
    results = tmp_path / "results"
    args = ["--methods", "simclr,acl", "--finetune", "slf,alf,aff", "--datasets", "synthetic,synthetic:cifar10",
            "--results", str(results), "--data-dir", str(cifar_dir), "--slots", "2", *TINY,
            "data.train_limit=64", "acl.attack_steps=1"]
    done = bench("run", *args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    store = Store(results)
    assert len(store.records("pretrain")) == 2
    assert len(store.records("finetune")) == 12 and len(store.records("evaluate")) == 12
    assert {r.inputs["pretrain"] for r in store.records("finetune")} == {r.key for r in store.records("pretrain")}
    # the dry run now sees every job done; a second run does no work
    dry = bench("run", *args, "--dry-run")
    assert dry.returncode == 0 and "pending" not in dry.stdout and dry.stdout.count("done") >= 26
    again = bench("run", *args)
    assert again.returncode == 0 and "cached 26" in again.stdout
    assert len(store.records("pretrain")) == 2
