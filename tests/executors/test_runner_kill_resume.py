"""A `bench run` SIGKILLed mid-pretraining resumes from its checkpoint and ends where an
uninterrupted run of the same seed ends: same metrics, same encoder weights."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import grid
from bench.store import Store

SETTINGS = ["encoder.width=4", "synthetic.n_train=200", "synthetic.n_test=32", "data.val_size=16",
            "simclr.epochs=3", "simclr.batch_size=32", "simclr.steps_per_epoch=2", "simclr.warmup_epochs=1",
            "simclr.checkpoint_every=1", "finetune.epochs=1", "finetune.batch_size=16",
            "finetune.steps_per_epoch=1", "eval.n=16", "eval.aa_n=0", "eval.sweep_n=0", "eval.val_n=16",
            "eval.batch_size=16", "eval.steps=2", "eval.selection_steps=1"]
GRID = ["--methods", "simclr", "--finetune", "slf", "--datasets", "synthetic", "--seeds", "3"]
TIMING = ("per_s", "time", "duration", "seconds", "started", "finished")


def command(results: Path) -> list[str]:
    return [sys.executable, "-m", "bench", "run", *GRID, "--results", str(results), *SETTINGS]


def comparable(value):
    """A record's metrics/history without timings (which differ between runs by nature)."""
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items() if not any(t in k for t in TIMING)}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


@pytest.mark.slow
def test_sigkill_during_pretraining_then_rerun_resumes_and_matches_a_straight_run(tmp_path):
    graph = grid.plan(methods="simclr", finetune="slf", datasets="synthetic", seeds="3", overrides=SETTINGS)[1]
    (pre,) = [j for j in graph if j.kind == "pretrain"]
    killed, straight = Store(tmp_path / "killed"), Store(tmp_path / "straight")
    checkpoint = killed.job_dir(pre.key) / "checkpoint.pt"

    proc = subprocess.Popen(command(killed.root), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before its first checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its workers, at once
    proc.wait()
    assert checkpoint.exists() and not killed.has(pre.key), "kill came too late: pretraining already finished"
    for path in killed.root.glob("*/record.json"):  # nothing half-written
        json.loads(path.read_text())

    resumed = subprocess.run(command(killed.root), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    log = (killed.job_dir(pre.key) / "log.txt").read_text()
    epochs = [int(k) for k in re.findall(r"resumed from \S+ at epoch (\d+)", log)]
    assert epochs and epochs[-1] > 0, log[-2000:]
    assert log.count(f"start {pre.key}") == 2

    done = subprocess.run(command(straight.root), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "resumed" not in (straight.job_dir(pre.key) / "log.txt").read_text()

    for job in graph:
        a, b = killed.read(job.key), straight.read(job.key)
        assert a is not None and b is not None, job.key
        assert comparable(a.metrics) == comparable(b.metrics), job.key
        assert comparable(a.history) == comparable(b.history), job.key
    enc_a = torch.load(killed.job_dir(pre.key) / "encoder.pt", weights_only=True)["state"]
    enc_b = torch.load(straight.job_dir(pre.key) / "encoder.pt", weights_only=True)["state"]
    assert enc_a.keys() == enc_b.keys()
    for name in enc_a:
        assert torch.equal(enc_a[name], enc_b[name]), name
