"""Per-shard BatchNorm statistics: what a model wrapped in `nn.DataParallel` over N GPUs computes.

DataParallel splits every forward's batch into N shards, one per GPU, and each replica's
BatchNorm normalizes its shard with that shard's own statistics (an unsynchronized BatchNorm;
AdvCL's apex SyncBatchNorm behaves this way under DataParallel because torch.distributed is never
initialized). Running statistics: DataParallel's replica on the first GPU shares its buffers
with the wrapped model, so an in-place update there is kept and the other replicas' updates
are discarded; the running statistics follow the first shard only. This module reproduces both
on one device, for the train-mode forwards inside `sharded_batchnorm(model, n)`.

Shards: `shard_sizes(b, n)`, n sizes that differ by at most one (DataParallel's scatter uses
`torch.chunk`, which agrees for every batch divisible by n, e.g. 512 = 2 x 256; a partial last
batch may be split 1 image differently).
"""

from __future__ import annotations

import contextlib
import types
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

BatchNorm = nn.modules.batchnorm._BatchNorm


def shard_sizes(batch: int, shards: int) -> list[int]:
    """`shards` sizes summing to `batch`, the first ones larger by one where it does not divide."""
    base, extra = divmod(batch, shards)
    return [base + (1 if i < extra else 0) for i in range(shards)]


def per_shard(bn: BatchNorm, x: torch.Tensor, shards: int,
              first: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Train-mode BatchNorm of x, each of `shards` shards normalized with its own batch statistics.

    The first shard goes through `first` (default: the module's own forward, which also updates
    the running statistics and the batch counter); the others are normalized without touching them.
    """
    if shards <= 1 or not bn.training:
        return (first or _original(bn))(x)
    sizes = [s for s in shard_sizes(x.shape[0], shards) if s > 0]
    parts = x.split(sizes)
    out = [(first or _original(bn))(parts[0])]
    out += [F.batch_norm(p, None, None, bn.weight, bn.bias, True, 0.0, bn.eps) for p in parts[1:]]
    return torch.cat(out)


def _original(bn: BatchNorm) -> Callable[[torch.Tensor], torch.Tensor]:
    return getattr(bn, "_unsharded_forward", bn.forward)


@contextlib.contextmanager
def sharded_batchnorm(model: nn.Module, shards: int, skip: tuple[nn.Module, ...] = ()) -> Iterator[None]:
    """Every BatchNorm of `model` (but `skip`) normalizes per shard in train mode (`per_shard`)."""
    if shards <= 1:
        yield
        return
    patched = [m for m in model.modules() if isinstance(m, BatchNorm) and not any(m is s for s in skip)]
    for bn in patched:
        bn._unsharded_forward = bn.forward
        bn.forward = types.MethodType(lambda self, x: per_shard(self, x, shards), bn)
    try:
        yield
    finally:
        for bn in patched:
            del bn.forward  # the instance attribute; the class's forward is back
            del bn._unsharded_forward
