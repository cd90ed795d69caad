"""BatchNorm running statistics of forwards that were skipped or deferred.

A training step may compute a forward once where a reference schedule computes it several
times (AdvCL forwards its fixed clean views once instead of at every attack step). Train-mode
BatchNorm normalizes with batch statistics either way, so outputs and gradients are equal; only
the running statistics differ, because each forward also updates them. Two tools bring them to
what the reference schedule leaves, up to float rounding:

- `replayed_rounds(bns, per_round, rounds)`: forwards whose batch statistics repeat every round
  (the same images through the same frozen weights). One round maps a running buffer
  r -> a^n r + c (a = 1 - momentum, n forwards per round), so R rounds give
  a^(nR) r + c (1 + a^n + ... + a^(n(R-1))), computed from r before and after one real round.
- `StatsLedger`: a BatchNorm1d that normalizes with batch statistics but records (mean,
  unbiased var) per forward instead of updating; `apply` then replays the updates in any order.

Writes go through `.data` (as the BatchNorm kernel's own update does), so graphs that saved
these buffers are not invalidated (their train-mode backward does not read them).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bench.models.norm import BranchedBatchNorm2d

Stats = tuple[torch.Tensor, torch.Tensor]


def branch_batchnorms(model: nn.Module, branch: str) -> list[nn.BatchNorm2d]:
    """The BatchNorm2d of `branch` in every branched BatchNorm of `model`."""
    return [m.bns[branch] for m in model.modules() if isinstance(m, BranchedBatchNorm2d)]


def _updating(bns: Iterable[nn.modules.batchnorm._BatchNorm]) -> list[nn.modules.batchnorm._BatchNorm]:
    return [bn for bn in bns if bn.training and bn.track_running_stats and bn.momentum is not None]


@contextlib.contextmanager
def replayed_rounds(bns: Iterable[nn.modules.batchnorm._BatchNorm], per_round: int, rounds: int) -> Iterator[None]:
    """Make the forwards inside the block (one round of `per_round` forwards through `bns`) leave
    the running statistics of `rounds` identical rounds."""
    bns = _updating(bns)
    if per_round == 0 or rounds <= 1 or not bns:
        yield
        return
    before = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
    yield
    with torch.no_grad():
        for bn, (mean0, var0) in zip(bns, before):
            an = (1 - bn.momentum) ** per_round
            growth = sum(an ** j for j in range(rounds))
            for buf, r0 in ((bn.running_mean.data, mean0), (bn.running_var.data, var0)):
                c = buf - an * r0
                buf.copy_(an ** rounds * r0 + growth * c)
            bn.num_batches_tracked.data.add_(per_round * (rounds - 1))


class StatsLedger:
    """Deferred running-statistic updates of one BatchNorm1d.

    While `recording`, `forward(bn, h)` normalizes h with its batch statistics exactly as a
    train-mode `bn(h)` does, without touching the running statistics, and appends the batch's
    (mean, unbiased var); `apply(bn, stats)` performs BatchNorm1d's updates for `stats` in order.
    """

    def __init__(self) -> None:
        self.entries: list[Stats] | None = None

    @property
    def recording(self) -> bool:
        return self.entries is not None

    @contextlib.contextmanager
    def record(self) -> Iterator[list[Stats]]:
        self.entries = []
        try:
            yield self.entries
        finally:
            self.entries = None

    def forward(self, bn: nn.BatchNorm1d, h: torch.Tensor) -> torch.Tensor:
        if self.entries is None or not bn.training:
            return bn(h)
        stats = h.detach().float()
        self.entries.append((stats.mean(0), stats.var(0, unbiased=True)))
        return F.batch_norm(h, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)

    @staticmethod
    def apply(bn: nn.BatchNorm1d, stats: Sequence[Stats]) -> None:
        if not stats or not bn.track_running_stats or bn.momentum is None:
            return
        m = bn.momentum
        with torch.no_grad():
            for mean, var in stats:
                bn.running_mean.data.mul_(1 - m).add_(mean.to(bn.running_mean.dtype), alpha=m)
                bn.running_var.data.mul_(1 - m).add_(var.to(bn.running_var.dtype), alpha=m)
            bn.num_batches_tracked.data.add_(len(stats))
