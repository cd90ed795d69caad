"""The Ray executor on a real local Ray instance (2 CPUs, 2 fake GPUs) runs a small grid end to end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from bench import grid
from bench.store import Store
from helpers import TINY, sleep_job

pytest.importorskip("ray", reason="the ray executor needs ray (pip install 'bench[ray]')")

RAY_CANNOT_START = ("Failed to start", "RaySystemError", "Could not start", "raylet", "GCS")


@pytest.mark.slow
def test_local_ray_instance_runs_a_small_grid_with_gpu_requests(tmp_path):
    config = tmp_path / "ray.toml"
    # fake GPUs: Ray schedules num_gpus=1 tasks on them and sets CUDA_VISIBLE_DEVICES; torch sees none here
    config.write_text("[executors.ray]\nnum_cpus = 2\nnum_gpus = 2\ngpus_per_job = 1\ncpus_per_job = 1\n")
    results = tmp_path / "results"
    out = subprocess.run([sys.executable, "-m", "bench", "run", "--executor", "ray", "--config", str(config),
                          "--methods", "simclr", "--finetune", "slf", "--datasets", "synthetic", "--seeds", "0,1",
                          "--results", str(results), *TINY],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    if out.returncode != 0 and not list(results.glob("*/record.json")) and any(
            s in out.stderr for s in RAY_CANNOT_START):
        pytest.skip(f"a local Ray instance cannot start here: {out.stderr[-500:]}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    graph = grid.plan(methods="simclr", finetune="slf", datasets="synthetic", seeds="0,1", overrides=TINY)[1]
    store = Store(results)
    assert {r.key for r in store.records()} == set(graph.keys())
    times = {r.key: r.provenance["run"] for r in store.records()}
    for record in store.records():
        assert "gpu" in times[record.key]["slot"]  # each task held one of the fake GPUs
        for dep in record.inputs.values():  # object references ordered the tasks
            assert times[dep]["finished"] <= times[record.key]["started"]
    assert record.provenance["device"].startswith("cpu")


@pytest.mark.slow
def test_ray_orders_tasks_by_object_references_and_blocks_dependents_of_a_failure(tmp_path):
    from bench.executors.base import Options
    from bench.executors.ray_executor import RayExecutor
    from bench.runner import run

    g = grid.Graph()
    first = g.add(sleep_job("first", 0.5))
    second = g.add(sleep_job("second", 0.1, {"finetune": first.key}))
    bad = g.add(sleep_job("bad", 0.1, fail=True))
    blocked = g.add(sleep_job("blocked", 0.1, {"finetune": bad.key}))
    after = g.add(sleep_job("after", 0.1, {"finetune": blocked.key}))
    ex = RayExecutor(Options(extra={"num_cpus": 2, "num_gpus": 2, "gpus_per_job": 1}))
    ex.check()
    try:
        result = run(g, Store(tmp_path), ex)
    except Exception as exc:  # noqa: BLE001
        if any(s in str(exc) for s in RAY_CANNOT_START):
            pytest.skip(f"a local Ray instance cannot start here: {exc}")
        raise
    states = {k: o.state for k, o in result.outcomes.items()}
    assert states == {first.key: "done", second.key: "done", bad.key: "failed", blocked.key: "blocked",
                      after.key: "blocked"}
    store = Store(tmp_path)
    a, b = store.read(first.key).provenance["run"], store.read(second.key).provenance["run"]
    assert a["finished"] <= b["started"] and "gpu" in a["slot"]
    for key in (blocked.key, after.key):  # never run, but their folders name the failed job
        assert not (tmp_path / key / "log.txt").exists()
        assert json.loads((tmp_path / key / "job.json").read_text())["job"]["key"] == key
        assert json.loads((tmp_path / key / "failure.json").read_text())["blocked_by"] == bad.key
        assert result.outcomes[key].blocked_by == bad.key


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_ray_address_is_bad_input_at_once(tmp_path):
    results = tmp_path / "results"
    started = time.time()
    out = subprocess.run([sys.executable, "-m", "bench", "run", "--executor", "ray", "--ray-address",
                          f"127.0.0.1:{free_port()}", "--methods", "simclr", "--datasets", "synthetic",
                          "--results", str(results), *TINY], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "no Ray cluster answers at 127.0.0.1" in " ".join(out.stderr.split())
    assert time.time() - started < 60 and not results.exists()
    bad = subprocess.run([sys.executable, "-m", "bench", "run", "--executor", "ray", "--ray-address", "nowhere",
                          "--methods", "simclr", "--datasets", "synthetic", "--results", str(results)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "expected HOST:PORT" in bad.stderr and not results.exists()


HEAD = """
import json, sys
import ray
ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
sys.stdout.write(json.dumps({"address": ray.get_runtime_context().gcs_address}) + "\\n")
sys.stdout.flush()
sys.stdin.readline()  # keep the cluster up until the test closes stdin
ray.shutdown()
"""


@pytest.fixture
def ray_cluster(tmp_path):
    """An existing Ray cluster (head node) in a process of its own, stopped by the test alone
    (`ray stop` would kill every Ray process on the machine). Ray >= 2.5x turns token
    authentication on for clusters ray.init() starts, and a driver given an explicit address
    does not turn it on by itself: both sides get RAY_AUTH_MODE=token and this test's token."""
    import secrets

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head = subprocess.Popen([sys.executable, "-c", HEAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=open(tmp_path / "head.log", "w"), text=True, env=env, cwd=tmp_path)
    try:
        line = head.stdout.readline()
        if not line:
            pytest.skip(f"a Ray head node cannot start here: {(tmp_path / 'head.log').read_text()[-500:]}")
        yield json.loads(line)["address"], env
    finally:
        head.stdin.close()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()


@pytest.mark.slow
def test_ray_address_runs_the_grid_on_an_existing_cluster(tmp_path, ray_cluster):
    address, env = ray_cluster
    results = tmp_path / "results"
    args = [sys.executable, "-m", "bench", "run", "--executor", "ray", "--ray-address", address, "--methods",
            "simclr", "--finetune", "slf", "--datasets", "synthetic", "--results", str(results), *TINY]
    # a driver without the cluster's token: a clear error naming the fix, not a hang
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    refused = subprocess.run(args, capture_output=True, text=True, timeout=300,
                             env={**no_token, "RAY_AUTH_MODE": "disabled"})
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert "RAY_AUTH_MODE=token" in " ".join(refused.stderr.split())
    out = subprocess.run(args, capture_output=True, text=True, timeout=300,
                         env={**env})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    graph = grid.plan(methods="simclr", finetune="slf", datasets="synthetic", overrides=TINY)[1]
    store = Store(results)
    assert {r.key for r in store.records()} == set(graph.keys())
    runs = {r.key: r.provenance["run"] for r in store.records()}
    for record in store.records():
        assert runs[record.key]["slot"].startswith("ray:") and "gpu" in runs[record.key]["slot"]
        for dep in record.inputs.values():
            assert runs[dep]["finished"] <= runs[record.key]["started"]
