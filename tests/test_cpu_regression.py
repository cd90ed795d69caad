"""Regression numbers of the `cpu` preset (tests/fixtures/cpu_regression.json, RobustBench style): the file
is well formed, and (slow) one cheap cell rerun from scratch lands within the tolerance the file states."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import regression
from bench.store import Store

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "cpu_regression.json"


def test_the_regression_file_loads_and_states_its_tolerance():
    ref = regression.load(FIXTURE)
    assert ref.run["preset"] == "cpu" and ref.entries and "Wilson" in ref.tolerance
    cell = ref.get(ref.rerun["method"], ref.rerun["finetuner"], "cifar10")
    for metric, value in cell.values.items():
        assert 0 <= value <= 100 and cell.n[metric] > 0
        assert 1.0 < cell.tolerance(metric) < 100 * 1.96 * 0.5 / cell.n[metric] ** 0.5 + 1.5


def test_the_file_round_trips(tmp_path):
    ref = regression.load(FIXTURE)
    path = tmp_path / "again.json"
    path.write_text(ref.to_json())
    again = regression.load(path)
    assert [(e.key, e.values, e.n) for e in again.entries] == [(e.key, e.values, e.n) for e in ref.entries]
    assert again.run == ref.run and again.rerun == ref.rerun


# The rerun skips AutoAttack and the sweeps (about half of the cell's time): SA and RA are computed on
# the same images with the same seeds either way.
CHEAPER = ["eval.aa_n=0", "eval.sweep_n=0"]


@pytest.mark.long
def test_one_cheap_cell_reruns_within_the_tolerance(tmp_path, cifar_dir):
    """About 20 minutes on 2 CPU cores: `BENCH_TEST_WORKERS=1 bash scripts/test.sh -m long` (one worker: all cores)."""
    ref = regression.load(FIXTURE)
    method, finetuner = ref.rerun["method"], ref.rerun["finetuner"]
    results = tmp_path / "results"
    run = subprocess.run([sys.executable, "-m", "bench", "run", "--preset", ref.run["preset"], "--methods", method,
                          "--finetune", finetuner, "--results", str(results), "--data-dir", str(cifar_dir),
                          *ref.run.get("overrides", []), *CHEAPER],
                         capture_output=True, text=True, timeout=3600, env=os.environ)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (record,) = [r for r in Store(results).records() if r.kind == "evaluate"]
    expected = ref.get(method, finetuner, record.source, record.target, record.seed)
    for metric, value in expected.values.items():
        if metric == "aa":
            continue
        got = 100 * record.metrics[metric]["value"]
        assert record.metrics[metric]["n"] == expected.n[metric]
        assert abs(got - value) <= expected.tolerance(metric), (metric, got, value, expected.tolerance(metric))
