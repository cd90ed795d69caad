"""A new kind of job from a third-party package, with no change to bench/: the test plugin's `knn`
stage (tests/plugin_pkg/tinystages.py, entry point `bench.stages`) runs in a grid, is cached,
resumes, and shows up in `bench show` and `bench report`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from bench.store import Store
from helpers import TINY, plugin_env

GRID = ["--methods", "simclr,acl", "--finetune", "slf", "--datasets", "synthetic", *TINY, "acl.attack_steps=1"]


def bench(plugin_path, *args):
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, timeout=600,
                          env=plugin_env(plugin_path))


def test_a_plugin_stage_runs_in_a_grid_is_cached_resumes_and_is_reported(plugin_path, tmp_path):
    results = tmp_path / "results"
    listing = bench(plugin_path, "list", "stages")
    assert listing.returncode == 0 and "knn" in listing.stdout and "k-nearest-neighbour" in listing.stdout

    first = bench(plugin_path, "run", *GRID, "--results", str(results), "--stages", "knn")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    store = Store(results)
    knn = store.records("knn")
    assert sorted(r.method for r in knn) == ["acl", "simclr"]  # one per pretrained encoder
    pretrain = {r.key: r for r in store.records("pretrain")}
    for record in knn:
        assert record.inputs["encoder"] in pretrain
        assert set(record.data) == {"synthetic/train", "synthetic/test"}  # both splits it reads, in its key
        accuracy = record.metrics["accuracy"]
        assert accuracy["n"] == 32 and 0 <= accuracy["value"] <= 1 and record.metrics["k"] == 5

    # cached: a second run does nothing; the dry run shows every job done
    dry = bench(plugin_path, "run", *GRID, "--results", str(results), "--stages", "knn", "--dry-run")
    assert dry.returncode == 0 and "0 to run" in " ".join(dry.stdout.split())
    # resumes: only the job that is missing runs again, nothing upstream of it
    gone = next(r for r in knn if r.method == "acl")
    first_run_end = max(r.provenance["run"]["finished"] for r in store.records())
    shutil.rmtree(store.job_dir(gone.key))
    again = bench(plugin_path, "run", *GRID, "--results", str(results), "--stages", "knn")
    assert again.returncode == 0, again.stdout[-3000:]
    rerun = [r for r in Store(results).records() if r.provenance["run"]["started"] > first_run_end]
    assert [r.kind for r in rerun] == ["knn"] and rerun[0].key == gone.key

    shown = bench(plugin_path, "show", "--results", str(results), "--kind", "knn")
    assert shown.returncode == 0 and shown.stdout.count("knn") >= 2 and "kNN accuracy" in shown.stdout
    one = bench(plugin_path, "show", "--results", str(results), gone.key)
    assert json.loads(one.stdout[one.stdout.index("{"):])["kind"] == "knn"

    report = bench(plugin_path, "report", "--results", str(results), "--out", str(tmp_path / "report"),
                   "--format", "md,html", "--no-tsne")
    assert report.returncode == 0, report.stderr[-3000:]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Other results: knn" in md and "kNN accuracy" in md
    assert "Other results: knn" in (tmp_path / "report" / "report.html").read_text()
