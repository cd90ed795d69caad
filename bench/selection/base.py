"""The selection schedule and the selector base class (air_rcs.md B.0, B.2, B.5).

A selector is asked at every epoch start (after the loop's reseed) which images of the pool
to train on. It keeps the current index set between selections; its state (the set, the epoch
of the last selection, RCS's validation images) is checkpointed by the loop. Every selection
runs under a forked RNG seeded from (seed, epoch), so it neither disturbs the training's random
stream nor depends on it: a resumed run reselects exactly what an uninterrupted one selects.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from bench.config import SelectConfig
from bench.datasets import ImageSet
from bench.errors import BenchError

log = logging.getLogger(__name__)

FULL, SELECT, REUSE = "full", "select", "reuse"


def schedule_action(epoch: int, warmup: int, every: int, has_selection: bool) -> str:
    """What epoch `epoch` (from 0) trains on; e = epoch + 1 as in the released loops
    (`ACL_RCS.py:267-277`): select when e >= warmup and (e - 1) % every == 0, reuse the last set
    when e > warmup (selecting if there is none yet, e.g. warmup 0), else the whole pool."""
    e = epoch + 1
    if e >= warmup and (e - 1) % every == 0:
        return SELECT
    if e > warmup:
        return REUSE if has_selection else SELECT
    return FULL


def budget_batches(n: int, fraction: float, batch: int) -> int:
    """K = floor(floor(N f) / b) candidate batches (`RCS.py` `batch_num`), at least one."""
    k = int(int(n * fraction) // batch)
    if k < 1:
        log.warning("select.fraction=%g of %d images is less than one batch of %d: selecting one batch",
                    fraction, n, batch)
    return max(k, 1)


def selection_seed(seed: int, epoch: int) -> int:
    return (seed * 999_983 + epoch * 7_877 + 12_345) % (2**63)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """The global RNG (CPU and `device`) seeded for the duration, then restored."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class Selector:
    """Base: the schedule and the checkpointed index set; subclasses implement `choose`."""

    name = "none"

    def __init__(self, cfg: SelectConfig, seed: int, batch: int):
        self.cfg = cfg
        self.seed = seed
        self.batch = batch  # images per candidate batch
        self.indices: torch.Tensor | None = None
        self.selected_at = -1
        self.pool_size = -1

    # ------------------------------------------------------------ the hook

    def select(self, task: Any, epoch: int, pool: ImageSet) -> torch.Tensor | None:
        self._check_pool(pool)
        action = schedule_action(epoch, self.cfg.warmup, self.cfg.every, self.indices is not None)
        if action == FULL:
            return self.warmup_indices(pool)
        if action == SELECT:
            with seeded(selection_seed(self.seed, epoch), pool.y.device):
                chosen = self.choose(task, epoch, pool)
            self.indices = torch.as_tensor(chosen, dtype=torch.long).cpu()
            self.selected_at = epoch
            log.info("%s selection at epoch %d: %d of %d images", self.name, epoch + 1, len(self.indices), len(pool))
        return self.indices

    def warmup_indices(self, pool: ImageSet) -> torch.Tensor | None:
        """The images of a warm-up epoch: None = the whole pool."""
        return None

    def choose(self, task: Any, epoch: int, pool: ImageSet) -> torch.Tensor:
        raise NotImplementedError

    def _check_pool(self, pool: ImageSet) -> None:
        if self.pool_size < 0:
            self.pool_size = len(pool)
        elif self.pool_size != len(pool):
            raise BenchError(f"data selection: the pool has {len(pool)} images, the saved selection was made "
                             f"on {self.pool_size}; delete the checkpoint to restart")

    # ------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.name, "indices": self.indices, "selected_at": self.selected_at,
                "pool_size": self.pool_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.name:
            raise BenchError(f"checkpoint holds a {state.get('method')!r} selection, this run uses {self.name!r}")
        indices = state.get("indices")
        self.indices = None if indices is None else torch.as_tensor(indices, dtype=torch.long)
        self.selected_at = int(state.get("selected_at", -1))
        self.pool_size = int(state.get("pool_size", -1))
