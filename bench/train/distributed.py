"""Data-parallel training with torch.distributed: one process per device, the global batch split.

A job started on N processes (`bench run --gpus-per-job N`; the launchers set the standard
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT) trains exactly what one process
would train on the whole batch, up to float rounding and per-process randomness:

- every process draws the same global batch (same order generator) and trains on its shard
  (`shard_sizes`: contiguous rows, sizes differing by at most one);
- gradients are averaged across processes after every backward (`DataParallel.reduce_gradients`),
  with each process's loss weighted by its shard's share of the batch, so the update is the
  gradient of the global batch's mean loss also when the shards differ in size;
- BatchNorm (`train.bn_devices = 0`, the default) normalizes with the statistics of the whole
  global batch: `torch.nn.functional.batch_norm` is replaced, for the run, by a synchronized
  version whose statistics are all-reduced (with their gradient), which covers every BatchNorm
  module and every direct `F.batch_norm` call (SyncBatchNorm's semantics, on CPU and GPU alike).
  `train.bn_devices = N` instead leaves each of the N processes to normalize its own shard (the
  official AdvCL and RoCL runs on N GPUs under DataParallel); running statistics then follow
  process 0, as DataParallel keeps its first replica's and DDP broadcasts them;
- contrastive losses see the global batch: `gather_rows` (called by `bench.losses`) concatenates
  every process's rows, its backward sums the gradients of all processes, so every negative of
  the global batch is a negative on every process (the official DataParallel codes compute the
  loss on the gathered outputs);
- model state (parameters and buffers) is broadcast from process 0 at the start and buffers after
  every step, so all processes hold identical models; only process 0 writes checkpoints and files.

Why not `torch.nn.parallel.DistributedDataParallel`: its gradient hooks synchronize only the
backward of a forward made through the wrapper, while methods call their submodules directly
(`model.encoder(x, branch)`, heads) and run attacks with extra input-gradient backwards; the
explicit all-reduce here needs no change to any method. It does not overlap communication with
the backward (one bucketed all-reduce after it), which costs little next to the attack steps.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bench.errors import BenchError

log = logging.getLogger(__name__)

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_ENV = "BENCH_DIST_TIMEOUT_S"  # seconds a collective may wait for the other processes
DEFAULT_TIMEOUT_S = 1800.0
BUCKET_ELEMENTS = 1 << 23  # gradients all-reduced in flat buckets of at most 8M elements


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel job (rank 0 of 1 when it runs alone)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.size, "backend": self.backend}


SINGLE = World()


def world_from_env(env: dict[str, str] | None = None) -> World:
    """The world the launcher started this process in (RANK, WORLD_SIZE, LOCAL_RANK), or SINGLE."""
    env = os.environ if env is None else env
    try:
        size = int(env.get("WORLD_SIZE") or 1)
        rank = int(env.get("RANK") or 0)
        local = int(env.get("LOCAL_RANK") or rank)
    except ValueError as exc:
        raise BenchError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {exc}") from None
    if size < 1 or not 0 <= rank < size:
        raise BenchError(f"RANK={rank} is not a rank of WORLD_SIZE={size}")
    return World(rank, size, local)


def current() -> World:
    """The initialized process group's world (SINGLE when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    local = world_from_env().local_rank
    return World(dist.get_rank(), dist.get_world_size(), local, str(dist.get_backend()))


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def timeout_s() -> float:
    try:
        return float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S)
    except ValueError:
        return DEFAULT_TIMEOUT_S


def init(device: torch.device | str) -> World:
    """Join the job's process group (NCCL on CUDA, gloo on CPU) if the launcher started several."""
    world = world_from_env()
    if not world.parallel:
        return SINGLE
    if not dist.is_initialized():
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise BenchError(f"WORLD_SIZE={world.size} but {', '.join(missing)} is not set")
        device = torch.device(device)
        options: dict[str, Any] = {}
        if device.type == "cuda":
            torch.cuda.set_device(device)
            options["device_id"] = device
        dist.init_process_group(backend_for(device.type), rank=world.rank, world_size=world.size,
                                timeout=timedelta(seconds=timeout_s()), **options)
    return current()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_sizes(batch: int, shards: int) -> list[int]:
    """`shards` sizes summing to `batch`, the first ones larger by one where it does not divide."""
    base, extra = divmod(batch, shards)
    return [base + (1 if i < extra else 0) for i in range(shards)]


# ---------------------------------------------------------------- collectives with gradients


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of every process's input is the sum of all output gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class _GatherRows(torch.autograd.Function):
    """Every process's rows in rank order; the backward sums the gradients and keeps this one's rows."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        rows = max(sizes)
        padded = tensor.new_zeros((rows, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None, None


@dataclass
class _Step:
    sizes: list[int]
    rank: int


_STEP: _Step | None = None  # set while a data-parallel training step runs


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The global batch's rows of a per-image tensor during a data-parallel step (this process's
    shard of `tensor` concatenated with the others', in rank order), else `tensor` itself.

    A tensor whose first dimension is not this process's shard size is not per image: returned as is.
    """
    step = _STEP
    if step is None or tensor.dim() == 0 or tensor.shape[0] != step.sizes[step.rank]:
        return tensor
    return _GatherRows.apply(tensor, step.sizes, step.rank)


# ---------------------------------------------------------------- synchronized BatchNorm

_plain_batch_norm = F.batch_norm


def synced_batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                      weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
                      momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """`F.batch_norm` whose train-mode statistics are those of every process's batch together.

    Statistics in float32, shifted by the running mean (identical on every process) for precision;
    the running statistics get the global mean and the unbiased global variance, as SyncBatchNorm.
    """
    if not training or _STEP is None:
        return _plain_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    channels = input.shape[1]
    dims = [0, *range(2, input.dim())]
    shape = [1, channels] + [1] * (input.dim() - 2)
    x = input if input.dtype == torch.float64 else input.float()  # float32 statistics under autocast
    shift = (running_mean.detach().to(x.dtype) if running_mean is not None
             else torch.zeros(channels, dtype=x.dtype, device=x.device)).view(shape)
    centered = x - shift
    count = torch.full((1,), x.numel() // max(1, channels), dtype=x.dtype, device=x.device)
    stats = _AllReduceSum.apply(torch.cat([centered.sum(dims), (centered * centered).sum(dims), count]))
    n = stats[-1]
    mean_shifted = stats[:channels] / n
    var = (stats[channels:2 * channels] / n - mean_shifted * mean_shifted).clamp_min(0.0)
    mean = mean_shifted + shift.view(-1)
    out = (x - mean.view(shape)) * torch.rsqrt(var + eps).view(shape)
    if weight is not None:
        out = out * weight.to(x.dtype).view(shape)
    if bias is not None:
        out = out + bias.to(x.dtype).view(shape)
    if running_mean is not None and running_var is not None and momentum:
        with torch.no_grad():
            unbiased = var.detach() * (n / (n - 1).clamp_min(1.0))
            running_mean.mul_(1 - momentum).add_(mean.detach().to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    return out.to(input.dtype)


@contextlib.contextmanager
def batchnorm_synchronized() -> Iterator[None]:
    """`torch.nn.functional.batch_norm` synchronized across processes for the duration (train-mode
    calls inside a data-parallel step; eval-mode calls and calls outside a step are unchanged)."""
    saved = F.batch_norm
    F.batch_norm = synced_batch_norm
    try:
        yield
    finally:
        F.batch_norm = saved


# ---------------------------------------------------------------- what the training loop uses


def _flat_buckets(tensors: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if bucket and (size + t.numel() > BUCKET_ELEMENTS or t.dtype != bucket[0].dtype
                       or t.device != bucket[0].device):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


def _all_reduce_flat(tensors: list[torch.Tensor], average_over: int = 1) -> None:
    """Sum (then divide by `average_over`) each tensor over processes, in flat buckets, in place."""
    for bucket in _flat_buckets(tensors):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat)
        if average_over > 1:
            flat.div_(average_over)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def _broadcast_flat(tensors: list[torch.Tensor]) -> None:
    for bucket in _flat_buckets(tensors):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.broadcast(flat, src=0)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


class DataParallel:
    """One training run's data parallelism on `world` (see the module doc)."""

    def __init__(self, world: World, model: nn.Module, parameters: Iterable[nn.Parameter], sync_bn: bool):
        self.world = world
        self.model = model
        self.parameters = [p for p in parameters if p.requires_grad]
        self.sync_bn = sync_bn
        self.device = next(model.parameters()).device
        self.broadcast_state()

    def describe(self) -> dict[str, Any]:
        return {**self.world.describe(), "batchnorm": "synchronized" if self.sync_bn else "per device"}

    # ------------------------------------------------------------ state

    def broadcast_state(self) -> None:
        """Process 0's parameters and buffers on every process."""
        with torch.no_grad():
            _broadcast_flat([t.data for t in self.model.state_dict(keep_vars=True).values()
                             if torch.is_tensor(t) and t.is_floating_point()])
            ints = [t.data for t in self.model.state_dict(keep_vars=True).values()
                    if torch.is_tensor(t) and not t.is_floating_point()]
            for t in ints:  # batch counters: a handful of scalars
                dist.broadcast(t, src=0)

    def broadcast_buffers(self) -> None:
        """Process 0's floating buffers (BatchNorm running statistics) on every process."""
        with torch.no_grad():
            _broadcast_flat([b.data for b in self.model.buffers() if b.is_floating_point()])

    # ------------------------------------------------------------ a step

    def shard(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        sizes = shard_sizes(x.shape[0], self.world.size)
        start = sum(sizes[: self.world.rank])
        rows = slice(start, start + sizes[self.world.rank])
        return x[rows], y[rows], index[rows], sizes

    @contextlib.contextmanager
    def step(self, sizes: list[int]) -> Iterator[None]:
        """A training step on this process's shard: global-batch BatchNorm (when synchronized) and
        global-batch contrastive losses (`gather_rows`)."""
        global _STEP
        _STEP = _Step(sizes, self.world.rank)
        try:
            with batchnorm_synchronized() if self.sync_bn else contextlib.nullcontext():
                yield
        finally:
            _STEP = None

    def loss_weight(self, sizes: list[int]) -> float:
        """What this process's loss is multiplied by before the backward: N n_r / B, so that the
        averaged gradient is the gradient of the global batch's mean."""
        return self.world.size * sizes[self.world.rank] / sum(sizes)

    def reduce_metrics(self, values: dict[str, torch.Tensor], sizes: list[int]) -> dict[str, float]:
        """The global batch's value of each step metric: the shard-size-weighted mean over processes."""
        names = sorted(values)
        share = sizes[self.world.rank] / sum(sizes)
        local = torch.stack([values[k].detach().double().reshape(()) for k in names]).to(self.device) * share
        dist.all_reduce(local)
        return dict(zip(names, local.tolist()))

    def reduce_gradients(self) -> None:
        """Average every trainable parameter's gradient over processes (a gradient missing on one
        process counts as zero there; a parameter no process computed a gradient for keeps none)."""
        has = torch.tensor([p.grad is not None for p in self.parameters], dtype=torch.float32, device=self.device)
        dist.all_reduce(has, op=dist.ReduceOp.MAX)
        grads = []
        for p, flag in zip(self.parameters, has.tolist()):
            if flag and p.grad is None:
                p.grad = torch.zeros_like(p)
            if flag:
                grads.append(p.grad)
        _all_reduce_flat(grads, average_over=self.world.size)
