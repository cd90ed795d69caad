"""The local executor: a worker process per GPU slot, or N CPU slots, on this machine.

Each job runs in a fresh `python -m bench.worker` subprocess whose environment is set before
torch is imported (CUDA_VISIBLE_DEVICES = the slot's GPU, OMP_NUM_THREADS = its share of the
cores). A job starts as soon as its dependencies are done and a slot is free (longest chain
first), not level by level.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.errors import BenchError
from bench.executors.base import (DONE, ELSEWHERE, FAILED, LOCKED, PENDING, RUNNING, Executor, Outcome,
                                  Reporter, Tracker, is_locked, log_path, read_failure,
                                  read_progress)
from bench.grid import Graph
from bench.registry import EXECUTORS
from bench.store import Store
from bench.store import PROGRESS
from bench.worker import EXIT_ELSEWHERE, EXIT_LOCKED, write_job_file, worker_error

log = logging.getLogger(__name__)


@dataclass
class Slot:
    name: str
    env: dict[str, str]
    threads: int


DEFAULT_PRELOAD = ("torch", "torch._dynamo", "bench.stages.pretrain", "bench.stages.finetune", "bench.stages.evaluate")


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def detect_gpus() -> list[str]:
    """Visible NVIDIA GPUs without importing torch: CUDA_VISIBLE_DEVICES, else the driver's list."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    driver = Path("/proc/driver/nvidia/gpus")
    if driver.is_dir():
        return [str(i) for i in range(len(list(driver.iterdir())))]
    return []


def parse_gpus(value: str | list[str] | None, check: bool = False) -> list[str] | None:
    """'0,1' -> ['0', '1']; 'none' or 'cpu' -> [] (CPU only); None -> detect. With `check`, every
    GPU named must be one this machine has (`detect_gpus`)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    items = [i.strip() for i in items if i.strip()]
    if items in (["none"], ["cpu"]):
        return []
    for item in items:
        if not item.isdigit() and not item.startswith(("GPU-", "MIG-")):
            raise BenchError(f"--gpus {value!r}: expected GPU indices like 0,1,2 (or 'none' for CPU only)")
    if check:
        present = detect_gpus()
        absent = [i for i in items if i not in present]
        if absent:
            have = ", ".join(present) if present else "none (no NVIDIA driver or CUDA_VISIBLE_DEVICES is empty)"
            raise BenchError(f"--gpus {value}: no GPU {', '.join(absent)} on this machine (GPUs here: {have}); "
                             "leave out --gpus to use the ones found, or --gpus none for CPU")
    return items


def make_slots(gpus: list[str] | None, slots: int | None) -> list[Slot]:
    if slots is not None and slots < 1:
        raise BenchError(f"--slots {slots}: must be at least 1")
    cores = cpu_count()
    gpus = detect_gpus() if gpus is None else gpus
    if gpus:
        per_gpu = slots or 1
        names = [(g, f"gpu{g}" + (f".{i}" if per_gpu > 1 else "")) for g in gpus for i in range(per_gpu)]
        threads = max(1, cores // len(names))
        return [Slot(name, {"CUDA_VISIBLE_DEVICES": g}, threads) for g, name in names]
    # Default: up to 4 CPU slots. A grid has many independent jobs, and small models gain little
    # from a second intra-op thread (it mostly spin-waits), so parallel jobs finish sooner.
    n = slots or min(cores, 4)
    threads = max(1, cores // n)
    return [Slot(f"cpu{i}", {"CUDA_VISIBLE_DEVICES": ""}, threads) for i in range(n)]


@EXECUTORS.register("local")
class LocalExecutor(Executor):
    """Worker subprocesses on this machine: one per GPU slot (--gpus), or --slots N on CPU."""

    name = "local"

    def check(self) -> None:
        for name, value in self.options.extra.items():
            if name != "preload":
                raise BenchError(f"[executors.local]: unknown setting {name!r} (known: preload); "
                                 "--partition, --time-min, --mem-gb, --cpus-per-job, --gpus-per-job are for slurm/ray")
            if not isinstance(value, (list, str)):
                raise BenchError(f"[executors.local]: preload must be a list of module names, got {value!r}")
        self.slots = make_slots(self.options.gpus, self.options.slots)

    def _env(self, slot: Slot) -> dict[str, str]:
        env = dict(os.environ)
        env.update(slot.env)
        threads = str(slot.threads)
        env.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1",
                    "BENCH_WORKER_LOG_TO_STDERR": "1"})
        return env

    def _command(self, store: Store, slot: Slot) -> list[str]:
        return [sys.executable, "-m", "bench.worker", "--results", str(store.root.resolve()), "--slot", slot.name,
                "--threads", str(slot.threads), "--parent-pid", str(os.getpid())]

    def _preload(self) -> list[str]:
        # torch._dynamo is what the first optimizer imports (seconds); the job modules pull in the rest.
        value = self.options.extra.get("preload", DEFAULT_PRELOAD)
        return [m.strip() for m in (value.split(",") if isinstance(value, str) else value) if m.strip()]

    def _spawn_standby(self, store: Store, slot: Slot) -> subprocess.Popen:
        """A worker that starts (and imports) now and gets its job when the slot frees up."""
        cmd = self._command(store, slot) + ["--standby", "--preload", ",".join(self._preload())]
        return subprocess.Popen(cmd, env=self._env(slot), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)

    def _launch(self, key: str, graph: Graph, store: Store, slot: Slot,
                standby: subprocess.Popen | None) -> subprocess.Popen:
        job = graph[key]
        job_file = write_job_file(store, job)
        store.job(key).clear_progress()
        if standby is not None and standby.poll() is None:
            try:
                standby.stdin.write(f"{job_file}\n".encode())
                standby.stdin.close()
                return standby
            except OSError:  # it died while starting: use a fresh worker
                standby.kill()
                standby.wait()
        with open(log_path(store, key), "ab") as logfh:
            return subprocess.Popen(self._command(store, slot) + ["--job", str(job_file)], env=self._env(slot),
                                    stdin=subprocess.DEVNULL, stdout=logfh, stderr=subprocess.STDOUT)

    def run(self, graph: Graph, store: Store, reporter: Reporter) -> dict[str, Outcome]:
        if not hasattr(self, "slots"):
            self.check()
        tracker = Tracker(graph, store, reporter)
        depth = graph.depth()
        order = {k: i for i, k in enumerate(graph.keys())}
        free = list(self.slots)
        running: dict[str, tuple[subprocess.Popen, Slot]] = {}
        standby: dict[str, subprocess.Popen] = {}
        locked_check: dict[str, float] = {}
        last_progress = 0.0
        try:
            while True:
                unfinished = tracker.unfinished()
                if not unfinished:
                    break
                now = time.time()
                # start ready jobs, longest chain of dependents first
                if free:
                    ready = [k for k in unfinished if tracker.state(k) == PENDING and tracker.ready(k)]
                    ready.sort(key=lambda k: (-depth[k], order[k]))
                    for key in ready:
                        if not free:
                            break
                        if store.state(key, verify=True).done:  # finished by another run meanwhile
                            tracker.set(key, ELSEWHERE)
                            continue
                        if is_locked(store, key):
                            tracker.set(key, LOCKED)
                            locked_check[key] = now + 1.0
                            continue
                        slot = free.pop(0)
                        try:
                            proc = self._launch(key, graph, store, slot, standby.pop(slot.name, None))
                        except OSError as exc:
                            free.append(slot)
                            tracker.set(key, FAILED, slot=slot.name, error=f"could not start the worker: {exc}")
                            continue
                        running[key] = (proc, slot)
                        tracker.set(key, RUNNING, slot=slot.name, started=time.time())

                # collect finished workers
                for key, (proc, slot) in list(running.items()):
                    rc = proc.poll()
                    if rc is None:
                        continue
                    del running[key]
                    free.append(slot)
                    if rc == EXIT_LOCKED:
                        tracker.outcomes[key].started = None
                        tracker.set(key, LOCKED)
                        locked_check[key] = time.time() + 1.0
                    elif rc == 0 and store.has(key):
                        tracker.set(key, DONE, slot=slot.name)
                    elif rc == EXIT_ELSEWHERE and store.has(key):
                        tracker.set(key, ELSEWHERE)
                    else:
                        tracker.set(key, FAILED, slot=slot.name, error=worker_error(store, key, rc))
                # warm up the next worker of a slot once its current job has started, i.e. its worker
                # has booted (not before: booting workers would compete for the CPU), and only as
                # many as there are jobs left for them
                waiting = len(tracker.unfinished()) - len(running) - len(standby)
                for key, (proc, slot) in running.items():
                    if waiting <= 0:
                        break
                    if slot.name not in standby and (store.job_dir(key) / PROGRESS).is_file():
                        standby[slot.name] = self._spawn_standby(store, slot)
                        waiting -= 1
                # jobs another run is working on: wait for its record, or take over if it let go
                for key, when in list(locked_check.items()):
                    if now < when:
                        continue
                    if store.has(key):
                        del locked_check[key]
                        tracker.set(key, ELSEWHERE)
                    elif not is_locked(store, key):
                        del locked_check[key]
                        tracker.set(key, PENDING)
                    else:
                        locked_check[key] = now + 1.0
                if now - last_progress >= 0.5:
                    last_progress = now
                    for key in running:
                        info = read_progress(store, key)
                        if info:
                            reporter.progress(key, info)
                reporter.tick()
                if not running and not locked_check and free:
                    stuck = [k for k in tracker.unfinished() if not tracker.ready(k)]
                    if stuck and len(stuck) == len(tracker.unfinished()):
                        for key in stuck:  # cannot happen with a well-formed graph; never spin forever
                            tracker.set(key, FAILED, error="dependencies can never be satisfied")
                time.sleep(self.options.poll_s)
        finally:
            _stop([p for p, _ in running.values()], list(standby.values()))
        return tracker.outcomes


def _stop(running: list[subprocess.Popen], standby: list[subprocess.Popen]) -> None:
    """Dismiss unused standby workers; stop workers still running (on interrupt: their last
    checkpoint stays for the next run)."""
    for proc in standby:
        try:
            proc.stdin.close()  # EOF: nothing to do, exit
        except OSError:
            pass
    for proc in running:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.time() + 10
    for proc in running + standby:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
