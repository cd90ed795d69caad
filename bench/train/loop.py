"""The training loop shared by every pretrainer and finetuner.

Deterministic resume: the data order and the global RNG are reseeded from (seed, epoch) at
every epoch start, and checkpoints are written at epoch ends (with the fp16 loss scaler's state),
so a run resumed from a checkpoint continues exactly as an uninterrupted run would.

Epoch-level data selection (RCS, random; `bench.selection`): after the reseed the loop asks the
task for the epoch's images (`Trainable.epoch_data`); the epoch then runs on that subset, its
steps counted from the subset, and the selector's state is part of the checkpoint.

Precision (`cfg.precision`, `bench.train.precision`): fp32 by default (TF32 off on CUDA for the
whole run); bf16/fp16 autocast around each step's forward, fp16 with a GradScaler.

Data parallelism (`bench.train.distributed`): on N processes each trains on its shard of the
global batch, with gradients averaged and BatchNorm synchronized (or per device with
`bn_devices = N`); only process 0 writes the checkpoint and the curves, every process resumes
from it. Fast paths (`bench.train.fastpath`): channels-last, cudnn.benchmark, torch.compile.
Curves (`bench.train.logbook`): history.csv and TensorBoard events in the workdir.

Last batch: with `drop_last = False` (the official loaders of most methods) the final partial
batch is trained on, unless it is smaller than `min_batch_size()` (2: a train-mode BatchNorm1d
cannot normalize one sample), in which case that one final batch is dropped.
"""

from __future__ import annotations

import abc
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from bench import files
from bench.config import TrainConfig
from bench.datasets import ImageSet, batches, steps_per_epoch
from bench.errors import BenchError, NonFiniteLoss
from bench.train import distributed, fastpath, logbook
from bench.train.optim import build_optimizer, lr_at
from bench.train.precision import Precision, resolve_precision

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
RANK_SEED = 104_729  # offset of each process's random stream (process 0: the single-process stream)


@dataclass
class StepInfo:
    epoch: int
    step: int
    global_step: int
    steps_per_epoch: int
    lr: float


class Trainable(abc.ABC):
    """What the loop trains. Subclasses set `cfg` and `model` and implement `training_step`."""

    cfg: TrainConfig
    model: nn.Module
    drop_last: bool = True
    selector: Any = None  # an epoch-level data selector (bench.selection); None trains on the whole pool
    run_info: dict[str, Any] = {}  # how the last `fit` ran (processes, BatchNorm, fast paths), set by it

    @abc.abstractmethod
    def training_step(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
                      info: StepInfo) -> dict[str, torch.Tensor]:
        """Return a dict with at least 'loss' (the scalar to minimize)."""

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return self.model.parameters()

    def min_batch_size(self) -> int:
        """The smallest final partial batch trained on (smaller ones are dropped, see the module doc)."""
        return 2

    def train_mode(self) -> None:
        self.model.train()

    def lr_at(self, epoch: int, step: int, steps: int) -> float:
        return lr_at(self.cfg, epoch, step, steps)

    def end_epoch(self, epoch: int) -> dict[str, float]:
        """Hook after each epoch (e.g. validation for model selection); returns metrics to log."""
        return {}

    def epoch_data(self, epoch: int, pool: ImageSet) -> torch.Tensor | None:
        """Positions in `pool` of the images to train on in `epoch` (from 0), or None for all of them.

        Called after the epoch's reseed; the default asks `selector`. A task that overrides it
        keeps whatever state it needs in `extra_state`.
        """
        return None if self.selector is None else self.selector.select(self, epoch, pool)

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**63)


def drops_last(task: Trainable) -> bool:
    """Whether the task's epochs drop a final partial batch (`last_batch`; official = its class's choice)."""
    choice = getattr(task.cfg, "last_batch", "official")
    return task.drop_last if choice == "official" else choice == "drop"


def epoch_steps(n: int, batch_size: int, drop_last: bool, max_steps: int = 0, min_batch: int = 2) -> int:
    """Steps per epoch of `fit`: `steps_per_epoch`, less a final partial batch under `min_batch` images."""
    steps = steps_per_epoch(n, batch_size, drop_last)
    if steps and n - (steps - 1) * batch_size < min_batch:
        steps -= 1
    return min(steps, max_steps) if max_steps else steps


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The training checkpoint, or None (with a warning) when it is damaged: it only saves time, so a
    damaged one restarts the job from its first epoch instead of failing it."""
    try:
        state = files.read_torch(path)
        if not isinstance(state, dict) or not {"epoch", "model", "optimizer"} <= set(state):
            raise BenchError(f"{path} is not a training checkpoint")
        return state
    except BenchError as exc:
        log.warning("ignoring the damaged checkpoint %s (%s): training starts from the first epoch", path, exc)
        return None


def epoch_images(task: Trainable, data: ImageSet, epoch: int) -> tuple[ImageSet, dict[str, float]]:
    """The epoch's training images (`task.epoch_data`) and what to log about them (size, selection time)."""
    started = time.perf_counter()
    chosen = task.epoch_data(epoch, data)
    if chosen is None and task.selector is None:
        return data, {}
    if data.y.device.type == "cuda":
        torch.cuda.synchronize(data.y.device)
    seconds = time.perf_counter() - started
    subset = data if chosen is None else data.subset(torch.as_tensor(chosen, dtype=torch.long).to(data.y.device))
    log.info("epoch %d: training on %d of %d images (selection %.2f s)", epoch + 1, len(subset), len(data), seconds)
    return subset, {"train_images": float(len(subset)), "selection_s": seconds}


def check_world(cfg: TrainConfig, world: distributed.World) -> None:
    """BenchError where the settings cannot run on `world`'s processes."""
    bn_devices = getattr(cfg, "bn_devices", 0)
    if bn_devices and bn_devices != world.size:
        raise BenchError(f"bn_devices={bn_devices} asks for the BatchNorm statistics of {bn_devices} unsynchronized "
                         f"devices, but this job runs on {world.size} process(es): run it with --gpus-per-job "
                         f"{bn_devices}, or set bn_devices=0 (statistics of the whole batch)")
    if world.parallel and getattr(cfg, "bn_shards", 1) > 1:
        raise BenchError(f"bn_shards={cfg.bn_shards} emulates per-GPU BatchNorm on one device; on {world.size} "
                         f"processes use bn_devices={world.size} (and bn_shards=1) instead")
    if world.parallel and cfg.batch_size < world.size:
        raise BenchError(f"batch size {cfg.batch_size} cannot be split over {world.size} processes")


def fit(task: Trainable, data: ImageSet, *, seed: int, workdir: Path | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        stop_after_epoch: int | None = None,
        epoch_hooks: Sequence[Callable[[Trainable, int], dict[str, float]]] = (),
        precision: Precision | None = None) -> list[dict[str, float]]:
    """Train `task` on `data` for `task.cfg.epochs` epochs, resuming from `workdir` if it holds a checkpoint.

    Returns the per-epoch history (mean of each step metric, plus `end_epoch` metrics, the epoch's
    last learning rate, and what `epoch_hooks` return: process 0 only). With `workdir`, the
    history and each epoch's throughput are also written as CSV and TensorBoard curves
    (`bench.train.logbook`).
    `stop_after_epoch` ends early after that many epochs (used to test resume). On several
    processes (`bench.train.distributed`) every process calls this with the same arguments.
    `task.run_info` says afterwards how it ran: processes, BatchNorm, fast paths.
    """
    cfg = task.cfg
    device = next(task.model.parameters()).device
    precision = precision or resolve_precision(device, getattr(cfg, "precision", "fp32"))
    world = distributed.current()
    check_world(cfg, world)
    per_device_bn = bool(getattr(cfg, "bn_devices", 0))
    min_batch = task.min_batch_size() * (world.size if per_device_bn else 1)
    min_batch = max(min_batch, world.size)  # every process gets at least one image
    drop_last = drops_last(task)
    steps = full_steps = epoch_steps(len(data), cfg.batch_size, drop_last, cfg.steps_per_epoch, min_batch)
    if steps == 0:
        raise BenchError(f"no training steps: {len(data)} images with batch size {cfg.batch_size}")
    history: list[dict[str, float]] = []
    timings: list[dict[str, float]] = []  # per epoch: seconds and images/s (the curves', not the history's)
    start_epoch = 0
    global_step = 0
    ckpt_path = Path(workdir) / CHECKPOINT if workdir else None
    with fastpath.fast_paths(task.model, cfg, device) as fast:
        optimizer = build_optimizer(task.trainable_parameters(), cfg)
        scaler = precision.scaler()
        state = load_checkpoint(ckpt_path) if ckpt_path and ckpt_path.is_file() else None
        if state is not None:
            task.model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            task.load_extra_state(state.get("extra", {}))
            if task.selector is not None and "selection" in state:
                task.selector.load_state_dict(state["selection"])
            history = list(state.get("history", []))
            timings = list(state.get("timings") or [{} for _ in history])
            start_epoch = int(state["epoch"])
            global_step = int(state.get("global_step", start_epoch * steps))
            log.info("resumed from %s at epoch %d", ckpt_path, start_epoch)
        parallel = (distributed.DataParallel(world, task.model, task.trainable_parameters(), sync_bn=not per_device_bn)
                    if world.parallel else None)
        task.run_info = {**(parallel.describe() if parallel else {**world.describe(), "batchnorm": "single device"}),
                         **fast}
        writing = ckpt_path is not None and world.main
        curves = logbook.EpochLog(Path(workdir), start_epoch) if writing else None
        last_epoch = cfg.epochs if stop_after_epoch is None else min(cfg.epochs, stop_after_epoch)
        try:
            with precision.training():  # TF32 on/off for the whole run (forward and backward)
                for epoch in range(start_epoch, last_epoch):
                    # the same data order everywhere; each process its own stream of random draws
                    # (views, attack starts), process 0's being the single-process one
                    torch.manual_seed((epoch_seed(seed, epoch) + RANK_SEED * world.rank) % (2**63))
                    order = torch.Generator().manual_seed(epoch_seed(seed, epoch) + 1)
                    epoch_set, selection_log = epoch_images(task, data, epoch)
                    steps = full_steps
                    if epoch_set is not data:
                        steps = epoch_steps(len(epoch_set), cfg.batch_size, drop_last, cfg.steps_per_epoch,
                                            min_batch)
                        if steps == 0:
                            raise BenchError(f"epoch {epoch + 1}: the selected {len(epoch_set)} images give no "
                                             "training steps")
                    task.train_mode()
                    sums: dict[str, float] = {}
                    images = 0
                    lr = 0.0
                    started = time.perf_counter()
                    for step, (x, y, index) in enumerate(batches(epoch_set, cfg.batch_size, shuffle=True,
                                                                 generator=order, drop_last=drop_last,
                                                                 max_steps=steps)):
                        lr = task.lr_at(epoch, step, steps)
                        for group in optimizer.param_groups:
                            group["lr"] = lr
                        info = StepInfo(epoch, step, global_step, steps, lr)
                        global_step += 1
                        images += x.shape[0]
                        if parallel is None:
                            with precision.autocast():
                                out = task.training_step(x, y, index, info)
                            loss = out["loss"]
                            values = {k: float(v.detach()) for k, v in out.items()}
                        else:
                            x, y, index, sizes = parallel.shard(x, y, index)
                            with parallel.step(sizes):
                                with precision.autocast():
                                    out = task.training_step(x, y, index, info)
                                loss = out["loss"] * parallel.loss_weight(sizes)
                                values = parallel.reduce_metrics(out, sizes)
                        value = values["loss"]
                        if not math.isfinite(value):
                            raise NonFiniteLoss(f"loss became {value} at epoch {epoch + 1}, step {step + 1} "
                                                f"(lr {lr:.4g}); lower the learning rate or check the inputs")
                        optimizer.zero_grad(set_to_none=True)
                        if parallel is None:
                            _backward_and_step(loss, optimizer, scaler)
                        else:  # the backward all-reduces through the synchronized BatchNorms and gathers
                            _backward_and_step(loss, optimizer, scaler, parallel.reduce_gradients)
                            parallel.broadcast_buffers()
                        for k, v in values.items():
                            sums[k] = sums.get(k, 0.0) + v
                        if on_progress and world.main:
                            on_progress({"epoch": epoch + 1, "epochs": cfg.epochs, "step": step + 1, "steps": steps,
                                         "loss": value, "lr": lr})
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    seconds = time.perf_counter() - started
                    record = {k: v / steps for k, v in sums.items()}
                    record.update(selection_log)
                    record.update(task.end_epoch(epoch))
                    record["lr"] = lr
                    if world.main:
                        for hook in epoch_hooks:
                            record.update(hook(task, epoch))
                    record["epoch"] = epoch + 1
                    history.append(record)
                    # timings go to the curves only: a history is a function of the job's key
                    timings.append({"epoch_seconds": seconds, "images_per_s": images / max(seconds, 1e-9)})
                    done = epoch + 1
                    if writing and (done % cfg.checkpoint_every == 0 or done == cfg.epochs):
                        state = {"epoch": done, "model": task.model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "scaler": scaler.state_dict() if scaler is not None else None,
                                 "extra": task.extra_state(), "history": history, "global_step": global_step,
                                 "timings": timings}
                        if task.selector is not None:
                            state["selection"] = task.selector.state_dict()
                        files.write_torch(ckpt_path, state)
                    if curves is not None:
                        curves.write([{**h, **t} for h, t in zip(history, timings)])
        finally:
            if curves is not None:
                curves.close()
    return history


def _backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: Any,
                       reduce: Callable[[], None] | None = None) -> None:
    """Backward, the gradients averaged over processes (`reduce`), then the optimizer step; fp16:
    scaled backward, the step skipped on inf/NaN gradients (found on every process alike, since
    the averaged gradients are the same everywhere)."""
    if scaler is not None:
        scaler.scale(loss).backward()
        if reduce is not None:
            reduce()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if reduce is not None:
            reduce()
        optimizer.step()
