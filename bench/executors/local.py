"""The local executor: jobs packed onto this machine's GPUs by what their kind needs, or N CPU slots.

Each job runs in a process of its own whose environment was set before torch was imported
(CUDA_VISIBLE_DEVICES = its GPU(s), OMP_NUM_THREADS = its share of the cores): a fork of its
device's fork server (`bench.executors.forkserver`, a fresh `python -m bench.worker` that has
imported torch and the job modules once), or with `[executors.local] fork = false` a fresh worker.
A job starts as soon as its dependencies are done and room for it is free (longest chain first),
not level by level.

Room (`Pool`, docs/scaling.md): on GPUs, each GPU holds jobs whose shares (`Stage.resources_for`:
a pretraining 1, an evaluation 1/2, an SLF finetuning 1/4) add up to at most 1, placed best-fit so
that whole GPUs stay free for the big jobs; jobs that need no GPU (k-means pseudo-labels) run in
`cpu_jobs` CPU slots beside them. `--slots K` with GPUs keeps the fixed K workers per GPU (no
packing). Without GPUs, `--slots N` CPU slots, one job each. A data-parallel job with
`--gpus-per-job N` takes N whole GPUs (or N CPU slots) and runs as N processes
(`bench.executors.launch`).
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
                                  Reporter, Tracker, is_locked, log_path, read_progress)
from bench.executors.forkserver import ForkedWorker, ForkServer
from bench.executors.launch import RankGroup, spawn_group
from bench.grid import Graph
from bench.registry import EXECUTORS
from bench.store import Store
from bench.worker import EXIT_ELSEWHERE, EXIT_LOCKED, write_job_file, worker_error

log = logging.getLogger(__name__)


@dataclass
class Slot:
    name: str
    env: dict[str, str]
    threads: int


@dataclass
class Placement:
    """Where one job runs: its slot name, environment, threads, processes, and what it holds."""

    name: str
    env: dict[str, str]
    threads: int
    processes: int = 1
    gpus: tuple[str, ...] = ()   # GPUs it holds a share of
    share: float = 0.0           # of each of them
    slots: tuple[int, ...] = ()  # CPU (or fixed GPU) slots it holds

    @property
    def server_key(self) -> tuple:
        return (self.env.get("CUDA_VISIBLE_DEVICES"), self.threads)


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


EPS = 1e-9


class Pool:
    """What this machine has free for jobs (see the module doc)."""

    def __init__(self, gpus: list[str], slots: int | None, cpu_jobs: int = 1):
        cores = cpu_count()
        self.gpus = list(gpus)
        self.packing = bool(self.gpus) and slots is None
        if self.packing:
            self.free = {g: 1.0 for g in self.gpus}
            self.slots = [Slot(f"cpu{i}", {"CUDA_VISIBLE_DEVICES": ""}, max(1, cores // (len(self.gpus) + cpu_jobs)))
                          for i in range(cpu_jobs)]
        else:
            self.free = {}
            self.slots = make_slots(self.gpus, slots)
        self.busy = [False] * len(self.slots)
        self.cores = cores

    def describe(self) -> str:
        if self.packing:
            return f"{len(self.gpus)} GPU(s) packed by job kind, {len(self.slots)} CPU slot(s) for CPU-only jobs"
        return f"{len(self.slots)} slot(s)"

    def never_fits(self, gpu: float, processes: int) -> str | None:
        """Why a job needing this can never be placed here (None if it can)."""
        if self.packing and gpu > 0 and processes > len(self.gpus):
            return f"it needs {processes} GPUs (--gpus-per-job) and this run has {len(self.gpus)}"
        if self.packing and gpu <= 0 and processes > len(self.slots):
            return f"it needs {processes} CPU slots and this run has {len(self.slots)} beside the GPUs (cpu_jobs)"
        if not self.packing and processes > len(self.slots):
            return f"it needs {processes} slots (--gpus-per-job) and this run has {len(self.slots)}"
        if not self.packing and self.gpus and processes > 1:
            return "--gpus-per-job with --slots on GPUs: leave out --slots to pack jobs by kind"
        return None

    def _take_slots(self, n: int) -> list[int] | None:
        free = [i for i, busy in enumerate(self.busy) if not busy]
        if len(free) < n:
            return None
        for i in free[:n]:
            self.busy[i] = True
        return free[:n]

    def place(self, gpu: float, processes: int) -> Placement | None:
        """Room for a job with this share of a GPU on this many processes, taken; None if none is free."""
        if not self.packing or gpu <= 0:
            taken = self._take_slots(processes)
            if taken is None:
                return None
            first = self.slots[taken[0]]
            if processes == 1:
                return Placement(first.name, dict(first.env), first.threads, slots=tuple(taken))
            prefix = "".join(ch for ch in first.name if not ch.isdigit() and ch != ".")
            name = prefix + "+".join(self.slots[i].name.removeprefix(prefix) for i in taken)
            gpus = [self.slots[i].env.get("CUDA_VISIBLE_DEVICES", "") for i in taken]
            env = {"CUDA_VISIBLE_DEVICES": ",".join(g for g in gpus if g)}
            return Placement(name, env, first.threads, processes, slots=tuple(taken))
        threads_per_gpu = max(1, self.cores // len(self.gpus))
        if processes > 1:
            whole = [g for g in self.gpus if self.free[g] >= 1.0 - EPS][:processes]
            if len(whole) < processes:
                return None
            for g in whole:
                self.free[g] = 0.0
            return Placement("gpu" + "+".join(whole), {"CUDA_VISIBLE_DEVICES": ",".join(whole)}, threads_per_gpu,
                             processes, tuple(whole), 1.0)
        fits = [g for g in self.gpus if self.free[g] >= gpu - EPS]
        if not fits:
            return None
        g = min(fits, key=lambda d: (self.free[d], self.gpus.index(d)))  # best fit: keep whole GPUs whole
        self.free[g] -= gpu
        name = f"gpu{g}" if gpu >= 1.0 - EPS else f"gpu{g}:{gpu:g}"
        return Placement(name, {"CUDA_VISIBLE_DEVICES": g}, max(1, int(threads_per_gpu * gpu)), 1, (g,), gpu)

    def release(self, placement: Placement) -> None:
        for i in placement.slots:
            self.busy[i] = False
        for g in placement.gpus:
            self.free[g] = min(1.0, self.free[g] + placement.share)


def job_needs(job, gpus_per_job: int) -> tuple[float, int]:
    """(share of a GPU, processes) of a job: its stage's resources, and --gpus-per-job for data-parallel kinds."""
    from bench.stages.base import get_stage

    resources = get_stage(job.kind).resources_for(job)
    processes = gpus_per_job if resources.data_parallel and gpus_per_job > 1 else 1
    return float(resources.gpu), processes


@EXECUTORS.register("local")
class LocalExecutor(Executor):
    """Worker subprocesses on this machine, packed onto its GPUs by job kind (or --slots N on CPU)."""

    name = "local"
    SETTINGS = ("preload", "fork", "gpus_per_job", "cpu_jobs")

    def check(self) -> None:
        for name, value in self.options.extra.items():
            if name not in self.SETTINGS:
                raise BenchError(f"[executors.local]: unknown setting {name!r} (known: {', '.join(self.SETTINGS)}); "
                                 "--partition, --time-min, --mem-gb, --cpus-per-job are for slurm/ray")
            if name == "preload" and not isinstance(value, (list, str)):
                raise BenchError(f"[executors.local]: preload must be a list of module names, got {value!r}")
            if name == "fork" and not isinstance(value, bool):
                raise BenchError(f"[executors.local]: fork must be true or false, got {value!r}")
            if name in ("gpus_per_job", "cpu_jobs") and (isinstance(value, bool) or not isinstance(value, (int, float))
                                                         or value != int(value) or value < 1):
                flag = "--gpus-per-job" if name == "gpus_per_job" else "cpu_jobs"
                raise BenchError(f"{flag} {value!r}: the local executor runs a job on a whole number (>= 1) of "
                                 "processes, one per device; to share a GPU between jobs, leave it out (jobs are "
                                 "packed by kind)")
        self.gpus_per_job = int(self.options.extra.get("gpus_per_job", 1))
        self.slots = make_slots(self.options.gpus, self.options.slots)  # validates --slots
        gpus = detect_gpus() if self.options.gpus is None else self.options.gpus
        self.pool = Pool(gpus, self.options.slots, int(self.options.extra.get("cpu_jobs", 1)))
        why = self.pool.never_fits(1.0, self.gpus_per_job)
        if self.gpus_per_job > 1 and why:
            raise BenchError(f"--gpus-per-job {self.gpus_per_job}: {why}")

    def _env(self, placement: Placement) -> dict[str, str]:
        env = dict(os.environ)
        env.update(placement.env)
        threads = str(placement.threads)
        env.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1",
                    "BENCH_WORKER_LOG_TO_STDERR": "1"})
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name, None)  # a job is data-parallel only when we start it so
        return env

    def _command(self, store: Store, placement: Placement) -> list[str]:
        return [sys.executable, "-m", "bench.worker", "--results", str(store.root.resolve()), "--slot",
                placement.name, "--threads", str(placement.threads), "--parent-pid", str(os.getpid())]

    def _preload(self) -> list[str]:
        # torch._dynamo is what the first optimizer imports (seconds); the job modules pull in the rest.
        value = self.options.extra.get("preload", DEFAULT_PRELOAD)
        return [m.strip() for m in (value.split(",") if isinstance(value, str) else value) if m.strip()]

    def _fork_server(self, store: Store, placement: Placement) -> ForkServer:
        cmd = self._command(store, placement) + ["--fork-server", "--preload", ",".join(self._preload())]
        return ForkServer(cmd, self._env(placement))

    def _launch(self, key: str, graph: Graph, store: Store, placement: Placement,
                servers: dict[tuple, ForkServer]) -> subprocess.Popen | RankGroup | ForkedWorker:
        job = graph[key]
        job_file = write_job_file(store, job)
        store.job(key).clear_progress()
        if placement.processes > 1:
            return spawn_group(self._command(store, placement) + ["--job", str(job_file)], self._env(placement),
                               placement.processes, log_path(store, key))
        if self.options.extra.get("fork", True):
            server = servers.get(placement.server_key)
            try:
                if server is None or not server.alive:
                    server = servers[placement.server_key] = self._fork_server(store, placement)
                return server.start(job_file, placement.name, placement.threads)
            except OSError as exc:  # the server died: this job starts a fresh worker
                log.warning("fork server for %s: %s; starting a fresh worker", placement.name, exc)
        with open(log_path(store, key), "ab") as logfh:
            return subprocess.Popen(self._command(store, placement) + ["--job", str(job_file)],
                                    env=self._env(placement), stdin=subprocess.DEVNULL, stdout=logfh,
                                    stderr=subprocess.STDOUT)

    def run(self, graph: Graph, store: Store, reporter: Reporter) -> dict[str, Outcome]:
        if not hasattr(self, "pool"):
            self.check()
        pool = self.pool
        tracker = Tracker(graph, store, reporter)
        depth = graph.depth()
        order = {k: i for i, k in enumerate(graph.keys())}
        needs = {}
        for key in graph.keys():
            needs[key] = job_needs(graph[key], self.gpus_per_job)
            why = pool.never_fits(*needs[key])
            if why:
                tracker.set(key, FAILED, error=f"cannot run here: {why}")
        running: dict[str, tuple[subprocess.Popen | RankGroup | ForkedWorker, Placement]] = {}
        servers: dict[tuple, ForkServer] = {}  # by device and threads
        locked_check: dict[str, float] = {}
        last_progress = 0.0
        try:
            while True:
                unfinished = tracker.unfinished()
                if not unfinished:
                    break
                now = time.time()
                # start ready jobs, longest chain of dependents first; a job that does not fit now
                # leaves its room to the next ones that do (smaller kinds fill a GPU's rest)
                ready = [k for k in unfinished if tracker.state(k) == PENDING and tracker.ready(k)]
                ready.sort(key=lambda k: (-depth[k], order[k]))
                for key in ready:
                    if store.state(key, verify=True).done:  # finished by another run meanwhile
                        tracker.set(key, ELSEWHERE)
                        continue
                    if is_locked(store, key):
                        tracker.set(key, LOCKED)
                        locked_check[key] = now + 1.0
                        continue
                    placement = pool.place(*needs[key])
                    if placement is None:
                        continue
                    try:
                        proc = self._launch(key, graph, store, placement, servers)
                    except OSError as exc:
                        pool.release(placement)
                        tracker.set(key, FAILED, slot=placement.name, error=f"could not start the worker: {exc}")
                        continue
                    running[key] = (proc, placement)
                    tracker.set(key, RUNNING, slot=placement.name, started=time.time())

                # collect finished workers
                for key, (proc, placement) in list(running.items()):
                    rc = proc.poll()
                    if rc is None:
                        continue
                    del running[key]
                    pool.release(placement)
                    if rc == EXIT_LOCKED:
                        tracker.outcomes[key].started = None
                        tracker.set(key, LOCKED)
                        locked_check[key] = time.time() + 1.0
                    elif rc == 0 and store.has(key):
                        tracker.set(key, DONE, slot=placement.name)
                    elif rc == EXIT_ELSEWHERE and store.has(key):
                        tracker.set(key, ELSEWHERE)
                    else:
                        tracker.set(key, FAILED, slot=placement.name, error=worker_error(store, key, rc))
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
                if not running and not locked_check:
                    stuck = [k for k in tracker.unfinished() if not tracker.ready(k)]
                    if stuck and len(stuck) == len(tracker.unfinished()):
                        for key in stuck:  # cannot happen with a well-formed graph; never spin forever
                            tracker.set(key, FAILED, error="dependencies can never be satisfied")
                time.sleep(self.options.poll_s)
        finally:
            _stop([p for p, _ in running.values()], list(servers.values()))
        return tracker.outcomes


def _stop(running: list[subprocess.Popen | RankGroup | ForkedWorker], servers: list[ForkServer]) -> None:
    """Stop workers still running (on interrupt: their last checkpoint stays for the next run), then
    the fork servers (they exit once their children have)."""
    for proc in running:
        if proc.poll() is None:
            proc.terminate()
    for server in servers:
        server.close()
    deadline = time.time() + 10
    for proc in running + [s.proc for s in servers]:
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
