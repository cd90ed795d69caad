"""Packing jobs by kind: each stage declares its share of a GPU, the local executor packs by it,
Ray asks for it, Slurm gets whole GPUs (or none), data-parallel kinds take N devices."""

from __future__ import annotations

import pytest

from bench import grid
from bench.executors.base import Options
from bench.executors.local import LocalExecutor, Pool, job_needs
from bench.runner import run
from bench.stages.base import get_stage
from bench.store import Store


def sleep(name: str, seconds: float, gpu: float, data_parallel: bool = False, deps=None):
    return grid.make_job("sleep", seed=0, label=name, deps=deps or {},
                         config={"sleep": {"seconds": seconds, "gpu": gpu, "data_parallel": data_parallel}})


def test_each_kind_declares_what_it_needs():
    plan = grid.plan(methods="advcl", finetune="slf,alf,aff", datasets="synthetic",
                     overrides=["encoder.width=4", "synthetic.n_train=64", "data.val_size=16"])[1]
    needs = {(job.kind, job.finetuner): get_stage(job.kind).resources_for(job) for job in plan}
    assert needs[("pretrain", None)].gpu == 1.0 and needs[("pretrain", None)].data_parallel
    assert needs[("pseudo_labels", None)].gpu == 0.0  # k-means on the CPU: no GPU slot
    assert {f: needs[("finetune", f)].gpu for f in ("slf", "alf", "aff")} == {"slf": 0.25, "alf": 0.5, "aff": 1.0}
    assert all(needs[("finetune", f)].data_parallel for f in ("slf", "alf", "aff"))
    assert needs[("evaluate", "slf")].gpu == 0.5 and not needs[("evaluate", "slf")].data_parallel


def test_the_pool_packs_shares_best_fit_and_keeps_whole_gpus_for_whole_jobs(monkeypatch):
    monkeypatch.setattr("bench.executors.local.cpu_count", lambda: 16)
    pool = Pool(["0", "1"], None)
    a, b = pool.place(0.5, 1), pool.place(0.25, 1)
    assert (a.name, b.name) == ("gpu0:0.5", "gpu0:0.25")  # the fuller GPU first: GPU 1 stays whole
    whole = pool.place(1.0, 1)
    assert whole.name == "gpu1" and whole.env["CUDA_VISIBLE_DEVICES"] == "1" and whole.threads == 8
    assert pool.place(0.5, 1) is None
    c = pool.place(0.25, 1)
    assert c.name == "gpu0:0.25" and c.threads == 2
    cpu = pool.place(0.0, 1)  # k-means: a CPU slot beside the GPUs
    assert cpu.name == "cpu0" and cpu.env["CUDA_VISIBLE_DEVICES"] == "" and pool.place(0.0, 1) is None
    for placement in (a, whole, cpu):
        pool.release(placement)
    assert pool.place(1.0, 2) is None  # GPU 0 still holds two 1/4 shares: two whole GPUs are needed
    pool.release(b)
    pool.release(c)
    pair = pool.place(1.0, 2)
    assert (pair.name, pair.env["CUDA_VISIBLE_DEVICES"], pair.processes) == ("gpu0+1", "0,1", 2)
    assert pool.never_fits(1.0, 3) and not pool.never_fits(1.0, 2)


def test_without_gpus_and_with_fixed_slots_every_job_takes_slots():
    cpu = Pool([], 2)
    one, two = cpu.place(0.25, 1), cpu.place(1.0, 1)
    assert (one.name, two.name) == ("cpu0", "cpu1") and cpu.place(0.5, 1) is None
    cpu.release(one)
    cpu.release(two)
    pair = cpu.place(1.0, 2)
    assert pair.name == "cpu0+1" and pair.processes == 2 and pair.env["CUDA_VISIBLE_DEVICES"] == ""
    fixed = Pool(["3"], 2)  # --slots 2 with a GPU: two workers on it, whatever the kinds need
    assert [fixed.place(1.0, 1).name, fixed.place(1.0, 1).name] == ["gpu3.0", "gpu3.1"]
    assert fixed.never_fits(1.0, 2)  # --gpus-per-job needs packing mode


def test_data_parallel_kinds_take_gpus_per_job_processes():
    job = sleep("pre", 1.0, 1.0, data_parallel=True)
    assert job_needs(job, 4) == (1.0, 4) and job_needs(sleep("ev", 1.0, 0.5), 4) == (0.5, 1)


def test_the_local_executor_packs_two_half_gpu_jobs_on_one_fake_gpu_and_a_whole_one_alone(tmp_path):
    g = grid.Graph()
    halves = [g.add(sleep(f"half{i}", 1.5, 0.5)) for i in range(2)]
    whole = g.add(sleep("whole", 1.5, 1.0, deps={"after": halves[0].key}))
    ex = LocalExecutor(Options(gpus=["7"], extra={"preload": []}))
    ex.check()
    result = run(g, Store(tmp_path), ex)
    assert result.counts() == {"done": 3}
    runs = {k: Store(tmp_path).read(k).provenance["run"] for k in g.keys()}
    a, b = (runs[h.key] for h in halves)
    assert a["slot"] == b["slot"] == "gpu7:0.5"
    assert a["started"] < b["finished"] and b["started"] < a["finished"], "the two halves should share the GPU"
    assert runs[whole.key]["slot"] == "gpu7" and runs[whole.key]["started"] >= max(a["finished"], b["finished"]) - 0.05


def test_ray_asks_for_each_kinds_share_and_n_gpus_for_data_parallel_kinds():
    from bench.executors.ray_executor import task_resources

    pre, ev, km = sleep("pre", 1, 1.0, True), sleep("ev", 1, 0.5), sleep("km", 1, 0.0)
    assert task_resources(ev, {}, has_gpus=True) == (0.5, 1.0, 1)
    assert task_resources(km, {}, has_gpus=True) == (0.0, 1.0, 1)
    assert task_resources(pre, {"gpus_per_job": 2, "cpus_per_job": 4}, has_gpus=True) == (2.0, 8.0, 2)
    assert task_resources(ev, {"gpus_per_job": 2}, has_gpus=True) == (0.5, 1.0, 1)
    assert task_resources(pre, {}, has_gpus=False) == (0.0, 1.0, 1)
    assert task_resources(ev, {"gpus_per_job": 0.25}, has_gpus=True) == (0.25, 1.0, 1)  # a share for all, as before


@pytest.mark.parametrize("value", ["1.5", "0.5"])
def test_a_fraction_of_a_device_per_process_is_bad_input_for_the_local_executor(tmp_path, value):
    import subprocess
    import sys

    from helpers import TINY

    out = subprocess.run([sys.executable, "-m", "bench", "run", "--methods", "simclr", "--datasets", "synthetic",
                          "--gpus", "none", "--gpus-per-job", value, "--results", str(tmp_path / "r"), *TINY],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "whole number" in out.stderr and not (tmp_path / "r").exists()
