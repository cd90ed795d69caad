"""Shared by the tests: tiny settings, sleeping jobs, a probe job function, a fake STL-10 cache.

Test files import it as `helpers` (pytest puts tests/ on sys.path); worker subprocesses find
`helpers:probe_job` when tests/ is on their PYTHONPATH (see `TESTS`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench import grid

TESTS = Path(__file__).resolve().parent

# Every training and evaluation setting at its smallest: a whole cell runs in seconds on a CPU.
TINY = ["encoder.width=4", "synthetic.n_train=128", "synthetic.n_test=32", "data.val_size=16",
        "pretrain.epochs=1", "pretrain.batch_size=16", "pretrain.steps_per_epoch=1", "pretrain.warmup_epochs=0",
        "finetune.epochs=1", "finetune.batch_size=16", "finetune.steps_per_epoch=1", "finetune.attack_steps=1",
        "eval.n=16", "eval.aa_n=0", "eval.sweep_n=0", "eval.val_n=16", "eval.batch_size=16", "eval.steps=1",
        "eval.selection_steps=1"]

# The job function that only sleeps (bench.worker's benchmark hook), for the scheduling tests.
SLEEP = {"evaluate": "bench.worker:sleep_job"}


def sleep_job(name: str, seconds: float, deps: dict[str, str] | None = None, fail: bool = False,
              fail_while: str | Path | None = None) -> Any:
    """A job that sleeps `seconds` (run with SLEEP); it fails if `fail`, or while `fail_while` exists."""
    settings: dict[str, Any] = {"seconds": seconds, "fail": fail}
    if fail_while is not None:
        settings["fail_while"] = str(fail_while)
    return grid.make_job("evaluate", seed=0, config={"sleep": settings}, deps=deps or {}, label=name)


def probe_job(job: Any, store: Any, device: Any, on_progress: Any) -> Any:
    """A job function that reports, from inside its worker, the environment it was started with
    (/proc/self/environ: fixed at exec, so before any import), CUDA_VISIBLE_DEVICES now, whether
    torch was already imported when the job began, and torch's thread count."""
    from bench.record import Record

    preloaded = "torch" in sys.modules
    import torch

    initial = dict(item.split("=", 1) for item in Path("/proc/self/environ").read_bytes().decode(errors="replace")
                   .split("\0") if "=" in item)
    metrics = {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
               "cuda_visible_devices_at_exec": initial.get("CUDA_VISIBLE_DEVICES"),
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
               "torch_preloaded": preloaded, "device": str(device)}
    return Record(kind=job.kind, key=job.key, seed=job.seed, config=job.config, inputs=dict(job.deps),
                  metrics=metrics)


def stl10_cache(root: Path, n_train: int, n_test: int = 20) -> Path:
    """A prepared STL-10 cache in the published format: x uint8 NHWC 96x96, y int64, classes."""
    from bench.datasets.torchvision_sets import STL10

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
        np.savez(root / f"stl10_{split}.npz", x=x, y=np.arange(n, dtype=np.int64) % 10, classes=np.array(STL10.classes))
    return root
