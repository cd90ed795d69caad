"""The executor interface and what every executor shares.

An executor gets the graph of jobs that still have to run (jobs outside it are done), the
store, and a reporter; it runs every job it can, in an order that respects the dependencies,
and returns one `Outcome` per job. A failed job blocks its dependents but nothing else.
Jobs are run through `bench.worker`, which takes the per-job lock and writes the record.
"""

from __future__ import annotations

import abc
import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench import files
from bench.grid import Graph
from bench.store import FAILURE, LOG, Store  # noqa: F401 - FAILURE: the blocked marker's file
from bench.worker import write_job_file

log = logging.getLogger(__name__)

# Job states, as shown in progress tables and summaries.
PENDING = "pending"        # waiting for its dependencies or a free slot
RUNNING = "running"
LOCKED = "locked"          # another run holds the job's lock; we wait for it
DONE = "done"              # finished by this run
CACHED = "cached"          # its record existed before this run started
ELSEWHERE = "done elsewhere"  # finished by another run while we waited
FAILED = "failed"
BLOCKED = "blocked"        # a dependency failed
SUBMITTED = "submitted"    # handed to a cluster scheduler, not watched to the end
FINAL = {DONE, CACHED, ELSEWHERE, FAILED, BLOCKED, SUBMITTED}
SUCCESS = {DONE, CACHED, ELSEWHERE, SUBMITTED}


@dataclass
class Outcome:
    state: str
    slot: str | None = None
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    log: str | None = None
    blocked_by: str | None = None


@dataclass
class Options:
    """Executor settings from the command line and bench.toml's [executors.<name>] tables."""

    gpus: list[str] | None = None        # local: one worker per entry (CUDA_VISIBLE_DEVICES)
    slots: int | None = None             # local: CPU slots, or workers per GPU
    ray_address: str | None = None
    wait: bool = True                    # slurm: watch the jobs until they end
    poll_s: float = 0.02                 # local scheduling loop period
    extra: dict[str, Any] = field(default_factory=dict)      # executor-specific ([executors.NAME] + CLI)


class Reporter(Protocol):
    def begin(self, graph: Graph, states: dict[str, str]) -> None: ...
    def update(self, key: str, state: str, slot: str | None = None, error: str | None = None) -> None: ...
    def progress(self, key: str, info: dict[str, Any]) -> None: ...
    def tick(self) -> None: ...
    def end(self, outcomes: dict[str, Outcome]) -> None: ...


class NullReporter:
    def begin(self, graph, states): pass
    def update(self, key, state, slot=None, error=None): pass
    def progress(self, key, info): pass
    def tick(self): pass
    def end(self, outcomes): pass


class Executor(abc.ABC):
    """Runs a graph of jobs; registered in bench.registry.EXECUTORS."""

    name = "executor"

    def __init__(self, options: Options | None = None):
        self.options = options or Options()

    def check(self) -> None:
        """Validate settings before any work (raise BenchError)."""

    @abc.abstractmethod
    def run(self, graph: Graph, store: Store, reporter: Reporter) -> dict[str, Outcome]:
        """Run every job of `graph`; dependencies outside it are already done."""


# ---------------------------------------------------------------- helpers shared by executors


def is_locked(store: Store, key: str) -> bool:
    """Whether another process holds the job's lock; creates nothing."""
    return store.job(key).locked()


def log_path(store: Store, key: str) -> Path:
    return store.job_dir(key) / LOG


def read_progress(store: Store, key: str) -> dict[str, Any] | None:
    return store.job(key).progress()


def read_failure(store: Store, key: str) -> str | None:
    return store.job(key).failure()


def write_blocked(store: Store, job: Any, blocked_by: str) -> None:
    """Leave a blocked job's folder as a failed worker would: its job.json, and a failure.json
    (the worker's format plus `blocked_by`) naming the failed job, so reports and `bench show`
    see the cell. The worker deletes failure.json when the job next starts."""
    if store.has(job.key) or is_locked(store, job.key):
        return  # done or being worked on elsewhere: not ours to mark
    write_job_file(store, job)
    failure = {"error": f"blocked: it needs {blocked_by}, which failed", "time": time.time(),
               "host": socket.gethostname(), "slot": None, "blocked_by": blocked_by}
    files.write_json(store.job_dir(job.key) / FAILURE, failure)


class Tracker:
    """Book-keeping shared by executors: states, blocking of dependents, outcomes.

    """

    def __init__(self, graph: Graph, store: Store, reporter: Reporter):
        self.graph, self.store, self.reporter = graph, store, reporter
        self.children = graph.dependents()
        self.outcomes: dict[str, Outcome] = {k: Outcome(PENDING) for k in graph.keys()}

    def state(self, key: str) -> str:
        return self.outcomes[key].state

    def unfinished(self) -> list[str]:
        return [k for k, o in self.outcomes.items() if o.state not in FINAL]

    def ready(self, key: str) -> bool:
        """All dependencies done (those outside the graph were done before the run)."""
        for dep in self.graph.deps(key):
            if dep in self.outcomes:
                if self.outcomes[dep].state not in SUCCESS:
                    return False
            elif not self.store.has(dep):
                return False
        return True

    def set(self, key: str, state: str, **info: Any) -> None:
        out = self.outcomes[key]
        out.state = state
        for name, value in info.items():
            setattr(out, name, value)
        if state == RUNNING and out.started is None:
            out.started = time.time()
        if state in FINAL and out.finished is None:
            out.finished = time.time()
        if state == FAILED:
            out.log = str(log_path(self.store, key).resolve())
            out.error = out.error or read_failure(self.store, key)
        if state == BLOCKED and out.blocked_by:
            job = self.graph[key]
            try:
                write_blocked(self.store, job, out.blocked_by)
            except OSError as exc:  # the run goes on; only the report loses the cell
                log.warning("could not mark %s as blocked: %s", key, exc)
        self.reporter.update(key, state, slot=out.slot, error=out.error)
        if state == FAILED:
            for child in self.graph.descendants(key):
                if self.outcomes[child].state not in FINAL:
                    self.outcomes[child].blocked_by = key
                    self.set(child, BLOCKED)
