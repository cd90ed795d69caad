"""Grid expansion: job counts, dependencies, deduplication, stable keys, bad input, dry runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from bench import grid
from bench.fingerprint import code_modules, source_digest
from bench.stages.finetune import SELECTION_EVAL
from bench.cli import main
from bench.errors import BenchError
from bench.store import Store
from helpers import TINY

KEY = re.compile(r"^[a-z_]+(-[a-z0-9_]+)+-s\d+-[0-9a-f]{12}$")


def plan(**kwargs):
    return grid.plan(fetch=False, **kwargs)[1]  # missing datasets (CIFAR-100, STL-10) are planned, not fetched


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
    assert labels.config["pseudo_labels"]["source"] == "simclr"
    assert set(labels.config) == {"pseudo_labels", "encoder", "data", "synthetic"}  # simclr's: in its dep's key
    assert set(advcl.config) == {"encoder", "data", "advcl", "synthetic"}
    ft = [j for j in by_kind(graph, "finetune") if j.target == "cifar10"][0]
    assert set(ft.config) == {"encoder", "data", "eval", ft.finetuner}  # cifar10 has no settings
    assert (ft.source, ft.target) == ("synthetic", "cifar10") and ft.deps["encoder"].startswith("pretrain-")
    ev = [j for j in by_kind(graph, "evaluate") if j.target == "synthetic"][0]
    assert set(ev.config) == {"eval", "data", "synthetic"} and graph[ev.deps["classifier"]].kind == "finetune"
    # every job knows the data it reads: generated here (synthetic), a file's sha256 for stored data
    assert advcl.data == {"synthetic/train": {"dataset": "synthetic", "split": "train", "generated": True}}
    assert list(ev.data) == ["synthetic/test"]


def test_pretrained_encoder_is_shared_by_every_finetuner_and_target():
    graph = plan(methods="acl", finetune="slf,alf,aff", datasets="synthetic,synthetic:cifar10", overrides=TINY)
    (pre,) = by_kind(graph, "pretrain")
    assert {j.deps["encoder"] for j in by_kind(graph, "finetune")} == {pre.key}
    assert len(by_kind(graph, "finetune")) == 6
    assert pre.key.startswith("pretrain-acl-synthetic-s0-")
    cross = [j for j in by_kind(graph, "finetune") if j.target == "cifar10"][0]
    assert cross.key.startswith(f"finetune-acl-{cross.finetuner}-synthetic-cifar10-s0-")


def test_keys_are_stable_and_change_exactly_with_what_determines_the_job():
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
    # the seed and the dataset are part of every key (the code: see the fingerprint tests below)
    seed1 = {(j.kind, j.method, j.finetuner): j.key for j in plan(**{**args, "seeds": "1"})}
    assert not set(seed1.values()) & set(base.values())
    cross = {(j.kind, j.method, j.finetuner): j.key for j in plan(**{**args, "datasets": "synthetic:cifar10"})}
    assert {k for k in base if base[k] != cross[k]} == {k for k in base if k[0] in ("finetune", "evaluate")}


def test_keys_hold_only_the_settings_that_change_a_jobs_output():
    args = dict(methods="simclr", finetune="slf", datasets="synthetic")
    base = {j.kind: j.key for j in plan(**args, overrides=TINY)}

    def changed(*extra):
        return {j.kind for j in plan(**args, overrides=TINY + list(extra)) if j.key != base[j.kind]}

    # operational: how the data is obtained, how often training checkpoints (resume is exact)
    assert changed("data.download=false") == set()
    assert changed("simclr.checkpoint_every=3", "slf.checkpoint_every=2") == set()
    # test-set evaluation settings are the evaluate job's alone: more AutoAttack images retrain nothing
    for setting in ("eval.aa_n=8", "eval.sweep_n=4", "eval.n=8", "eval.steps=2", "eval.restarts=2",
                    "eval.aa_version=plus"):
        assert changed(setting) == {"evaluate"}, setting
    # model selection settings: the finetune job (and so its evaluation) too, never the pretraining
    for setting in ("eval.val_n=8", "eval.selection_steps=2", "eval.eps=0.02", "eval.alpha=0.004",
                    "eval.batch_size=8", "eval.seed=1"):
        assert changed(setting) == {"finetune", "evaluate"}, setting
    # the jobs still carry the operational settings their workers act on
    offline = {j.kind: j for j in plan(**args, overrides=TINY + ["data.download=false", "simclr.checkpoint_every=3"])}
    assert all(j.config["data"]["download"] is False for j in offline.values())
    assert offline["pretrain"].config["simclr"]["checkpoint_every"] == 3
    assert set(offline["finetune"].config["eval"]) == set(SELECTION_EVAL)
    assert offline["evaluate"].config["eval"]["aa_n"] == 0


# ---------------------------------------------------------------- code fingerprints

PLUGIN = '''"""A method for the key tests, outside bench/ and methods/ like a third-party plugin."""

from dataclasses import dataclass

from bench.config import TrainConfig, param
from bench.losses import nt_xent
from bench.method import Method


class FingerprintCL(Method):
    """Version one."""

    @dataclass
    class Config(TrainConfig):
        epochs: int = param(1, min=1)

    encoder_branch = "normal"

    def build(self):
        return self.new_encoder()

    def training_step(self, x, y, index, info):
        z = self.model(x)
        return {"loss": nt_xent(z, z, 0.5)}
'''


def test_source_digest_ignores_comments_docstrings_and_formatting(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text(PLUGIN)
    digest = source_digest(path)
    path.write_text(PLUGIN.replace('"""Version one."""', '"""Version two,\n    longer."""  # a comment')
                    .replace("        z = self.model(x)", "        # a comment\n\n        z = self.model( x )")
                    .replace('"""A method for', '"""Reworded: a method for'))
    assert source_digest(path) == digest
    path.write_text(PLUGIN.replace("nt_xent(z, z, 0.5)", "nt_xent(z, z, 0.25)"))
    assert source_digest(path) != digest


def test_a_methods_code_change_reruns_its_jobs_and_their_dependents_only(tmp_path, monkeypatch):
    import importlib.util
    import sys

    from bench.registry import METHODS

    path = tmp_path / "fingerprint_plugin.py"
    path.write_text(PLUGIN)
    spec = importlib.util.spec_from_file_location("fingerprint_plugin", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "fingerprint_plugin", module)
    spec.loader.exec_module(module)
    METHODS.discover()
    monkeypatch.setitem(METHODS._entries, "fpcl", module.FingerprintCL)  # as an entry point would register it

    args = dict(methods="fpcl,simclr", finetune="slf", datasets="synthetic", overrides=TINY)

    def keys():
        return {(j.kind, j.method): j.key for j in plan(**args)}

    base = keys()
    path.write_text(PLUGIN.replace('"""Version one."""', '"""Version two."""\n    # why this method exists'))
    assert keys() == base  # a comment or docstring keeps every result
    path.write_text(PLUGIN.replace("nt_xent(z, z, 0.5)", "nt_xent(z, z, 0.25)"))
    new = keys()
    assert {k for k in base if new[k] != base[k]} == {("pretrain", "fpcl"), ("finetune", "fpcl"),
                                                      ("evaluate", "fpcl")}


def test_each_kind_fingerprints_the_code_it_imports():
    """Derived, not listed: the stage's module and its plugins', and every bench module they import."""
    from bench.registry import DATASETS, FINETUNERS, METHODS, STAGES

    def modules(kind, *plugins):
        return set(code_modules([STAGES.get(kind), *plugins]))

    synthetic = DATASETS.get("synthetic")
    pretrain = modules("pretrain", METHODS.get("advcl"), synthetic)
    training = {"bench.train.loop", "bench.train.optim", "bench.models.resnet", "bench.models.norm", "bench.augment",
                "bench.frequency", "bench.attacks.pgd", "bench.datasets", "bench.datasets.synthetic", "bench.losses",
                "bench.config", "bench.models.bn_replay"}
    assert training | {"bench.method", "bench.pretraining", "bench.stages.pretrain", "methods.advcl"} <= pretrain
    finetune = modules("finetune", FINETUNERS.get("aff"), synthetic)
    assert {"bench.finetuning", "bench.finetuners.base", "bench.finetuners.aff", "bench.attacks.accuracy",
            "bench.train.loop"} <= finetune
    evaluate = modules("evaluate", synthetic)
    assert {"bench.evaluation", "bench.attacks.autoattack", "bench.attacks.accuracy", "bench.sanity",
            "bench.models.resnet", "bench.datasets"} <= evaluate
    labels = modules("pseudo_labels", synthetic)
    assert {"bench.clusterfit", "bench.stages.pseudo_labels"} <= labels
    # only what each runs: no training loop in an evaluation, no AutoAttack in a pretraining,
    # no other method's module, nothing of the report or the runner anywhere
    assert "bench.train.loop" not in evaluate and "bench.attacks.autoattack" not in pretrain
    assert "methods.acl" not in pretrain and "bench.finetuners.slf" not in finetune
    for covered in (pretrain, finetune, evaluate, labels):
        assert not {m for m in covered if m.startswith(("bench.report", "bench.executors", "bench.commands"))}
        assert "bench.grid" not in covered and "bench.worker" not in covered
    assert "bench.datasets.torchvision_sets" in modules("evaluate", DATASETS.get("cifar10"))
    # only pretraining runs a method's code: acl, advcl, simclr (advcl's pseudo-label source) give three
    # pretrain fingerprints; every finetune, evaluate and pseudo-label job shares its kind's one
    graph = plan(methods="acl,advcl", finetune="slf", datasets="synthetic", overrides=TINY)
    prints = {grid.job_hash(j.kind, {}, {}, None, None, 0, code=code_of(j)) for j in graph}
    assert len(prints) == 3 + 3


def code_of(job):
    from bench.fingerprint import code_fingerprint
    from bench.stages.base import Cell, get_stage

    stage = get_stage(job.kind)
    cell = Cell(job.method, job.finetuner, job.source, job.target, job.seed)
    return code_fingerprint([type(stage), *stage.plugins(cell)])


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
    assert "2 pretrain, 1 pseudo_labels, 1 finetune, 1 evaluate; 0 done, 5 to run" in " ".join(text.split())
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
def test_two_methods_two_finetuners_two_targets_pretrain_exactly_twice(tmp_path, cifar_dir):
    """The real grid: 2 x 2 x 2 cells share 2 pretrained encoders (counted in the store)."""
    results = tmp_path / "results"
    args = ["--methods", "simclr,acl", "--finetune", "slf,aff", "--datasets", "synthetic,synthetic:cifar10",
            "--results", str(results), "--data-dir", str(cifar_dir), "--slots", "2", *TINY,
            "data.train_limit=64", "acl.attack_steps=1"]
    done = bench("run", *args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    store = Store(results)
    assert len(store.records("pretrain")) == 2
    assert len(store.records("finetune")) == 8 and len(store.records("evaluate")) == 8
    assert {r.inputs["encoder"] for r in store.records("finetune")} == {r.key for r in store.records("pretrain")}
    # the dry run now sees every job done; a second run does no work
    dry = bench("run", *args, "--dry-run")
    assert dry.returncode == 0 and "pending" not in dry.stdout and dry.stdout.count("done") >= 18
    again = bench("run", *args)
    assert again.returncode == 0 and "cached 18" in again.stdout
    assert len(store.records("pretrain")) == 2


# ---------------------------------------------------------------- validation sizes and the data a run reads

AUTO_VAL = [o for o in TINY if not o.startswith("data.val_size=")]  # each dataset's own validation size


def test_job_keys_and_configs_hold_each_datasets_own_validation_size():
    graph = plan(methods="simclr", finetune="slf", datasets="synthetic,synthetic:stl10", overrides=AUTO_VAL)
    sizes = {(j.kind, j.target or j.source): j.config["data"]["val_size"] for j in graph}
    assert sizes == {("pretrain", "synthetic"): 12, ("finetune", "synthetic"): 12, ("evaluate", "synthetic"): 12,
                     ("finetune", "stl10"): 500, ("evaluate", "stl10"): 500}  # synthetic: n_train / 10
    # the key is a function of the number used: asking for 12 explicitly is the same synthetic job
    explicit = plan(methods="simclr", finetune="slf", datasets="synthetic,synthetic:stl10",
                    overrides=AUTO_VAL + ["data.val_size=12"])
    same = {j.key for j in graph} & {j.key for j in explicit}
    assert same == {j.key for j in graph if j.target in ("synthetic", None)}
    assert all(j.config["data"]["val_size"] == 12 for j in explicit)  # an explicit size applies everywhere


def test_stl10_cells_of_the_paper_preset_and_the_readme_plan_with_stl10s_own_split():
    graph = plan(preset="paper", methods="acl", finetune="slf")
    cross = [j for j in graph if j.target == "stl10"]
    assert {(j.source, j.kind) for j in cross} == {(s, k) for s in ("cifar10", "cifar100")
                                                   for k in ("finetune", "evaluate")}
    assert {j.config["data"]["val_size"] for j in cross} == {500}
    assert {j.config["data"]["val_size"] for j in graph if j.kind == "pretrain"} == {5000}
    readme = plan(preset="quick", methods="advcl,acl", finetune="slf,aff", datasets="cifar10,cifar10:stl10",
                  seeds="0,1")
    assert {j.config["data"]["val_size"] for j in readme if j.target == "stl10"} == {500}


def test_the_data_a_request_reads_is_checked_before_planning(tmp_path):
    request = grid.build_request(methods="simclr", finetune="slf", datasets="cifar10",
                                 overrides=TINY + ["data.download=false"], data_dir=str(tmp_path))
    resolved = grid.validate(request)
    assert [(n, s) for n, s, *_ in grid.data_needed(request, resolved)] == [("cifar10", "train"), ("cifar10", "test")]
    with pytest.raises(BenchError, match="cifar10 train, cifar10 test are not in"):
        grid.check_data(request, resolved)


MISSING = ["--methods", "simclr", "--finetune", "slf", "--datasets", "cifar10", *TINY]


def run_missing(tmp_path, *extra):
    results, data = tmp_path / "results", tmp_path / "data"
    data.mkdir(exist_ok=True)
    result = CliRunner().invoke(main, ["run", "--results", str(results), "--data-dir", str(data), *MISSING, *extra])
    return result, " ".join(result.output.split()), results, data


def test_missing_data_with_downloads_off_exits_2_before_anything_is_written(tmp_path):
    result, text, results, data = run_missing(tmp_path, "data.download=false")
    assert result.exit_code == 2, result.output
    assert text.count("error:") == 1 and "cifar10 train, cifar10 test are not in" in text
    assert "downloads are off (data.download=false)" in text
    for fix in ("cifar10_train.npz", "bench data import cifar10 train FILE.npz", "BENCH_DATA_DIR", "--data-dir"):
        assert fix in text
    assert not results.exists() and list(data.iterdir()) == []
    results.mkdir()  # an existing results folder is left as it was
    (results / "keep.txt").write_text("x")
    assert run_missing(tmp_path, "data.download=false")[0].exit_code == 2
    assert [p.name for p in results.iterdir()] == ["keep.txt"] and list(data.iterdir()) == []
    # a dry run reports it the same way
    dry, dry_text, _, _ = run_missing(tmp_path, "data.download=false", "--dry-run")
    assert dry.exit_code == 2 and "cifar10 train, cifar10 test are not in" in dry_text


def test_dry_run_says_what_it_would_download_and_downloads_nothing(tmp_path):
    result, text, results, data = run_missing(tmp_path, "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"cifar10 train is not in {data}: the run downloads it first" in text
    assert f"cifar10 test is not in {data}" in text
    assert not results.exists() and list(data.iterdir()) == []


def _why_downloads_cannot_fail_fast() -> str | None:
    """None when a torchvision download fails at once here (no network); else why the test is skipped.

    torchvision's urlopen has no timeout of its own (bench bounds each socket operation to 30 s),
    so the test runs only where the server's name does not even resolve or the connection is refused.
    """
    import socket
    import threading
    from urllib.parse import urlparse

    from torchvision.datasets import CIFAR10

    host = urlparse(CIFAR10.url).hostname
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=3).close()
            outcome.append(f"{host} is reachable: the test would download CIFAR-10 (170 MB)")
        except socket.timeout:
            outcome.append(f"connecting to {host} times out instead of failing: a download would wait")
        except OSError:
            outcome.append(None)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(5)  # name resolution is not bounded by the socket timeout
    return outcome[0] if outcome else f"resolving {host} takes over 5 s: a download would wait"


def test_failed_download_is_bad_input_that_names_the_offline_fix(tmp_path):
    why = _why_downloads_cannot_fail_fast()
    if why:
        pytest.skip(why)
    result, text, results, data = run_missing(tmp_path, "data.download=true")
    assert result.exit_code == 2, result.output
    assert text.count("error:") == 1 and "cifar10 train, cifar10 test are not in" in text
    assert "downloading failed" in text and "offline" in text
    assert "data.download=true" not in text  # downloads were on: allowing them is not the fix
    for fix in ("bench data import cifar10 train FILE.npz", "BENCH_DATA_DIR", "--data-dir"):
        assert fix in text
    assert not results.exists() and list(data.iterdir()) == []  # no empty torchvision/ folder left
    # a data folder that did not exist is not left behind either
    absent = tmp_path / "absent"
    again = CliRunner().invoke(main, ["run", "--results", str(results), "--data-dir", str(absent), *MISSING])
    assert again.exit_code == 2 and "downloading failed" in again.output
    assert not absent.exists() and not results.exists()


def test_deacl_students_share_one_teacher_across_cells_and_runs():
    def teachers_and_students(overrides):
        graph = plan(methods="deacl", finetune="slf", datasets="cifar10,cifar10:stl10", overrides=overrides)
        jobs = by_kind(graph, "pretrain")
        return {j.key for j in jobs if j.method == "simclr"}, {j.key for j in jobs if j.method == "deacl"}

    teacher, student = teachers_and_students([])
    assert len(teacher) == len(student) == 1  # both target datasets finetune one student of one teacher
    other_teacher, other_student = teachers_and_students(["deacl.gamma=1.0"])
    assert other_teacher == teacher and other_student != student  # a student setting does not retrain it
    assert teachers_and_students(["deacl.teacher_epochs=5"])[0] != teacher
