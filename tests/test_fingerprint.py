"""Job keys cover the code a job runs, derived from imports: a new module under bench/ that a stage
imports is in that stage's keys at once, and nowhere else."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench.fingerprint import code_modules

ROOT = Path(__file__).resolve().parents[1]
KEYS = """
import json, sys
from bench import grid
_, graph, _ = grid.plan(methods="simclr", finetune="slf", datasets="synthetic", fetch=False)
sys.stdout.write(json.dumps({job.kind: job.key for job in graph}))
"""


def keys(tree: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", KEYS], capture_output=True, text=True, env=env, cwd=tree,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_a_new_module_a_stage_imports_changes_that_stages_keys(tmp_path):
    tree = tmp_path / "checkout"
    for part in ("bench", "methods"):
        shutil.copytree(ROOT / part, tree / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "bench.toml", tree / "bench.toml")
    base = keys(tree)
    assert set(base) == {"pretrain", "finetune", "evaluate"}

    helper = tree / "bench" / "extra_check.py"  # a harness file nobody listed anywhere
    helper.write_text("def threshold():\n    return 0.5\n")
    assert keys(tree) == base  # not imported by anything: no job runs it
    stage = tree / "bench" / "stages" / "evaluate.py"
    stage.write_text(stage.read_text().replace("from bench import datasets\n",
                                               "from bench import datasets, extra_check  # noqa: F401\n", 1))
    with_import = keys(tree)
    changed = {kind for kind in base if with_import[kind] != base[kind]}
    assert changed == {"evaluate"}  # the stage that imports it, and no other job
    helper.write_text("def threshold():\n    return 0.25\n")
    assert keys(tree)["evaluate"] not in (base["evaluate"], with_import["evaluate"])
    helper.write_text("def threshold():\n    # a comment, and a docstring, do not count\n    return 0.25\n")
    assert keys(tree)["evaluate"] != with_import["evaluate"]


def test_the_fingerprint_follows_imports_inside_functions_too():
    from bench.registry import DATASETS, STAGES

    covered = code_modules([STAGES.get("pseudo_labels"), DATASETS.get("synthetic")])
    # bench.stages.pseudo_labels imports bench.clusterfit at module level; clusterfit imports
    # bench.datasets inside a function (extract_features): both count
    assert {"bench.stages.pseudo_labels", "bench.clusterfit", "bench.datasets", "bench.stages.base"} <= set(covered)
