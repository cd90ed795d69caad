"""Epoch-level data selection for pretraining (the `select` config section, air_rcs.md B).

`attach_selector(task, cfg, seed)` gives a `Trainable` its selector; `bench.train.fit` then asks
it for each epoch's images (`Trainable.epoch_data`) and checkpoints its state. `random` works
with every pretrainer; `rcs` needs the task's `rcs_parts(epoch)` (the ACL family).
"""

from __future__ import annotations

from typing import Any

from bench.config import SelectConfig, check_selection
from bench.errors import BenchError
from bench.selection.base import FULL, REUSE, SELECT, Selector, budget_batches, schedule_action
from bench.selection.random import RandomSelector
from bench.selection.rcs import RCSParts, RCSSelector

SELECTORS: dict[str, type[Selector]] = {"random": RandomSelector, "rcs": RCSSelector}

__all__ = ["FULL", "REUSE", "SELECT", "SELECTORS", "RCSParts", "RCSSelector", "RandomSelector", "SelectConfig",
           "Selector", "attach_selector", "budget_batches", "make_selector", "schedule_action"]


def make_selector(cfg: SelectConfig, seed: int, batch: int) -> Selector | None:
    """The selector `cfg.method` names (None for `none`); `batch` = the method's batch size."""
    if cfg.method == "none":
        return None
    if cfg.method not in SELECTORS:
        raise BenchError(f"select.method={cfg.method!r}: use none, random or rcs")
    return SELECTORS[cfg.method](cfg, seed, cfg.candidate_batch or batch)


def attach_selector(task: Any, cfg: SelectConfig, seed: int) -> Selector | None:
    """Set `task.selector` from `cfg` (checked against the task's class) and return it."""
    check_selection(cfg, [type(task)])
    task.selector = make_selector(cfg, seed, task.cfg.batch_size)
    return task.selector
