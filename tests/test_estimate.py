"""What a run will cost before it starts (bench.estimate): counts from the jobs' settings, measured unit
costs cached per device, the schedule of the local executor, the dry run's table (with the one-GPU total
from profiles copied from a GPU machine), and an estimate against the measured time of a small real run."""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

from bench import estimate, grid
from bench.cli import main
from bench.store import Store
from helpers import sleep_job

TINY_RUN = ["--methods", "simclr", "--finetune", "slf", "--datasets", "synthetic", "encoder.width=8",
            "synthetic.n_train=1024", "synthetic.n_test=64", "pretrain.epochs=2", "pretrain.batch_size=32",
            "pretrain.steps_per_epoch=30", "pretrain.warmup_epochs=0", "finetune.epochs=2", "finetune.batch_size=32",
            "finetune.steps_per_epoch=30", "eval.n=64", "eval.val_n=32", "eval.aa_n=0", "eval.sweep_n=32",
            "eval.sweep_eps=[8]", "eval.sweep_steps=[5]", "eval.steps=10", "eval.selection_steps=2",
            "eval.batch_size=64"]


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    """A fresh profile cache (XDG_CACHE_HOME) for the test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_schedule_is_the_local_executors():
    a, b = sleep_job("a", 0), sleep_job("b", 0)
    c = sleep_job("c", 0, deps={"x": a.key})
    graph = grid.Graph()
    for job in (a, b, c):
        graph.add(job)
    durations = {a.key: 10.0, b.key: 4.0, c.key: 5.0}
    assert estimate.simulate(graph, durations, 1) == 19.0
    assert estimate.simulate(graph, durations, 2) == 15.0  # a then c on one slot, b beside them
    assert estimate.simulate(graph, durations, 8) == 15.0  # c waits for a whatever the slots


def test_a_finetune_and_an_evaluate_job_count_their_passes(cache_home):
    _, graph, _ = grid.plan(methods="simclr", finetune="alf", datasets="synthetic", fetch=False,
                            overrides=["encoder.width=8", "synthetic.n_train=1000", "synthetic.n_test=500",
                                       "alf.epochs=2", "alf.batch_size=50", "alf.attack_steps=3", "eval.n=200",
                                       "eval.steps=20", "eval.val_n=40", "eval.selection_steps=5", "eval.aa_n=0",
                                       "eval.sweep_n=0"])
    device = estimate.Device("cpu: test", "cpu", threads=1, slots=1)
    cache = estimate.ProfileCache(shipped=False)
    costs = estimate.Costs(device, cache, measure=False)
    # unit costs as a measurement would store them: seconds per image of each pass, the worker's start
    for key, value in _measured(costs, width=8, image_size=32).items():
        cache.entries.setdefault(device.name, {})[key] = value
    got = estimate.estimate_graph(graph, costs)
    ft = next(e for e in got.jobs.values() if e.kind == "finetune")
    ev = next(e for e in got.jobs.values() if e.kind == "evaluate")
    # ALF: 2 epochs x 18 steps (900 training images) x 50 images x (forward + 3 attack steps); selection each
    # epoch on 40 images: 2 forwards + 5 attack steps
    assert ft.seconds == pytest.approx(2.0 + 2 * 18 * 50 * (1e-3 + 3 * 3e-3) + 2 * 40 * (2 * 1e-3 + 5 * 3e-3))
    assert ev.seconds == pytest.approx(2.0 + 200 * (2 * 1e-3 + 20 * 3e-3))
    pre = next(e for e in got.jobs.values() if e.kind == "pretrain")
    assert pre.seconds is None and "simclr step" in got.missing  # not measured, not guessed
    assert got.wall_s(graph) is None and "unknown" in got.summary(graph)


def _measured(costs: estimate.Costs, *, width: int, image_size: int) -> dict:
    import sys

    import torch

    passes = estimate._key("passes", arch="resnet18", width=width, image_size=image_size,
                           batch=estimate.CPU_PROFILE_BATCH, threads=1)
    startup = estimate._key("startup", python=sys.version.split()[0], torch=torch.__version__, threads=1)
    return {passes: {"forward": 1e-3, "attack": 3e-3, "train": 4e-3, "batch_size": 32},
            startup: {"seconds": 2.0}}


def test_measurements_are_cached_per_device(cache_home):
    device = estimate.Device("cpu: test", "cpu", threads=1, slots=1)
    costs = estimate.Costs(device, estimate.ProfileCache(shipped=False))
    measured = []
    costs.on_measure = measured.append
    first = costs.passes({"width": 2, "arch": "resnet18"}, 16)
    again = estimate.Costs(device, estimate.ProfileCache(shipped=False), on_measure=measured.append)
    assert again.passes({"width": 2, "arch": "resnet18"}, 16) == first and len(measured) == 1
    data = json.loads((cache_home / "bench" / "profiles.json").read_text())
    assert data["format"] == estimate.CACHE_FORMAT and list(data["devices"]) == ["cpu: test"]
    other = estimate.Costs(estimate.Device("cpu: elsewhere", "cpu"), estimate.ProfileCache(shipped=False),
                           measure=False)
    assert other.passes({"width": 2, "arch": "resnet18"}, 16) is None  # another device: not these figures


class _AnyKey(estimate.ProfileCache):
    """A cache that answers every lookup with a fixed unit cost and keeps the keys asked for: the entries a
    GPU machine's dry run would have written (the values are test inputs, not measurements)."""

    VALUES = {"startup": {"seconds": 2.0}, "step": {"seconds_per_step": 0.08, "batch_size": 512},
              "passes": {"forward": 0.01, "attack": 0.03, "train": 0.04, "batch_size": 256}}

    def __init__(self):
        super().__init__(shipped=False)
        self.asked: dict[str, dict] = {}

    def get(self, device, key):
        return self.asked.setdefault(key, self.VALUES[key.split(":")[0]])


def test_dry_run_of_quick_prints_per_job_and_total_estimates(cache_home, tmp_path):
    res = CliRunner().invoke(main, ["run", "--preset", "quick", "--dry-run", "--gpus", "none", "--results",
                                    str(tmp_path / "results"), "encoder.width=4"])
    assert res.exit_code == 0, res.output[-3000:]
    out = res.output
    assert "estimate" in out and "counted" in out
    assert "measuring a advcl training step" in out and "measuring the start of a worker process" in out
    assert "estimated time here:" in out and "of work)" in out
    assert "on one GPU:" in out and "unknown: no GPU step profile has been measured" in out
    assert not (tmp_path / "results").exists()  # a dry run writes nothing
    # every job has a figure: `<number> s|min|h` in its row
    _, graph, _ = grid.plan(preset="quick", overrides=["encoder.width=4"], fetch=False)
    costs = estimate.Costs(estimate.local_device([], None), measure=False)
    got = estimate.estimate_graph(graph, costs)
    assert all(e.seconds is not None and e.seconds > 0 for e in got.jobs.values()), got.missing
    assert {e.kind for e in got.jobs.values()} == {"pretrain", "pseudo_labels", "finetune", "evaluate"}
    again = CliRunner().invoke(main, ["run", "--preset", "quick", "--dry-run", "--gpus", "none", "encoder.width=4",
                                      "--results", str(tmp_path / "results")])
    assert "measuring" not in again.output  # cached
    # a GPU machine's profiles, copied into this cache, give the one-GPU total
    gpu = estimate.Device("cuda: NVIDIA Test GPU", "cuda", 1, 1)
    recorder = _AnyKey()
    there = estimate.estimate_graph(graph, estimate.Costs(gpu, recorder, measure=False))
    assert there.wall_s(graph) > 0 and not there.missing
    cache = estimate.ProfileCache()
    cache.entries[gpu.name] = recorder.asked
    (cache_home / "bench" / "profiles.json").write_text(json.dumps({"format": estimate.CACHE_FORMAT,
                                                                   "devices": cache.entries}))
    third = CliRunner().invoke(main, ["run", "--preset", "quick", "--dry-run", "--gpus", "none", "encoder.width=4",
                                      "--results", str(tmp_path / "results")])
    line = next(l for l in third.output.splitlines() if l.startswith("on one GPU"))
    assert line.startswith(f"on one GPU (profiles measured on {gpu.name}): "), line
    assert there.summary(graph) in " ".join(third.output.split())


def test_an_estimate_is_within_a_factor_of_two_of_a_real_run(cache_home, tmp_path):
    results = tmp_path / "results"
    _, graph, _ = grid.plan(**_run_kwargs(), fetch=False)
    device = estimate.local_device([], 1)
    guess = estimate.estimate_graph(graph, estimate.Costs(device))
    predicted = guess.wall_s(graph)
    started = time.perf_counter()
    res = CliRunner().invoke(main, ["run", "--slots", "1", "--gpus", "none", "--results", str(results), *TINY_RUN])
    took = time.perf_counter() - started
    assert res.exit_code == 0, res.output[-3000:]
    assert len(Store(results).records()) == len(graph) == 3
    assert predicted / 2 <= took <= predicted * 2, (predicted, took, {e.kind: e.seconds for e in guess.jobs.values()})


def _run_kwargs() -> dict:
    flags = dict(zip(TINY_RUN[0:6:2], TINY_RUN[1:6:2]))
    return {"methods": flags["--methods"], "finetune": flags["--finetune"], "datasets": flags["--datasets"],
            "overrides": TINY_RUN[6:]}


def test_bench_list_shows_the_presets_with_their_descriptions(cache_home):
    res = CliRunner().invoke(main, ["list", "presets"])
    assert res.exit_code == 0, res.output
    assert "smoke" in res.output and "cpu" in res.output and "paper" in res.output
    assert "every paper method and finetuner" in res.output
    assert "not measured yet" in res.output  # a fresh cache: no figure without a measurement
