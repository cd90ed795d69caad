"""The local executor: parallel slots, dependency order, failures, concurrent runs, `bench show`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import grid
from bench.executors.base import is_locked
from bench.executors.local import cpu_count, make_slots, parse_gpus
from bench.store import Store
from helpers import TINY, plugin_env, sleep_job

GRID = ["--methods", "simclr", "--finetune", "slf", "--datasets", "synthetic"]


def bench(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def run_times(store: Store) -> dict[str, tuple[float, float]]:
    return {r.key: (r.provenance["run"]["started"], r.provenance["run"]["finished"]) for r in store.records()}


def test_slots_share_out_the_cores_and_gpus_get_one_worker_each(monkeypatch):
    monkeypatch.setattr("bench.executors.local.cpu_count", lambda: 16)
    cpu = make_slots([], 4)
    assert [s.name for s in cpu] == ["cpu0", "cpu1", "cpu2", "cpu3"] and {s.threads for s in cpu} == {4}
    assert all(s.env["CUDA_VISIBLE_DEVICES"] == "" for s in cpu)
    gpus = make_slots(parse_gpus("0,1,2,3"), None)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in gpus] == ["0", "1", "2", "3"] and gpus[0].threads == 4
    assert [s.name for s in make_slots(["1"], 2)] == ["gpu1.0", "gpu1.1"]
    assert parse_gpus("none") == []
    assert [(s.name, s.threads) for s in make_slots([], None)] == [(f"cpu{i}", 4) for i in range(4)]  # default
    monkeypatch.setattr("bench.executors.local.cpu_count", lambda: 2)
    assert [(s.name, s.threads) for s in make_slots([], None)] == [("cpu0", 1), ("cpu1", 1)]


@pytest.mark.slow
def test_two_slots_run_independent_jobs_in_parallel_and_respect_dependencies(tmp_path):
    results = tmp_path / "results"
    done = bench("run", *GRID, "--seeds", "0,1", "--slots", "2", "--results", str(results), *TINY)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    store = Store(results)
    times = run_times(store)
    assert len(times) == 6
    pre = sorted(r.key for r in store.records("pretrain"))
    (a0, a1), (b0, b1) = times[pre[0]], times[pre[1]]
    assert a0 < b1 and b0 < a1, "the two independent pretrainings should overlap in time"
    for record in store.records():
        for dep in record.inputs.values():
            assert times[dep][1] <= times[record.key][0], f"{record.key} started before {dep} finished"
    slots = {r.provenance["run"]["slot"] for r in store.records()}
    assert slots == {"cpu0", "cpu1"}
    for record in store.records():  # each worker got half of the cores
        log = (store.job_dir(record.key) / "log.txt").read_text()
        assert f"threads={max(1, len(os.sched_getaffinity(0)) // 2)}" in log


DIVERGES = ["supervised_at.lr=1e30", "supervised_at.steps_per_epoch=2"]


@pytest.mark.slow
def test_a_failed_cell_does_not_stop_the_others_and_exits_1_with_its_log(tmp_path):
    results = tmp_path / "results"
    # supervised AT's learning rate makes its second step's loss NaN: its pretraining fails at run
    # time (the NaN guard), the SimCLR cell is untouched
    data = str(tmp_path / "data")  # synthetic reads nothing; the jobs name the folder
    args = ["--methods", "simclr,supervised_at", "--finetune", "slf", "--datasets", "synthetic", "--slots", "2",
            "--results", str(results), "--data-dir", data, *TINY, *DIVERGES]
    failed = bench("run", *args)
    assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-3000:]
    graph = grid.plan(methods="simclr,supervised_at", finetune="slf", datasets="synthetic",
                      overrides=TINY + DIVERGES, data_dir=data)[1]
    store = Store(results)
    bad = [j for j in graph if j.kind == "pretrain" and j.method == "supervised_at"][0]
    assert not store.has(bad.key)
    blocked = [j for j in graph if j.method == "supervised_at" and j.key != bad.key]
    assert {j.kind for j in blocked} == {"finetune", "evaluate"}
    for job in graph:  # the SimCLR cell ran to the end; supervised AT's later jobs never started
        assert store.has(job.key) == (job.method == "simclr"), job.key
    for job in blocked:  # ... but their folders say why, for reports and `bench show`
        folder = store.job_dir(job.key)
        assert not (folder / "log.txt").exists()
        assert json.loads((folder / "job.json").read_text())["job"] == grid.job_to_dict(job)
        failure = json.loads((folder / "failure.json").read_text())
        assert failure["blocked_by"] == bad.key and bad.key in failure["error"] and "blocked" in failure["error"]
        assert isinstance(failure["time"], float)
    log = store.job_dir(bad.key) / "log.txt"
    output = " ".join((failed.stdout + failed.stderr).split())
    assert str(log.resolve()) in output and "1 job(s) failed" in output and "blocked" in output
    assert "NonFiniteLoss" in log.read_text()
    # `bench show` lists the failure
    show = bench("show", "--results", str(results))
    assert show.returncode == 0 and "failed" in show.stdout and "done" in show.stdout
    one = bench("show", "--results", str(results), bad.key[:20])
    assert one.returncode == 0 and "failure.json" in one.stdout
    for job in blocked:  # shown as blocked, by the failed job
        (row,) = [line for line in show.stdout.splitlines() if job.key in line]
        assert "blocked" in row, show.stdout
        one = bench("show", "--results", str(results), job.key)
        assert one.returncode == 0 and "blocked" in one.stdout.splitlines()[0]
        assert "job.json" in one.stdout and f'"blocked_by": "{bad.key}"' in one.stdout


@pytest.mark.slow
def test_two_concurrent_runs_on_one_folder_do_every_job_exactly_once(tmp_path):
    results = tmp_path / "results"
    args = ["run", *GRID, "--seeds", "0,1", "--results", str(results), *TINY]
    procs = [subprocess.Popen([sys.executable, "-m", "bench", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    store = Store(results)
    assert len(store.records()) == 6
    for record in store.records():
        log = (store.job_dir(record.key) / "log.txt").read_text()
        assert log.count(f"start {record.key}") == 1, log
        assert not is_locked(store, record.key)
    # between them the two runs did all 6 jobs; whatever one of them did not run, it saw done elsewhere
    both = outs[0][1] + outs[1][1]
    ran = re.findall(r"^\S+ +done (?!elsewhere)(\S+)", both, re.M)
    assert sorted(ran) == sorted(r.key for r in store.records()), both
    show = bench("show", "--results", str(results), store.records("evaluate")[0].key)
    assert show.returncode == 0 and '"kind": "evaluate"' in show.stdout


# ---------------------------------------------------------------- the scheduling core, with sleeping jobs

def local(slots: int):
    from bench.executors.base import Options
    from bench.executors.local import LocalExecutor

    ex = LocalExecutor(Options(gpus=[], slots=slots, extra={"preload": []}))
    ex.check()
    return ex


def fork_servers_of(results) -> list[int]:
    """PIDs of the fork servers working for the results folder `results`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--fork-server" in cmd and str(results).encode() in cmd:
            found.append(int(proc.name))
    return found


def test_a_killed_fork_server_fails_its_running_job_and_the_next_jobs_get_a_new_one(tmp_path):
    import signal
    import threading

    from bench.runner import run

    g = grid.Graph()
    long = g.add(sleep_job("long", 30.0))
    after = g.add(sleep_job("after", 0.1, {"finetune": long.key}))
    other = g.add(sleep_job("other", 0.1))
    store = Store(tmp_path)

    def kill_the_server_once_long_runs():
        deadline = time.time() + 120
        while time.time() < deadline and not (store.job_dir(long.key) / "progress.json").is_file():
            time.sleep(0.1)
        for pid in fork_servers_of(tmp_path.resolve()):
            os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_the_server_once_long_runs)
    killer.start()
    result = run(g, store, local(1))
    killer.join()
    states = {k: o.state for k, o in result.outcomes.items()}
    assert states == {long.key: "failed", after.key: "blocked", other.key: "done"}, states
    assert "code -9" in result.outcomes[long.key].error  # killed with its server, said, not lost
    again = run(g, store, local(1))  # the rerun runs what is left on a new server
    assert again.ok and store.has(long.key) and store.has(after.key), again.counts()


def test_fork_settings_are_checked():
    from bench.errors import BenchError
    from bench.executors.base import Options
    from bench.executors.local import LocalExecutor

    with pytest.raises(BenchError, match="fork must be true or false"):
        LocalExecutor(Options(gpus=[], extra={"fork": "yes"})).check()


def test_a_job_starts_when_its_own_dependencies_are_done_not_level_by_level(tmp_path):
    from bench.runner import run

    g = grid.Graph()
    slow = g.add(sleep_job("slow", 2.0))
    fast = g.add(sleep_job("fast", 0.3))
    after_fast = g.add(sleep_job("afterfast", 0.3, {"finetune": fast.key}))
    after_slow = g.add(sleep_job("afterslow", 0.3, {"finetune": slow.key}))
    store = Store(tmp_path)
    result = run(g, store, local(2))
    assert result.ok and result.counts() == {"done": 4}
    t = run_times(store)
    assert t[fast.key][1] <= t[after_fast.key][0] < t[slow.key][1]  # ran beside `slow`
    assert t[slow.key][1] <= t[after_slow.key][0]
    again = run(g, store, local(2))  # everything is done: nothing runs
    assert again.counts() == {"cached": 4}


def test_failure_blocks_only_its_dependents(tmp_path):
    from bench.errors import JobFailed
    from bench.runner import run

    g = grid.Graph()
    bad = g.add(sleep_job("bad", 0.1, fail=True))
    child = g.add(sleep_job("child", 0.1, {"finetune": bad.key}))
    grandchild = g.add(sleep_job("grandchild", 0.1, {"finetune": child.key}))
    other = g.add(sleep_job("other", 0.5))
    result = run(g, Store(tmp_path), local(1))
    states = {k: o.state for k, o in result.outcomes.items()}
    assert states == {bad.key: "failed", child.key: "blocked", grandchild.key: "blocked", other.key: "done"}
    assert result.outcomes[bad.key].log == str((tmp_path / bad.key / "log.txt").resolve())
    assert "was told to fail" in result.outcomes[bad.key].error
    assert "was told to fail" in (tmp_path / bad.key / "log.txt").read_text()
    with pytest.raises(JobFailed, match="1 job\\(s\\) failed, 2 not run") as info:
        result.raise_for_failures()
    assert info.value.exit_code == 1 and str(tmp_path / bad.key / "log.txt") in str(info.value)


def test_jobs_blocked_by_a_failure_get_its_folder_files_and_a_later_run_clears_them(tmp_path):
    from bench.runner import run

    flag = tmp_path / "fail-now"
    flag.write_text("x")
    g = grid.Graph()
    bad = g.add(sleep_job("bad", 0.1, fail_while=flag))
    child = g.add(sleep_job("child", 0.1, {"finetune": bad.key}))
    grandchild = g.add(sleep_job("grandchild", 0.1, {"finetune": child.key}))
    store = Store(tmp_path / "results")
    result = run(g, store, local(1))
    assert {k: o.state for k, o in result.outcomes.items()} == {
        bad.key: "failed", child.key: "blocked", grandchild.key: "blocked"}
    worker_failure = json.loads((store.job_dir(bad.key) / "failure.json").read_text())
    for job in (child, grandchild):
        folder = store.job_dir(job.key)
        assert json.loads((folder / "job.json").read_text()) == {"job": grid.job_to_dict(job)}
        failure = json.loads((folder / "failure.json").read_text())
        assert failure["blocked_by"] == bad.key  # the job that failed, also for the grandchild
        assert set(failure) == set(worker_failure) | {"blocked_by"} and bad.key in failure["error"]
        assert not (folder / "log.txt").exists() and not list(folder.glob(".*.tmp*"))
    show = subprocess.run([sys.executable, "-m", "bench", "show", "--results", str(store.root), grandchild.key],
                          capture_output=True, text=True, timeout=120)
    assert show.returncode == 0 and "blocked" in show.stdout.splitlines()[0] and bad.key in show.stdout
    # fixed: the rerun runs all three, and no folder says failed any more
    flag.unlink()
    again = run(g, store, local(1))
    assert again.counts() == {"done": 3}
    for job in (bad, child, grandchild):
        assert not (store.job_dir(job.key) / "failure.json").exists()
        assert (store.job_dir(job.key) / "job.json").exists()


PROBE_GRID = """
import sys
from bench import grid
from bench.executors.base import Options
from bench.executors.local import LocalExecutor
from bench.runner import run
from bench.store import Store

graph = grid.Graph()
for seed in range(6):
    graph.add(grid.make_job("probe", seed=seed, config={}))
extra = {"fork": sys.argv[2] == "fork"}
sys.exit(0 if run(graph, Store(sys.argv[1]), LocalExecutor(Options(gpus=["3", "5"], extra=extra))).ok else 1)
"""


@pytest.mark.parametrize("start", ["fork", "fresh"])
def test_each_gpu_slot_gets_its_gpu_and_a_share_of_the_threads_before_torch_is_imported(tmp_path, plugin_path, start):
    """No GPU needed: the plugin's probe stage only reports, from inside its worker, what it was started with."""
    results = tmp_path / "results"
    done = subprocess.run([sys.executable, "-c", PROBE_GRID, str(results), start], capture_output=True, text=True,
                          timeout=600, env=plugin_env(plugin_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = Store(results).records()
    assert len(records) == 6
    threads = max(1, cpu_count() // 2)  # two slots share the cores
    for record in records:
        slot, m = record.provenance["run"]["slot"], record.metrics
        gpu = {"gpu3": "3", "gpu5": "5"}[slot]
        assert m["cuda_visible_devices_at_exec"] == m["cuda_visible_devices"] == gpu, record.key
        assert m["omp_num_threads"] == str(threads) and m["torch_threads"] == threads, record.key
        assert m["forked"] == (start == "fork"), record.key  # by its device's fork server, or a fresh worker
    assert {r.provenance["run"]["slot"] for r in records} == {"gpu3", "gpu5"}
    assert len({r.provenance["run"]["pid"] for r in records}) == 6  # a process per job, either way


def test_gpus_the_machine_does_not_have_are_bad_input(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    results = tmp_path / "results"
    out = bench("run", *GRID, "--gpus", "5", "--results", str(results), *TINY)
    assert out.returncode == 2 and "no GPU 5 on this machine (GPUs here: 0)" in " ".join(out.stderr.split())
    assert not results.exists()


def test_a_job_locked_by_another_run_is_waited_for_then_taken_over(tmp_path):
    import threading

    from bench.runner import run

    g = grid.Graph()
    held = g.add(sleep_job("held", 0.2))
    taken = g.add(sleep_job("taken", 0.2))
    store = Store(tmp_path)
    with store.lock(held.key), store.lock(taken.key):  # "another run" holds both jobs
        assert is_locked(store, held.key)
        result = {}
        thread = threading.Thread(target=lambda: result.update(r=run(g, store, local(2))))
        thread.start()
        time.sleep(1.5)
        assert thread.is_alive()  # waiting, not running them and not giving up
        from bench.record import Record

        store.write(Record(kind="sleep", key=held.key, seed=0))  # the other run finishes `held`
    # ... and dies without finishing `taken` (its lock is released): this run takes over
    thread.join(timeout=60)
    outcomes = result["r"].outcomes
    assert outcomes[held.key].state == "done elsewhere" and outcomes[taken.key].state == "done"
    assert not (store.job_dir(held.key) / "log.txt").exists()  # this run never started a worker for it


def test_a_worker_that_finds_its_job_finished_elsewhere_says_so_and_runs_nothing(tmp_path):
    """Two runs racing for one job: the loser's worker may start only after the winner wrote the
    record. It must not run the job again, and must not report it as its own (exit EXIT_ELSEWHERE)."""
    from bench.worker import EXIT_DONE, EXIT_ELSEWHERE, execute, payload_for

    store = Store(tmp_path)
    job = sleep_job("once", 0.1)
    payload = payload_for(job)
    assert execute(payload, tmp_path) == EXIT_DONE
    first = store.read(job.key).provenance["run"]["started"]
    assert execute(payload, tmp_path) == EXIT_ELSEWHERE
    assert store.read(job.key).provenance["run"]["started"] == first  # the record is the first run's
    assert (store.job_dir(job.key) / "log.txt").read_text().count(f"start {job.key}") == 1
