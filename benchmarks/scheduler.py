"""Scheduling efficiency of the local executor: equal sleeping jobs on k slots.

    python benchmarks/scheduler.py [--seconds 12] [--rounds 3] [--slots 1,2,4,8]

For each k, a grid of `rounds * k` independent jobs, each sleeping `seconds`, runs through the
local executor's real scheduling loop and worker subprocesses (the hidden benchmark job
function `bench.worker:sleep_job`, so no torch import). Reported per k:

- makespan: wall time of the whole run, from before the executor is set up (nothing is started
  ahead of the clock) to the last record;
- efficiency = (sum of nominal job times) / (k x makespan): the fraction of slot time spent in
  job work, so worker start-up, polling and tail effects all count against it (target >= 0.9);
- busy = (sum of per-job wall times seen by the runner, start-up included) / (k x makespan):
  how well the scheduler keeps slots occupied;
- boot: when the last worker of the first wave started its job (the cold start of k fresh
  worker processes at once; later jobs start on warm standby workers).

Why 12 s jobs: the fixed costs are one cold start per slot per run (1-3 s on a loaded 2-core
machine when 8 workers boot at once) and a few tens of milliseconds per job. Real jobs last
minutes to hours, so 2 s jobs would measure little but that cold start; 12 s jobs are still far
shorter than any real job (the efficiency measured is a lower bound) and keep the whole
benchmark (k = 1, 2, 4, 8, 3 rounds) under about 2.5 minutes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.executors.base import DONE, NullReporter, Options
from bench.executors.local import LocalExecutor
from bench.grid import Graph, make_job
from bench.runner import run
from bench.store import Store


def sleep_graph(n: int, seconds: float, tag: str) -> Graph:
    graph = Graph()
    for i in range(n):
        graph.add(make_job("sleep", seed=i, config={"sleep": {"seconds": seconds}, "bench": {"tag": tag}},
                           label="sleep"))
    return graph


def measure(k: int, rounds: int, seconds: float, root: Path) -> dict[str, float]:
    n = rounds * k
    graph = sleep_graph(n, seconds, f"k{k}-{time.time()}")
    store = Store(root / f"k{k}")
    started_at, started = time.time(), time.perf_counter()
    executor = LocalExecutor(Options(gpus=[], slots=k, extra={"preload": []}))
    executor.check()
    result = run(graph, store, executor, NullReporter())
    makespan = time.perf_counter() - started
    states = {o.state for o in result.outcomes.values()}
    if states != {DONE}:
        raise RuntimeError(f"k={k}: jobs ended {states}")
    busy = sum(o.finished - o.started for o in result.outcomes.values() if o.started and o.finished)
    first = sorted(store.read(key).provenance["run"]["started"] for key in graph.keys())[:k]
    return {"k": k, "jobs": n, "makespan": makespan, "ideal": rounds * seconds,
            "efficiency": n * seconds / (k * makespan), "busy": busy / (k * makespan),
            "boot": first[-1] - started_at}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0, help="sleep of each job")
    parser.add_argument("--rounds", type=int, default=3, help="jobs per slot")
    parser.add_argument("--slots", default="1,2,4,8", help="comma-separated slot counts")
    args = parser.parse_args()
    console = Console()
    table = Table(title=f"local executor: {args.rounds} x k jobs of {args.seconds:g} s on k slots",
                  title_justify="left")
    for col in ("k", "jobs", "makespan", "ideal", "efficiency", "busy", "boot"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory(prefix="bench-scheduler-") as tmp:
        for k in (int(s) for s in args.slots.split(",")):
            r = measure(k, args.rounds, args.seconds, Path(tmp))
            table.add_row(str(k), str(r["jobs"]), f"{r['makespan']:.2f} s", f"{r['ideal']:.2f} s",
                          f"{r['efficiency']:.3f}", f"{r['busy']:.3f}", f"{r['boot']:.2f} s")
    console.print(table)


if __name__ == "__main__":
    main()
