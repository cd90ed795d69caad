"""Random selection: the papers' baseline (air_rcs.md B.5), for every pretrainer.

Same schedule and size as RCS, floor(floor(N f) / b) b images, drawn uniformly without
replacement (from the (seed, epoch)-seeded RNG the base class sets up).
"""

from __future__ import annotations

from typing import Any

import torch

from bench.datasets import ImageSet
from bench.selection.base import Selector, budget_batches


class RandomSelector(Selector):
    name = "random"

    def choose(self, task: Any, epoch: int, pool: ImageSet) -> torch.Tensor:
        n = len(pool)
        size = min(budget_batches(n, self.cfg.fraction, self.batch) * self.batch, n)
        return torch.randperm(n)[:size].sort().values
