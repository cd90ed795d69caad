"""Scheduling efficiency of the local executor: equal sleeping jobs on k slots, or a mixed-kind grid.

    python benchmarks/scheduler.py [--seconds 12] [--rounds 3] [--slots 1,2,4,8]
    python benchmarks/scheduler.py --mixed [--gpus 2] [--scale 1]

`--mixed`: a grid shaped like one seed of the paper preset (k-means pseudo-labels, pretrainings,
SLF/ALF/AFF finetunings, evaluations; `MIXED_KINDS`), each job a sleep declaring its kind's
resources (`bench.stages.sleep`), on fake GPUs, run twice by the real executor: packed by kind
(the default: shares of a GPU, k-means on a CPU slot) and packing-free (`--slots 1`: one job per
GPU, whatever its kind). Reported: makespan, GPU occupancy (sum of share x duration over GPU
time) and the lower bound max(critical path, GPU work / GPUs). Sleeping jobs do not slow each
other down, while real jobs sharing a GPU do (two evaluations on one GPU each run slower than
alone), so the packed makespan is the scheduler's part of the gain, an upper bound on the whole.

For each k, a grid of `rounds * k` independent jobs, each sleeping `seconds`, runs through the
local executor's real scheduling loop and worker subprocesses (the hidden benchmark job
function `bench.worker:sleep_job`; its record's device line imports torch, which the fork
server has imported once, as in a real run). Reported per k:

- makespan: wall time of the whole run, from before the executor is set up (nothing is started
  ahead of the clock) to the last record;
- efficiency = (sum of nominal job times) / (k x makespan): the fraction of slot time spent in
  job work, so worker start-up, polling and tail effects all count against it (target >= 0.9);
- busy = (sum of per-job wall times seen by the runner, start-up included) / (k x makespan):
  how well the scheduler keeps slots occupied;
- boot: when the last worker of the first wave started its job (the cold start of the fork
  server, then k forks; every later job is a fork too).

Why 12 s jobs: the fixed costs are one cold start of the fork server per run and a few tens of
milliseconds per job. Real jobs last
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
    executor = LocalExecutor(Options(gpus=[], slots=k))
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


# kind -> (seconds at scale 1, share of a GPU, how many per pretraining); the pseudo-labels feed
# half of the pretrainings (AdvCL's), the finetunings each pretraining, the evaluations each finetuning
MIXED_KINDS = {"pretrain": (8.0, 1.0), "pseudo_labels": (3.0, 0.0), "slf": (3.0, 0.25), "alf": (3.0, 0.5),
               "aff": (5.0, 1.0), "evaluate": (2.0, 0.5)}


def mixed_graph(pretrainings: int, scale: float, tag: str) -> tuple[Graph, dict[str, tuple[float, float]]]:
    """The mixed-kind grid and each job's (seconds, share of a GPU)."""
    graph, needs = Graph(), {}

    def add(kind: str, seed: int, deps: dict[str, str]) -> str:
        seconds, gpu = MIXED_KINDS[kind]
        job = make_job("sleep", seed=seed, deps=deps, label=kind,
                       config={"sleep": {"seconds": seconds * scale, "gpu": gpu}, "bench": {"tag": tag}})
        graph.add(job)
        needs[job.key] = (seconds * scale, gpu)
        return job.key

    for i in range(pretrainings):
        deps = {"pseudo_labels": add("pseudo_labels", i, {})} if i % 2 == 0 else {}
        pre = add("pretrain", i, deps)
        for finetuner in ("slf", "alf", "aff"):
            add("evaluate", i, {"classifier": add(finetuner, i, {"encoder": pre})})
    return graph, needs


def critical_path(graph: Graph, seconds: dict[str, float]) -> float:
    finish: dict[str, float] = {}
    for key in graph.keys():  # topological order
        finish[key] = seconds[key] + max((finish[d] for d in graph.deps(key)), default=0.0)
    return max(finish.values())


def measure_mixed(gpus: int, packed: bool, pretrainings: int, scale: float, root: Path) -> dict[str, float]:
    graph, needs = mixed_graph(pretrainings, scale, f"mixed-{packed}-{time.time()}")
    store = Store(root / ("packed" if packed else "whole"))
    started = time.perf_counter()
    executor = LocalExecutor(Options(gpus=[str(g) for g in range(gpus)], slots=None if packed else 1))
    executor.check()
    result = run(graph, store, executor, NullReporter())
    makespan = time.perf_counter() - started
    states = {o.state for o in result.outcomes.values()}
    if states != {DONE}:
        raise RuntimeError(f"mixed grid ({'packed' if packed else 'packing-free'}): jobs ended {states}")
    work = sum(s * g for s, g in needs.values())
    bound = max(critical_path(graph, {k: s for k, (s, _) in needs.items()}), work / gpus)
    return {"jobs": len(graph), "makespan": makespan, "occupancy": work / (gpus * makespan), "bound": bound}


def main_mixed(gpus: int, pretrainings: int, scale: float) -> None:
    console = Console()
    table = Table(title=f"local executor: mixed-kind grid ({pretrainings} pretrainings, their pseudo-labels, "
                        f"finetunings and evaluations) on {gpus} fake GPUs", title_justify="left")
    for col in ("schedule", "jobs", "makespan", "lower bound", "GPU occupancy"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory(prefix="bench-scheduler-") as tmp:
        rows = {packed: measure_mixed(gpus, packed, pretrainings, scale, Path(tmp)) for packed in (False, True)}
    for packed, r in rows.items():
        table.add_row("packed by kind" if packed else "one job per GPU", str(r["jobs"]), f"{r['makespan']:.1f} s",
                      f"{r['bound']:.1f} s", f"{r['occupancy']:.2f}")
    console.print(table)
    console.print(f"packing by kind: makespan x{rows[False]['makespan'] / rows[True]['makespan']:.2f} shorter",
                  highlight=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0, help="sleep of each job")
    parser.add_argument("--rounds", type=int, default=3, help="jobs per slot")
    parser.add_argument("--slots", default="1,2,4,8", help="comma-separated slot counts")
    parser.add_argument("--mixed", action="store_true", help="the mixed-kind grid on fake GPUs, packed and not")
    parser.add_argument("--gpus", type=int, default=2, help="--mixed: fake GPUs")
    parser.add_argument("--pretrainings", type=int, default=4, help="--mixed: pretrainings in the grid")
    parser.add_argument("--scale", type=float, default=1.0, help="--mixed: multiplies every job's duration")
    args = parser.parse_args()
    if args.mixed:
        main_mixed(args.gpus, args.pretrainings, args.scale)
        return
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
