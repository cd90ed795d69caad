"""A stage: one kind of job, as a registered plugin (like a method).

A stage says which data it reads, which artifact files it writes, how a job of its kind is
planned (`plan`: its config sections and the jobs it depends on), how it runs (`run`: job ->
Record), and how a downstream job gets its artifact (`load`). The grid, the worker, the runner,
`bench show` and `bench report` know stages only through this interface, so a new kind of job
is one file: `@STAGES.register("knn") class KNN(Stage): ...` in `bench/stages/`, or in a
package of your own with an entry point in the group `bench.stages` (docs/stages.md).

Planning goes through a planner the grid passes in (`bench.grid.Planner`): `planner.sections`
and `planner.data` give resolved config sections, `planner.need(stage, params, cell)` plans a
job this one depends on, `planner.add(self, cell, config=..., deps=...)` makes the job and its
content-defined key. A stage module imports only what its run needs, so the code fingerprint of
its jobs (`bench.fingerprint`) covers exactly that.
"""

from __future__ import annotations

import abc
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bench import files
from bench.errors import BenchError
from bench.jobs import Job
from bench.record import Record, provenance
from bench.registry import STAGES
from bench.store import JobDir, Store

Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Cell:
    """The grid coordinates a job is planned for."""

    method: str | None = None
    finetuner: str | None = None
    source: str | None = None
    target: str | None = None
    seed: int = 0
    variant: str | None = None

    def replace(self, **changes: Any) -> "Cell":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Resources:
    """What one job of a stage occupies (the executors pack jobs by it, docs/scaling.md).

    `gpu`: the share of one GPU it needs, in (0, 1]; 0 = it runs on the CPU and takes no GPU slot.
    `data_parallel`: it trains with `bench.train.fit`, so `--gpus-per-job N` runs it on N
    processes, one per device (each then takes a whole GPU); other jobs always run on one.
    """

    gpu: float = 1.0
    data_parallel: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.gpu <= 1.0:
            raise ValueError(f"Resources.gpu must be in [0, 1] (a share of one GPU), got {self.gpu}")


class Stage(abc.ABC):
    """Base class of a job kind. Subclasses set the class attributes and implement `plan` and `run`."""

    reads: tuple[tuple[str, str], ...] = ()  # ("source" | "target", "train" | "test") for each split it reads
    artifacts: tuple[str, ...] = ()       # files it writes (a job is done only when they are intact)
    provides: str | None = None           # what `load` returns: "encoder", "classifier", ...
    attach: str | None = None             # a request-level stage: one job per "encoder" or "classifier"
    Metrics: type | None = None           # the dataclass of its records' metrics
    resources: Resources = Resources()

    @property
    def kind(self) -> str:
        return type(self).registered_name  # type: ignore[attr-defined]

    def resources_for(self, job: Job) -> Resources:
        """What `job` occupies (default: the stage's `resources`; a stage may decide per job)."""
        return self.resources

    def plugins(self, cell: Cell) -> list[Any]:
        """Registered plugins whose code a job of this stage runs (their source is in its key)."""
        return []

    def plan(self, planner: Any, params: dict[str, Any], cell: Cell, upstream: Job | None) -> Job | None:
        """The job of this stage for `cell` (and the jobs it needs, through `planner.need`). A
        request-level stage (`attach`) may return None for a cell it has nothing to do for (the
        landscape stage: classifiers of finetuners other than `landscape.finetuners`)."""
        raise BenchError(f"stage {self.kind} cannot be planned: it defines no plan()")

    @abc.abstractmethod
    def run(self, job: Job, ctx: "StageContext") -> Record:
        """Do the job's work, write its artifacts through `ctx`, return its record (the worker writes it)."""

    def load(self, job_dir: JobDir, device: Any) -> Any:
        """The artifact a downstream job receives (default: the record)."""
        return job_dir.read_record()

    def placeholder(self, params: dict[str, Any], data: Any, encoder: Any) -> Any:
        """A random stand-in for this stage's artifact (tests, profiling)."""
        raise BenchError(f"stage {self.kind} has no placeholder artifact")

    def describe(self, job: Job) -> str:
        """A few words on what the job computes, from its config alone (the dry run's column)."""
        return ""

    def summary(self, record: Record) -> str:
        """One line for `bench show`: its scalar metrics."""
        parts = [f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return "  ".join(parts[:4])


def get_stage(kind: str) -> Stage:
    """An instance of the registered stage `kind` (BenchError with a did-you-mean if unknown)."""
    return STAGES.get(kind)()


# ---------------------------------------------------------------- what a running job gets


@dataclass
class StageContext:
    """What `Stage.run` gets besides its job: its folder, the results folder, the device, a
    progress callback, its inputs (the artifacts of the jobs it depends on) and helpers that
    write its artifacts atomically and durably and list them in the record."""

    job: Job
    dir: JobDir
    store: Store
    device: Any
    on_progress: Progress | None = None
    started: float = field(default_factory=time.time)
    written: list[str] = field(default_factory=list)
    scratch: Path | None = None  # rank > 0 of a data-parallel job: where its (discarded) artifacts go

    def progress(self, info: dict[str, Any]) -> None:
        if self.on_progress is not None:
            self.on_progress(info)

    # ------------------------------------------------------------ inputs

    def input_dir(self, role: str) -> JobDir:
        if role not in self.job.deps:
            raise BenchError(f"job {self.job.key} has no input {role!r} (inputs: {', '.join(self.job.deps) or 'none'})")
        return self.store.job(self.job.deps[role])

    def input_record(self, role: str) -> Record:
        dep = self.input_dir(role)
        state = dep.state()  # the worker verified every input's artifacts before the job started
        if not state.done:
            raise BenchError(f"job {self.job.key} needs {role} job {dep.key}, which is {state.name}"
                             + (f" ({state.reason})" if state.reason else "") + "; run `bench run` again")
        return state.record

    def input(self, role: str) -> Any:
        """The artifact of the job this one needs as `role`, loaded by that job's stage."""
        record = self.input_record(role)
        return get_stage(record.kind).load(self.input_dir(role), self.device)

    def inputs(self) -> dict[str, Any]:
        return {role: self.input(role) for role in self.job.deps}

    # ------------------------------------------------------------ artifacts

    def path(self, name: str) -> Path:
        """Where artifact `name` goes; it is listed in the record once written through this context."""
        if name not in self.written:
            self.written.append(name)
        if self.scratch is not None:  # only rank 0 writes the job's files
            self.scratch.mkdir(parents=True, exist_ok=True)
            return self.scratch / name
        self.dir.mkdir()
        return self.dir / name

    def save_torch(self, name: str, obj: Any) -> Path:
        return files.write_torch(self.path(name), obj)

    def save_npz(self, name: str, **arrays: Any) -> Path:
        return files.write_npz(self.path(name), **arrays)

    def record(self, metrics: Any, **fields: Any) -> Record:
        """The job's record (provenance from this context's device and start time)."""
        return Record.for_job(self.job, metrics, provenance=provenance(self.device, self.started), **fields)


def run_stage(job: Job, store: Store, device: Any, on_progress: Progress | None = None,
              started: float | None = None, scratch: Path | None = None) -> Record:
    """Run `job` with its stage and return its completed record (checked, artifacts listed); the
    caller writes it. The worker runs every job through this; tests call it directly. `scratch`:
    a data-parallel rank > 0, whose artifacts go there (its record is not written)."""
    stage = get_stage(job.kind)
    ctx = StageContext(job, store.job(job.key), store, device, on_progress, started=started or time.time(),
                       scratch=scratch)
    record = stage.run(job, ctx)
    if scratch is not None:
        return record
    if not isinstance(record, Record):
        raise TypeError(f"stage {job.kind} returned {type(record).__name__}, not a Record")
    if record.key != job.key or record.kind != job.kind:
        raise ValueError(f"stage {job.kind} returned the record of {record.kind} {record.key}, not of {job.key}")
    missing = [name for name in stage.artifacts if name not in ctx.written]
    if missing:
        raise RuntimeError(f"stage {job.kind} did not write {', '.join(missing)}")
    record.artifacts = {name: ctx.dir.artifact_entry(name) for name in ctx.written}
    record.typed_metrics(stage.Metrics)  # a stage whose metrics its own schema refuses is a bug
    return record
