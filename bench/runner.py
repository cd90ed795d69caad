"""Run a job graph: skip what is done, hand the rest to an executor, report, summarize.

Safety rests on three rules, kept by `bench.worker` and `bench.store`: a job is done exactly
when its record validates and its artifacts are intact (the record is written atomically after
the stage returns; a damaged one runs again); a job runs only under its lock (a second run
waits for it or takes over when the lock is released); training resumes from the job's last
checkpoint. So a run can be killed at any moment and simply started again.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from bench.errors import BenchError, Interrupted, JobFailed
from bench.executors.base import (CACHED, FAILED, PENDING, SUCCESS, Executor, NullReporter, Options, Outcome,
                                  Reporter)
from bench.grid import Graph
from bench.stages.base import get_stage
from bench.store import DAMAGED, DONE, JobState, Store

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    graph: Graph
    outcomes: dict[str, Outcome]

    @property
    def failures(self) -> list[tuple[str, Outcome]]:
        return [(k, o) for k, o in self.outcomes.items() if o.state == FAILED]

    @property
    def ok(self) -> bool:
        return all(o.state in SUCCESS for o in self.outcomes.values())

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.outcomes.values():
            out[o.state] = out.get(o.state, 0) + 1
        return out

    def raise_for_failures(self) -> None:
        if self.ok:
            return
        lines = [f"{k}: {o.error or 'failed'} (log: {o.log})" for k, o in self.failures]
        blocked = sum(1 for o in self.outcomes.values() if o.state not in SUCCESS and o.state != FAILED)
        head = f"{len(self.failures)} job(s) failed" + (f", {blocked} not run because of them" if blocked else "")
        raise JobFailed(head + ":\n  " + "\n  ".join(lines))


def interrupted(graph: Graph, store: Store) -> Interrupted:
    """The message of a run stopped by Ctrl-C: what is done, what will resume."""
    states = {key: store.state(key) for key in graph.keys()}
    done = sum(1 for s in states.values() if s.done)
    resumable = sum(1 for s in states.values() if s.name == "interrupted")
    return Interrupted(f"interrupted: {done} of {len(states)} jobs are done and stay done; {len(states) - done} "
                       f"unfinished ({resumable} with a checkpoint). Run the same command again to continue: "
                       "finished jobs are skipped, unfinished ones resume from their last checkpoint")


def job_states(graph: Graph, store: Store) -> dict[str, JobState]:
    """Every job's state in the store. The artifacts of done jobs that a pending job will read are
    verified in full (sha256), so a changed or corrupted file is recomputed instead of read."""
    states = {key: store.state(key) for key in graph.keys()}
    needed = {dep for key, state in states.items() if not state.done for dep in graph.deps(key)}
    for key in needed:
        if states[key].done:
            states[key] = store.state(key, verify=True)
    return states


def make_executor(name: str, options: Options) -> Executor:
    from bench.registry import EXECUTORS

    executor = EXECUTORS.get(name)(options)
    executor.check()
    return executor


def executor_settings(name: str, config_path: str | Path | None = None) -> dict[str, Any]:
    """The [executors.<name>] table of bench.toml (empty when there is none)."""
    from bench.config import find_config_file

    try:
        path = find_config_file(config_path)
    except BenchError:
        if config_path:
            raise
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise BenchError(f"{path}: not valid TOML: {exc}") from exc
    table = data.get("executors", {}).get(name, {})
    if not isinstance(table, dict):
        raise BenchError(f"{path}: [executors.{name}] must be a table")
    return table


def run(graph: Graph, store: Store, executor: Executor, reporter: Reporter | None = None) -> RunResult:
    """Run every job of `graph` that is not done (damaged ones included)."""
    reporter = reporter or NullReporter()
    found = job_states(graph, store)
    for key, state in found.items():
        if state.name == DAMAGED:
            log.warning("%s is damaged (%s)", key, state.reason)
    states = {k: (CACHED if s.done else PENDING) for k, s in found.items()}
    todo = [k for k, s in states.items() if s != CACHED]
    outcomes: dict[str, Outcome] = {k: Outcome(CACHED) for k, s in states.items() if s == CACHED}
    store.root.mkdir(parents=True, exist_ok=True)
    reporter.begin(graph, states)
    try:
        if todo:
            outcomes.update(executor.run(graph.subgraph(todo), store, reporter))
    finally:
        ordered = {k: outcomes[k] for k in graph.keys() if k in outcomes}
        reporter.end(ordered)
    return RunResult(graph, ordered)


def run_to_end(graph: Graph, store: Store, executor: Executor, reporter: Reporter | None = None) -> RunResult:
    """`run` for a command: Ctrl-C becomes the resume message, a failed job an error naming its log."""
    try:
        result = run(graph, store, executor, reporter)
    except KeyboardInterrupt:
        raise interrupted(graph, store) from None
    result.raise_for_failures()
    return result


def plan_table(graph: Graph, store: Store, estimate: Any | None = None) -> Table:
    """The dry-run view: every job, its kind, dependencies, state and run order; with an `estimate`
    (`bench.estimate.Estimate`), each job's estimated time and what it counts."""
    from bench.estimate import rough
    from bench.progress import STORE_STYLE

    table = Table(title=f"plan: {len(graph)} jobs in {store.root}", title_justify="left")
    columns = ("#", "job", "kind", "computes", "needs", "state") + (("estimate", "counted") if estimate is not None else ())
    for col in columns:
        table.add_column(col, overflow="fold", justify="right" if col == "estimate" else "left")
    states = job_states(graph, store)
    for i, job in enumerate(graph, 1):
        state = states[job.key]
        shown = state.name + (f": {state.reason}" if state.name == DAMAGED else "")
        needs = ", ".join(job.deps.values())
        name = Text(job.key + (f" [{job.variant}]" if job.variant else ""))  # the variant label: not in the key
        cells = [str(i), name, job.kind, get_stage(job.kind).describe(job), needs,
                 Text(shown, style=STORE_STYLE.get(state.name, ""))]
        if estimate is not None:
            guess = estimate.jobs.get(job.key)
            if guess is None or guess.done:
                cells += ["—", guess.work if guess is not None else ""]
            else:
                cells += [rough(guess.seconds), Text(guess.work, style="dim")]
        table.add_row(*cells)
    counts = graph.counts()
    table.caption = ", ".join(f"{n} {kind}" for kind, n in counts.items())
    done = sum(1 for s in states.values() if s.name == DONE)
    table.caption += f"; {done} done, {len(states) - done} to run"
    return table


def done_keys(graph: Graph, store: Store) -> set[str]:
    return {key for key in graph.keys() if store.state(key).done}
