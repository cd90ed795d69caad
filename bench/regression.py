"""Regression numbers (RobustBench style): a reference run's SA / RA / AA per cell, with a stated tolerance.

The file (`tests/fixtures/cpu_regression.json`) holds the run that made it (preset, overrides, commit,
machine, wall time), one entry per cell (method, finetuner, source, target, seed: each metric's percent
and n), the cell a slow test reruns, and the tolerance with its justification. `from_results` builds it
from a results folder; `python -m bench.regression RESULTS OUT --preset cpu ...` writes it.

The tolerance of a metric at n images: its 95% Wilson half-width at the stored value (the rerun is
another draw of the same measurement only where its floating-point path differs: another CPU, BLAS or
torch build trains to slightly different weights, which moves a test accuracy like a resampling of the
test set would) plus `FLOAT_POINTS` (the drift of the training itself over such differences); on the
machine and build that made the file a rerun is bit-identical (seeded jobs, one thread) and must match
exactly.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.errors import BenchError
from bench.record import wilson_interval

FORMAT = "bench-regression/1"
METRICS = ("sa", "ra", "aa")
FLOAT_POINTS = 1.0
TOLERANCE_TEXT = (
    "A rerun on the machine and torch build that made this file is bit-identical (every job is seeded and runs "
    "one thread), so it must match exactly. Elsewhere a different CPU, BLAS or torch build rounds differently, "
    "training ends at slightly different weights, and a test accuracy moves as if the test images were "
    "resampled: the tolerance of a metric is its 95% Wilson half-width at the stored value and n, plus "
    f"{FLOAT_POINTS:g} point for the drift of training itself.")


@dataclass
class Entry:
    method: str
    finetuner: str
    source: str
    target: str
    seed: int
    values: dict[str, float]  # percent
    n: dict[str, int]

    @property
    def key(self) -> tuple[str, str, str, str, int]:
        return (self.method, self.finetuner, self.source, self.target, self.seed)

    def tolerance(self, metric: str) -> float:
        """Points a rerun may differ by in `metric` (see the module docstring)."""
        n = self.n[metric]
        p = self.values[metric] / 100
        lo, hi = wilson_interval(round(p * n), n)
        return 100 * (hi - lo) / 2 + FLOAT_POINTS


@dataclass
class Regression:
    about: str
    run: dict[str, Any]
    entries: list[Entry]
    rerun: dict[str, Any]
    tolerance: str = TOLERANCE_TEXT
    extra: dict[str, Any] = field(default_factory=dict)

    def get(self, method: str, finetuner: str, source: str, target: str | None = None, seed: int = 0) -> Entry:
        key = (method, finetuner, source, target or source, seed)
        for entry in self.entries:
            if entry.key == key:
                return entry
        raise BenchError(f"no regression entry for {key}")

    def to_json(self) -> str:
        data = {"format": FORMAT, "_about": self.about, "run": self.run, "tolerance": self.tolerance,
                "rerun": self.rerun, **self.extra,
                "cells": [{"method": e.method, "finetuner": e.finetuner, "source": e.source, "target": e.target,
                           "seed": e.seed, **{m: e.values[m] for m in METRICS if m in e.values},
                           "n": e.n} for e in self.entries]}
        return json.dumps(data, indent=1) + "\n"


def load(path: Path | str) -> Regression:
    """The regression file at `path`; BenchError when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"{path}: not a readable regression file ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BenchError(f"{path}: format {data.get('format') if isinstance(data, dict) else '?'} is not {FORMAT}")
    entries = []
    for cell in data.get("cells", []):
        values = {m: float(cell[m]) for m in METRICS if cell.get(m) is not None}
        entries.append(Entry(cell["method"], cell["finetuner"], cell["source"], cell.get("target", cell["source"]),
                             int(cell.get("seed", 0)), values, {k: int(v) for k, v in cell["n"].items()}))
    known = {"format", "_about", "run", "tolerance", "rerun", "cells"}
    return Regression(data.get("_about", ""), dict(data.get("run") or {}), entries, dict(data.get("rerun") or {}),
                      data.get("tolerance", TOLERANCE_TEXT), {k: v for k, v in data.items() if k not in known})


def from_results(results: Path | str, *, preset: str, overrides: list[str], rerun: dict[str, Any], about: str,
                 wall_time_s: float | None = None) -> Regression:
    """A regression file's content from the evaluate records of a results folder."""
    from bench.store import Store

    entries, commits, devices = [], set(), set()
    for record in Store(results).records():
        commits.add(str(record.provenance.get("git_sha")))
        devices.add(str(record.provenance.get("device")))
        if record.kind != "evaluate":
            continue
        metrics = {m: record.metrics.get(m) for m in METRICS if isinstance(record.metrics.get(m), dict)}
        entries.append(Entry(record.method or "?", record.finetuner or "?", record.source or "?",
                             record.target or record.source or "?", record.seed,
                             {m: round(100 * v["value"], 2) for m, v in metrics.items()},
                             {m: int(v["n"]) for m, v in metrics.items()}))
    if not entries:
        raise BenchError(f"no evaluate records in {results}")
    entries.sort(key=lambda e: e.key)
    # what the records say they ran on (not this process's checkout)
    run = {"preset": preset, "overrides": list(overrides), "commit": ", ".join(sorted(commits)),
           "machine": ", ".join(sorted(devices)), "python": platform.python_version(), "wall_time_s": wall_time_s}
    return Regression(about, run, entries, rerun)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.regression", description=__doc__.splitlines()[0])
    parser.add_argument("results", help="the results folder of the reference run")
    parser.add_argument("out", help="the regression file to write (e.g. tests/fixtures/cpu_regression.json)")
    parser.add_argument("--preset", required=True)
    parser.add_argument("--about", default="", help="what the run was (shown in the file)")
    parser.add_argument("--wall-time-s", type=float, default=None)
    parser.add_argument("--rerun", default="simclr,slf", help="METHOD,FINETUNER of the cell the slow test reruns")
    parser.add_argument("overrides", nargs="*", help="the key=value overrides the run was made with")
    args = parser.parse_args(argv)
    method, finetuner = args.rerun.split(",")
    regression = from_results(args.results, preset=args.preset, overrides=args.overrides, about=args.about,
                              wall_time_s=args.wall_time_s, rerun={"method": method, "finetuner": finetuner})
    from bench import files

    files.write_text(Path(args.out), regression.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
