"""The Slurm executor against a fake Slurm (tests/fake_slurm: sbatch, sacct, scancel, srun).

The fake sbatch records every script it is given; with FAKE_SLURM_RUN=1 it also runs the job
in the background once its afterok dependencies completed, like a one-node cluster.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cloudpickle
import pytest

from bench import grid
from bench.executors.slurm import SlurmTask
from bench.store import Store
from helpers import TINY, sleep_job

FAKE = Path(__file__).resolve().parents[1] / "fake_slurm"


@pytest.fixture
def slurm(tmp_path):
    state = tmp_path / "fake-slurm-state"
    env = {**os.environ, "PATH": f"{FAKE}{os.pathsep}{os.environ.get('PATH', '')}", "FAKE_SLURM_DIR": str(state)}
    env.pop("FAKE_SLURM_RUN", None)
    return env, state


def bench(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def slurm_id(store: Store, key: str) -> str:
    return json.loads((store.job_dir(key) / "slurm_job.json").read_text())["job_id"]


def sbatch_lines(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", script, re.M))


def test_each_job_is_one_sbatch_script_with_its_resources_and_dependencies(tmp_path, slurm):
    env, state = slurm
    config = tmp_path / "cluster.toml"
    config.write_text('[executors.slurm]\naccount = "proj"\nsetup = ["module load cuda"]\n\n'
                      '[executors.slurm.evaluate]\ntime_min = 30\n')
    results = tmp_path / "results"
    args = ["run", "--executor", "slurm", "--no-wait", "--methods", "advcl", "--finetune", "slf",
            "--datasets", "synthetic", "--results", str(results), "--config", str(config), "--partition", "gpu",
            "--time-min", "120", "--mem-gb", "32", "--cpus-per-job", "6", "--gpus-per-job", "1", *TINY]
    out = bench(env, *args)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    graph = grid.plan(methods="advcl", finetune="slf", datasets="synthetic", overrides=TINY)[1]
    store = Store(results)
    ids = {job.key: slurm_id(store, job.key) for job in graph}
    assert len(set(ids.values())) == len(graph) == 5  # simclr, pseudo-labels, advcl, finetune, evaluate
    assert (state / "calls.log").read_text().split().count("sbatch") == 5
    for job in graph:
        script = (state / f"{ids[job.key]}.sh").read_text()
        flags = sbatch_lines(script)
        assert flags["job-name"] == job.key
        assert flags["partition"] == "gpu" and flags["account"] == "proj"
        assert flags["time"] == ("30" if job.kind == "evaluate" else "120")
        assert (flags["mem"], flags["cpus-per-task"]) == ("32GB", "6")
        # every kind asks for what it needs: k-means pseudo-labels run on the CPU, no GPU held
        assert flags.get("gpus-per-node") == (None if job.kind == "pseudo_labels" else "1"), job.kind
        assert flags["signal"].startswith("USR2@")  # submitit's preemption/timeout signal -> requeue
        deps = [ids[d] for d in job.deps.values()]
        if deps:
            assert flags["dependency"] == "afterok:" + ":".join(deps)
            assert flags["kill-on-invalid-dep"] == "yes"
        else:
            assert "dependency" not in flags
        assert "module load cuda" in script
        folder = store.job_dir(job.key).resolve() / "slurm"
        assert re.search(rf"srun .* -u -m submitit\.core\._submit {re.escape(str(folder))}$", script, re.M)
        # the pickled callable runs bench.worker's code on exactly this job (a pickle this test's own
        # run just wrote, not a user's file)
        with open(folder / f"{ids[job.key]}_submitted.pkl", "rb") as fh:
            delayed = cloudpickle.load(fh)
        assert isinstance(delayed.function, SlurmTask)
        assert delayed.function.payload["job"]["key"] == job.key
        assert Path(delayed.function.results) == results.resolve()
    # submitted jobs still queued are not submitted again by a second run
    again = bench(env, *args)
    assert again.returncode == 0 and (state / "calls.log").read_text().split().count("sbatch") == 5


def test_requeue_resubmits_the_same_task():
    task = SlurmTask({"job": {"key": "k"}}, "/results")
    delayed = task.checkpoint()
    assert delayed.function is task and delayed.args == ()


def test_missing_slurm_tools_are_bad_input(tmp_path):
    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}
    out = bench(env, "run", "--executor", "slurm", "--methods", "simclr", "--datasets", "synthetic",
                "--results", str(tmp_path / "r"))
    assert out.returncode == 2 and "sbatch is not on PATH" in out.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_fake_cluster_runs_the_grid_and_cancels_dependents_of_a_failure(tmp_path, slurm):
    env, state = slurm
    env["FAKE_SLURM_RUN"] = "1"
    config = tmp_path / "cluster.toml"
    config.write_text("[executors.slurm]\npoll_s = 0.5\ncpus_per_job = 2\ngpus_per_job = 0\n")
    results = tmp_path / "results"
    diverges = ["supervised_at.lr=1e30", "supervised_at.steps_per_epoch=2"]  # its second loss is NaN: it fails
    out = bench(env, "run", "--executor", "slurm", "--config", str(config), "--methods", "simclr,supervised_at",
                "--finetune", "slf", "--datasets", "synthetic", "--results", str(results), *TINY, *diverges)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    graph = grid.plan(methods="simclr,supervised_at", finetune="slf", datasets="synthetic",
                      overrides=TINY + diverges)[1]
    store = Store(results)
    for job in graph:
        assert store.has(job.key) == (job.method == "simclr"), job.key
        fake_state = (state / f"{slurm_id(store, job.key)}.state").read_text()
        if job.method == "simclr":
            assert fake_state == "COMPLETED"
        else:
            assert fake_state == ("FAILED" if job.kind == "pretrain" else "CANCELLED"), job.key
    text = " ".join((out.stdout + out.stderr).split())
    assert "1 job(s) failed" in text and "blocked" in text
    record = store.records("pretrain")[0]
    assert record.provenance["run"]["slot"].startswith("slurm:")


def test_fake_cluster_orders_jobs_and_blocks_dependents_of_a_failure(tmp_path, slurm, monkeypatch):
    """The scheduling core on the fake cluster, with the test hook's sleeping jobs (no training)."""
    from bench.executors.base import Options
    from bench.executors.slurm import SlurmExecutor
    from bench.runner import run

    env, state = slurm
    for name in ("PATH", "FAKE_SLURM_DIR"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.setenv("FAKE_SLURM_RUN", "1")

    g = grid.Graph()
    first = g.add(sleep_job("first", 0.5))
    second = g.add(sleep_job("second", 0.1, {"finetune": first.key}))
    bad = g.add(sleep_job("bad", 0.1, fail=True))
    blocked = g.add(sleep_job("blocked", 0.1, {"finetune": bad.key}))
    ex = SlurmExecutor(Options(extra={"poll_s": 0.3, "gpus_per_job": 0, "cpus_per_job": 1}))
    ex.check()
    store = Store(tmp_path / "results")
    result = run(g, store, ex)
    states = {k: o.state for k, o in result.outcomes.items()}
    assert states == {first.key: "done", second.key: "done", bad.key: "failed", blocked.key: "blocked"}
    a, b = store.read(first.key).provenance["run"], store.read(second.key).provenance["run"]
    assert a["finished"] <= b["started"]
    assert (state / f"{slurm_id(store, blocked.key)}.state").read_text() == "CANCELLED"
    assert "was told to fail" in result.outcomes[bad.key].error
    # the job Slurm never ran still has a folder that says why
    assert json.loads((store.job_dir(blocked.key) / "job.json").read_text())["job"]["key"] == blocked.key
    assert json.loads((store.job_dir(blocked.key) / "failure.json").read_text())["blocked_by"] == bad.key


def test_a_dependent_cancelled_before_its_failed_dependency_is_seen_ends_blocked(tmp_path, slurm, monkeypatch):
    """sacct reads jobs one by one: it can show a dependent CANCELLED while its dependency still
    shows RUNNING. The dependent must wait for that dependency's failure, not fail on its own."""
    import threading
    import time

    from bench.executors.base import Options
    from bench.executors.slurm import SlurmExecutor
    from bench.runner import run

    env, state = slurm
    for name in ("PATH", "FAKE_SLURM_DIR"):
        monkeypatch.setenv(name, env[name])  # submitted, never run: the test sets each job's state
    g = grid.Graph()
    dep = g.add(sleep_job("dep", 0.1))
    child = g.add(sleep_job("child", 0.1, {"finetune": dep.key}))
    store = Store(tmp_path / "results")
    ex = SlurmExecutor(Options(extra={"poll_s": 0.2, "gpus_per_job": 0, "cpus_per_job": 1}))
    ex.check()
    out = {}
    thread = threading.Thread(target=lambda: out.update(result=run(g, store, ex)))
    thread.start()
    deadline = time.time() + 60
    while not all((store.job_dir(j.key) / "slurm_job.json").exists() for j in (dep, child)):
        assert time.time() < deadline and thread.is_alive()
        time.sleep(0.05)
    (state / f"{slurm_id(store, dep.key)}.state").write_text("RUNNING")
    (state / f"{slurm_id(store, child.key)}.state").write_text("CANCELLED")

    def sacct_calls() -> int:
        return (state / "calls.log").read_text().split().count("sacct")

    seen = sacct_calls()
    while sacct_calls() < seen + 3:  # polls that see the child cancelled and its dependency running
        assert time.time() < deadline and thread.is_alive()
        time.sleep(0.05)
    (state / f"{slurm_id(store, dep.key)}.state").write_text("FAILED")
    thread.join(timeout=60)
    states = {k: o.state for k, o in out["result"].outcomes.items()}
    assert states == {dep.key: "failed", child.key: "blocked"}


@pytest.mark.parametrize("where", ["flag", "toml"])
def test_a_fraction_of_a_gpu_is_bad_input_for_slurm(tmp_path, slurm, where):
    env, state = slurm
    results = tmp_path / "results"
    args = ["run", "--executor", "slurm", "--no-wait", "--methods", "simclr", "--finetune", "slf",
            "--datasets", "synthetic", "--results", str(results), *TINY]
    if where == "flag":
        args += ["--gpus-per-job", "0.5"]
    else:
        config = tmp_path / "cluster.toml"
        config.write_text("[executors.slurm.finetune]\ngpus_per_job = 1.5\n")
        args += ["--config", str(config)]
    out = bench(env, *args)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    text = " ".join(out.stderr.split())
    assert "Slurm allocates whole GPUs" in text and "--gpus-per-job 1" in text
    assert ("gpus_per_job = 0.5" if where == "flag" else "gpus_per_job = 1.5") in text
    assert not results.exists() and not (state / "calls.log").exists()  # nothing submitted, nothing written


def test_a_whole_number_of_gpus_given_as_a_float_is_accepted(tmp_path, slurm):
    """--gpus-per-job 2: the data-parallel kinds get 2 GPUs as 2 tasks (one rank each), the evaluation one GPU."""
    env, state = slurm
    results = tmp_path / "results"
    out = bench(env, "run", "--executor", "slurm", "--no-wait", "--methods", "simclr", "--finetune", "slf",
                "--datasets", "synthetic", "--results", str(results), "--gpus-per-job", "2.0", *TINY)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    scripts = {sbatch_lines(p.read_text())["job-name"].split("-")[0]: sbatch_lines(p.read_text())
               for p in state.glob("*.sh")}
    assert sorted(scripts) == ["evaluate", "finetune", "pretrain"]
    for kind in ("pretrain", "finetune"):
        assert (scripts[kind]["gpus-per-node"], scripts[kind]["ntasks-per-node"]) == ("2", "2"), kind
        assert scripts[kind]["cpus-per-task"] == "4"  # the job's 8 CPUs shared by its 2 tasks
    assert (scripts["evaluate"]["gpus-per-node"], scripts["evaluate"]["ntasks-per-node"]) == ("1", "1")
