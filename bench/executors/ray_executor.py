"""The Ray executor: one Ray task per job, on a local Ray instance or an existing cluster.

A task is submitted with `num_gpus`/`num_cpus` and receives the object references of the tasks
it depends on as arguments, so Ray starts it only after they finished (and hands it their
outcomes: a dependency that failed makes the task return "blocked" without running). A task
runs the job in a `python -m bench.worker` subprocess (Ray has already set CUDA_VISIBLE_DEVICES
to the GPUs it assigned), so every executor shares the same worker code, logs and locks. The
results folder must be shared by every node of the cluster.

GPUs per task (`task_resources`): what the job's kind needs (`Stage.resources_for`: a pretraining
a whole GPU, an evaluation 1/2, an SLF finetuning 1/4, k-means pseudo-labels none), so Ray packs
small jobs onto shared GPUs; a data-parallel kind with `--gpus-per-job N` gets N GPUs and runs N
worker processes inside its task (`bench.executors.launch`). A fractional `--gpus-per-job` (< 1)
keeps the older meaning: that share for every job.

Settings: --ray-address, --cpus-per-job, --gpus-per-job, --mem-gb, and bench.toml's
`[executors.ray]` (`address`, `cpus_per_job`, `gpus_per_job`, `mem_gb`, and for a local instance
`num_cpus`, `num_gpus`).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from typing import Any

from bench.errors import BenchError
from bench.executors.base import (BLOCKED, DONE, ELSEWHERE, FAILED, PENDING, RUNNING, Executor, Outcome,
                                  Reporter, Tracker, log_path, read_failure, read_progress)
from bench.grid import Graph
from bench.registry import EXECUTORS
from bench import files
from bench.store import JOB_FILE, Store
from bench.worker import EXIT_DONE, EXIT_ELSEWHERE, payload_for, worker_error

log = logging.getLogger(__name__)
SETTINGS = {"address": str, "cpus_per_job": (int, float), "gpus_per_job": (int, float), "mem_gb": (int, float),
            "num_cpus": int, "num_gpus": (int, float)}


def task_resources(job: Any, extra: dict[str, Any], has_gpus: bool) -> tuple[float, float, int]:
    """(num_gpus, num_cpus, processes) of the Ray task of `job` (see the module doc)."""
    from bench.stages.base import get_stage

    resources = get_stage(job.kind).resources_for(job)
    cpus = float(extra.get("cpus_per_job", 1))
    asked = extra.get("gpus_per_job")
    if asked is not None and 0 < float(asked) < 1:  # a share for every job, as before packing by kind
        return float(asked), cpus, 1
    per_job = int(asked) if asked is not None else 1
    if resources.data_parallel and per_job > 1:
        return (float(per_job) if has_gpus else 0.0), cpus * per_job, per_job
    if asked is not None and float(asked) == 0 or not has_gpus:
        return 0.0, cpus, 1
    return float(resources.gpu), cpus, 1


def run_task(payload: dict[str, Any], results: str, threads: int, *deps: dict[str, Any],
             processes: int = 1) -> dict[str, Any]:
    """Body of a Ray task: run one job in a worker subprocess (or `processes` of them, one
    data-parallel job); `deps` are the outcomes of its inputs."""
    from bench.store import Store as _Store

    key = payload["job"]["key"]
    for dep in deps:
        if dep.get("state") not in (DONE, ELSEWHERE):  # name the job that failed, not a blocked one between
            return {"key": key, "state": BLOCKED, "blocked_by": dep.get("blocked_by") or dep.get("key")}
    slot = "ray"
    try:
        import ray

        ctx = ray.get_runtime_context()
        gpus = ctx.get_accelerator_ids().get("GPU", [])
        slot = f"ray:{ctx.get_node_id()[:8]}" + (f":gpu{','.join(map(str, gpus))}" if gpus else "")
    except Exception:  # noqa: BLE001 - naming the slot is cosmetic
        pass
    store = _Store(results)
    job_file = store.job_dir(key) / JOB_FILE
    files.write_json(job_file, payload, sort_keys=True)
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
                "BENCH_WORKER_LOG_TO_STDERR": "1"})
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    started = time.time()
    command = [sys.executable, "-m", "bench.worker", "--job", str(job_file), "--results", results,
               "--slot", slot, "--threads", str(threads), "--wait-locked"]
    if processes > 1:
        from bench.executors.launch import run_group

        rc = run_group(command, env, processes, log_path(store, key))
    else:
        with open(log_path(store, key), "ab") as logfh:
            rc = subprocess.call(command, env=env, stdin=subprocess.DEVNULL, stdout=logfh, stderr=subprocess.STDOUT)
    out = {"key": key, "slot": slot, "started": started, "finished": time.time()}
    if rc == EXIT_DONE and store.has(key):
        return {**out, "state": DONE}
    if rc == EXIT_ELSEWHERE and store.has(key):
        return {**out, "state": ELSEWHERE}
    return {**out, "state": FAILED, "error": worker_error(store, key, rc)}


PROBE_TIMEOUT_S = 3.0


def probe_address(address: str) -> None:
    """Fail fast (BenchError) unless something listens at the cluster's address: `ray.init`
    retries an unreachable address for minutes. 'auto' is resolved the way Ray resolves it."""
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address_or_die
        except ImportError:  # a Ray without it: let ray.init resolve 'auto' itself
            return
        try:
            address = canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError as exc:
            raise BenchError(f"--ray-address auto: {exc} (or leave out --ray-address to start a local "
                             "Ray instance)") from None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise BenchError(f"--ray-address {address!r}: expected HOST:PORT (e.g. 10.0.0.1:6379), "
                         "ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise BenchError(f"--ray-address {address}: no Ray cluster answers at {host}:{port} ({exc}). Pass the "
                         f"address `ray start --head` printed, or leave out --ray-address to start a local "
                         f"Ray instance") from None


@EXECUTORS.register("ray")
class RayExecutor(Executor):
    """Ray tasks (num_gpus, num_cpus), dependencies passed as object references."""

    name = "ray"

    def check(self) -> None:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise BenchError("the ray executor needs ray: pip install 'bench[ray]'") from None
        for name, value in self.options.extra.items():
            if name not in SETTINGS:
                raise BenchError(f"[executors.ray]: unknown setting {name!r}; known: {', '.join(SETTINGS)}")
            if not isinstance(value, SETTINGS[name]) or isinstance(value, bool) or (name != "address" and value < 0):
                raise BenchError(f"[executors.ray]: {name} = {value!r} is not valid")
        address = self.options.ray_address or self.options.extra.get("address")
        if address:
            probe_address(address)

    def _init(self) -> bool:
        """Connect to a cluster or start a local instance; True if we started it."""
        import ray

        if ray.is_initialized():
            return False
        extra = self.options.extra
        address = self.options.ray_address or extra.get("address")
        if not address:
            ray.init(num_cpus=extra.get("num_cpus"), num_gpus=extra.get("num_gpus"), include_dashboard=False,
                     log_to_driver=False)
            return True
        try:
            ray.init(address=address, log_to_driver=False)
        except Exception as exc:  # noqa: BLE001 - Ray wraps the cause (auth, version) in several types
            cause = f"{exc} {exc.__cause__ or ''}"
            hint = (" The cluster uses token authentication: set RAY_AUTH_MODE=token, with its token in "
                    "~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN." if "AuthToken" in cause else "")
            raise BenchError(f"--ray-address {address}: cannot connect to the Ray cluster: {exc}.{hint}") from exc
        return True

    def run(self, graph: Graph, store: Store, reporter: Reporter) -> dict[str, Outcome]:
        import ray

        started_here = self._init()
        try:
            return self._run(graph, store, reporter, ray)
        finally:
            if started_here:
                ray.shutdown()

    def _run(self, graph: Graph, store: Store, reporter: Reporter, ray: Any) -> dict[str, Outcome]:
        tracker = Tracker(graph, store, reporter)
        extra = self.options.extra
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        memory: dict[str, Any] = {}
        if extra.get("mem_gb"):
            memory["memory"] = int(float(extra["mem_gb"]) * 1024**3)
        task = ray.remote(run_task)
        results = str(store.root.resolve())
        refs: dict[str, Any] = {}
        for job in graph:
            deps = [refs[d] for d in graph.deps(job.key) if d in refs]
            gpus, cpus, processes = task_resources(job, extra, has_gpus)
            threads = max(1, int(cpus) // processes)
            refs[job.key] = task.options(name=job.key[:100], num_cpus=cpus, num_gpus=gpus, **memory).remote(
                payload_for(job), results, threads, *deps, processes=processes)
        key_of = {ref: key for key, ref in refs.items()}
        order = {key: i for i, key in enumerate(graph.keys())}
        waiting = list(refs.values())
        t0 = time.time()
        last_progress = 0.0
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=0.5)
            # dependencies first, so that a failure blocks its dependents (naming itself) before
            # their "blocked" results are looked at
            for ref in sorted(done, key=lambda r: order[key_of[r]]):
                key = key_of[ref]
                try:
                    out = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - the task itself died (node lost, ...)
                    out = {"state": FAILED, "error": f"Ray task failed: {exc}"}
                state = out.get("state", FAILED)
                if state == BLOCKED:
                    if tracker.state(key) != BLOCKED:
                        tracker.set(key, BLOCKED, blocked_by=out.get("blocked_by"))
                    continue
                tracker.set(key, RUNNING if tracker.state(key) == PENDING else tracker.state(key),
                            slot=out.get("slot"), started=out.get("started"))
                if state == DONE:
                    tracker.set(key, DONE, slot=out.get("slot"), finished=out.get("finished"))
                else:
                    tracker.set(key, FAILED, slot=out.get("slot"), error=out.get("error") or read_failure(store, key))
            now = time.time()
            if now - last_progress >= 0.5:
                last_progress = now
                for key in tracker.unfinished():
                    info = read_progress(store, key)
                    if not info or info.get("state") != "running" or float(info.get("started", 0)) < t0 - 1:
                        continue
                    if tracker.state(key) == PENDING:
                        tracker.set(key, RUNNING, slot=info.get("slot"))
                    reporter.progress(key, info)
            reporter.tick()
        return tracker.outcomes

