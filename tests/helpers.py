"""Shared by the tests: tiny settings, sleeping jobs, finished jobs, a fake STL-10 cache.

Test files import it as `helpers` (tests/conftest.py puts tests/ on sys.path).
"""

from __future__ import annotations

import os
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
# The `smoke` preset at TINY's scale (with its AutoAttack and sweeps), for tests that need its code paths,
# not its numbers: the preset's per-method and per-finetuner settings win over TINY's shared ones, so
# they are set here too.
SMOKE_TINY = [o for o in TINY if o.split("=")[0] not in ("eval.aa_n", "eval.sweep_n")] + [
    "slf.steps_per_epoch=1", "alf.steps_per_epoch=1", "aff.steps_per_epoch=1", "apdpe.steps_per_epoch=1",
    "apdpe.batch_size=16", "lpaft.steps_per_epoch=1"]


def plugin_env(plugin_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a subprocess that sees the installed test plugins (conftest's plugin_path)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(plugin_path), os.environ.get("PYTHONPATH"))
                                                        if p), **extra}


def sleep_job(name: str, seconds: float, deps: dict[str, str] | None = None, fail: bool = False,
              fail_while: str | Path | None = None) -> Any:
    """A job of the `sleep` stage: it sleeps `seconds`; it fails if `fail`, or while `fail_while` exists."""
    settings: dict[str, Any] = {"seconds": seconds, "fail": fail}
    if fail_while is not None:
        settings["fail_while"] = str(fail_while)
    return grid.make_job("sleep", seed=0, config={"sleep": settings}, deps=deps or {}, label=name)


def stl10_cache(root: Path, n_train: int, n_test: int = 20) -> Path:
    """A prepared STL-10 cache in the published format: x uint8 NHWC 96x96, y int64, classes."""
    from bench.datasets.torchvision_sets import STL10

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
        np.savez(root / f"stl10_{split}.npz", x=x, y=np.arange(n, dtype=np.int64) % 10, classes=np.array(STL10.classes))
    return root


def done_job(store: Any, key: str, kind: str, artifacts: dict[str, Any] | None = None, **fields: Any) -> Any:
    """A finished job in `store`: each artifact written by its writer (name -> writer(path)), and a
    record that lists them (so the job's state is done and downstream stages can load it)."""
    from bench.record import Record

    job_dir = store.job(key)
    job_dir.mkdir()
    for name, write in (artifacts or {}).items():
        write(job_dir / name)
    record = Record(kind=kind, key=key, seed=fields.pop("seed", 0), **fields)
    record.artifacts = {name: job_dir.artifact_entry(name) for name in artifacts or {}}
    job_dir.write_record(record)
    return record


def done_encoder(store: Any, key: str, encoder: Any, meta: dict[str, Any] | None = None, **fields: Any) -> Any:
    """A finished pretrain job whose artifact is `encoder` (saved as its encoder.pt)."""
    from bench.models import save_encoder

    return done_job(store, key, "pretrain", {"encoder.pt": lambda path: save_encoder(path, encoder, meta)},
                    metrics={"epochs": 1}, **fields)
