"""The training loop shared by every pretrainer and finetuner.

Deterministic resume: the data order and the global RNG are reseeded from (seed, epoch) at
every epoch start, and checkpoints are written at epoch ends (with the fp16 loss scaler's state),
so a run resumed from a checkpoint continues exactly as an uninterrupted run would.

Epoch-level data selection (RCS, random; `bench.selection`): after the reseed the loop asks the
task for the epoch's images (`Trainable.epoch_data`); the epoch then runs on that subset, its
steps counted from the subset, and the selector's state is part of the checkpoint.

Precision (`cfg.precision`, `bench.train.precision`): fp32 by default (TF32 off on CUDA for the
whole run); bf16/fp16 autocast around each step's forward, fp16 with a GradScaler.

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
from typing import Any, Callable, Iterable

import torch
from torch import nn

from bench import files
from bench.config import TrainConfig
from bench.datasets import ImageSet, batches, steps_per_epoch
from bench.errors import BenchError, NonFiniteLoss
from bench.train.optim import build_optimizer, lr_at
from bench.train.precision import resolve_precision

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


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


def fit(task: Trainable, data: ImageSet, *, seed: int, workdir: Path | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        stop_after_epoch: int | None = None) -> list[dict[str, float]]:
    """Train `task` on `data` for `task.cfg.epochs` epochs, resuming from `workdir` if it holds a checkpoint.

    Returns the per-epoch history (mean of each step metric, plus `end_epoch` metrics).
    `stop_after_epoch` ends early after that many epochs (used to test resume).
    """
    cfg = task.cfg
    device = next(task.model.parameters()).device
    precision = resolve_precision(device, getattr(cfg, "precision", "fp32"))
    optimizer = build_optimizer(task.trainable_parameters(), cfg)
    scaler = precision.scaler()
    drop_last = drops_last(task)
    steps = full_steps = epoch_steps(len(data), cfg.batch_size, drop_last, cfg.steps_per_epoch,
                                     task.min_batch_size())
    if steps == 0:
        raise BenchError(f"no training steps: {len(data)} images with batch size {cfg.batch_size}")
    history: list[dict[str, float]] = []
    start_epoch = 0
    global_step = 0
    ckpt_path = Path(workdir) / CHECKPOINT if workdir else None
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
        start_epoch = int(state["epoch"])
        global_step = int(state.get("global_step", start_epoch * steps))
        log.info("resumed from %s at epoch %d", ckpt_path, start_epoch)
    last_epoch = cfg.epochs if stop_after_epoch is None else min(cfg.epochs, stop_after_epoch)
    with precision.training():  # TF32 on/off for the whole run (forward and backward)
        for epoch in range(start_epoch, last_epoch):
            torch.manual_seed(epoch_seed(seed, epoch))
            order = torch.Generator().manual_seed(epoch_seed(seed, epoch) + 1)
            epoch_set, selection_log = epoch_images(task, data, epoch)
            steps = full_steps
            if epoch_set is not data:
                steps = epoch_steps(len(epoch_set), cfg.batch_size, drop_last, cfg.steps_per_epoch,
                                    task.min_batch_size())
                if steps == 0:
                    raise BenchError(f"epoch {epoch + 1}: the selected {len(epoch_set)} images give no training steps")
            task.train_mode()
            sums: dict[str, float] = {}
            for step, (x, y, index) in enumerate(batches(epoch_set, cfg.batch_size, shuffle=True, generator=order,
                                                         drop_last=drop_last, max_steps=steps)):
                lr = task.lr_at(epoch, step, steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                info = StepInfo(epoch, step, global_step, steps, lr)
                global_step += 1
                with precision.autocast():
                    out = task.training_step(x, y, index, info)
                loss = out["loss"]
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise NonFiniteLoss(f"loss became {value} at epoch {epoch + 1}, step {step + 1} "
                                        f"(lr {lr:.4g}); lower the learning rate or check the inputs")
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:  # fp16: scaled backward; the step is skipped on inf/NaN gradients
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                if on_progress:
                    on_progress({"epoch": epoch + 1, "epochs": cfg.epochs, "step": step + 1, "steps": steps,
                                 "loss": value, "lr": lr})
            record = {k: v / steps for k, v in sums.items()}
            record.update(selection_log)
            record.update(task.end_epoch(epoch))
            record["epoch"] = epoch + 1
            history.append(record)
            done = epoch + 1
            if ckpt_path and (done % cfg.checkpoint_every == 0 or done == cfg.epochs):
                state = {"epoch": done, "model": task.model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict() if scaler is not None else None,
                         "extra": task.extra_state(), "history": history, "global_step": global_step}
                if task.selector is not None:
                    state["selection"] = task.selector.state_dict()
                files.write_torch(ckpt_path, state)
    return history
