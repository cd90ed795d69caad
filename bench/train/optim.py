"""Optimizers (SGD, LARS) and learning-rate schedules (warm-up, cosine, step)."""

from __future__ import annotations

import math

import torch

from bench.config import TrainConfig


class LARS(torch.optim.Optimizer):
    """SGD with momentum where each tensor's step is scaled by its trust ratio.

    local_lr = trust_coef * |w| / (|g| + wd * |w| + eps), applied to (g + wd * w), on every
    tensor (biases and BatchNorm included). Two official forms differ in where the learning rate
    enters, which matters whenever it changes (warm-up, cosine):

    - `lr_in_buffer=False` (torchlars, RoCL's optimizer): the scaled gradient goes into the
      momentum buffer and the step multiplies by the current lr:
      buf <- m buf + local_lr (g + wd w);  w <- w - lr buf.
      local_lr = 1 where |w| = 0 or |g| = 0; eps = 1e-8.
    - `lr_in_buffer=True` (ACL's `optimizer/lars.py`): the lr is inside the buffer, so past steps
      keep the lr they were taken at: buf <- m buf + lr local_lr (g + wd w);  w <- w - buf.
      local_lr = 1 where |w| < 1e-15 or |g| < 1e-15; no eps.

    With a constant lr the two are the same update. The buffer starts at zero (its first value
    is the first scaled gradient in both).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coef: float = 1e-3, eps: float | None = None, lr_in_buffer: bool = False):
        if eps is None:
            eps = 0.0 if lr_in_buffer else 1e-8
        self.lr_in_buffer = lr_in_buffer  # the form is the config's, not a resumed state's
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coef=trust_coef, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        in_buffer = self.lr_in_buffer
        for group in self.param_groups:
            floor = 1e-15 if in_buffer else 0.0  # |w|, |g| at or below it: local_lr = 1
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                w_norm, g_norm = torch.norm(p), torch.norm(grad)
                wd = group["weight_decay"]
                trust = group["trust_coef"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                if in_buffer:
                    scaled = (w_norm >= floor) & (g_norm >= floor)
                else:
                    scaled = (w_norm > floor) & (g_norm > floor)
                local_lr = torch.where(scaled, trust, torch.ones_like(trust))
                update = (grad + wd * p) * local_lr
                if in_buffer:
                    update = update * group["lr"]
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = update.clone()
                else:
                    buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-1.0 if in_buffer else -group["lr"])
        return loss


class SoloLARS(torch.optim.Optimizer):
    """solo-learn's LARS (vturrisi/solo-learn solo/utils/lars.py, the CIFAR SimCLR recipe's
    `--lars --grad_clip_lars --exclude_bias_n_norm`), its own class: the ACL/RoCL `LARS` differs.

    For each tensor with ndim != 1: local = eta |w| / (|g| + wd |w| + eps), clipped to
    min(local / lr, 1) with the group's current lr, g <- (g + wd w) local (skipped when |w| or |g|
    is 0); then SGD with momentum and no weight decay. Tensors with ndim = 1 (biases, BatchNorm)
    get neither the scaling nor weight decay. Momentum buffer: the first update, then
    buf <- momentum buf + update (dampening 0); w <- w - lr buf.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.02, eps: float = 1e-8, clip: bool = True, exclude_1d: bool = True):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, eps=eps,
                                      clip=clip, exclude_1d=exclude_1d))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            wd, lr = group["weight_decay"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim != 1 or not group["exclude_1d"]:
                    w_norm, g_norm = torch.norm(p), torch.norm(p.grad)
                    local = group["eta"] * w_norm / (g_norm + w_norm * wd + group["eps"])
                    if group["clip"] and lr > 0:
                        local = torch.clamp(local / lr, max=1.0)
                    scaled = (p.grad + wd * p) * local
                    update = torch.where((w_norm != 0) & (g_norm != 0), scaled, p.grad)
                if group["momentum"] != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = update.clone()
                    else:
                        buf.mul_(group["momentum"]).add_(update)
                    update = buf
                p.add_(update, alpha=-lr)
        return loss


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "solo_lars":  # SimCLR's solo-learn recipe (DeACL's teacher)
        return SoloLARS(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                        eta=getattr(cfg, "trust_coef", 0.02))
    if cfg.optimizer == "lars":
        return LARS(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                    trust_coef=getattr(cfg, "trust_coef", 1e-3),
                    lr_in_buffer=bool(getattr(cfg, "lars_lr_in_buffer", False)))
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.nesterov and cfg.momentum > 0)


def lr_at(cfg: TrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Learning rate at `step` of `epoch` (both from 0).

    Linear warm-up per iteration from `warmup_from` over `warmup_epochs`, then:
    cosine per iteration to `min_lr` over the remaining epochs, step decay by `gamma` at
    `decay_at` (fractions of `epochs`), or constant. Methods with other schedules override `Trainable.lr_at`.
    """
    progress = epoch + step / max(steps_per_epoch, 1)
    if progress < cfg.warmup_epochs:
        return cfg.warmup_from + (cfg.lr - cfg.warmup_from) * progress / cfg.warmup_epochs
    if cfg.schedule == "cosine":
        span = max(cfg.epochs - cfg.warmup_epochs, 1e-8)
        t = min((progress - cfg.warmup_epochs) / span, 1.0)
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t)) / 2
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** sum(epoch >= round(f * cfg.epochs) for f in cfg.decay_at)
    return cfg.lr


def supcon_lr(cfg: TrainConfig, epoch: int, step: int, steps: int) -> float:
    """AdvCL's schedule (the SupCon code it builds on): per-iteration warm-up, then cosine per epoch.

    The official loop counts epochs from 1: epoch e (from 0) after warm-up uses
    min_lr + (lr - min_lr)(1 + cos(pi (e+1) / epochs)) / 2; during the first `warmup_epochs` the
    rate rises linearly per iteration from `warmup_from` to the cosine value at `warmup_epochs`.
    """
    def cosine(e: float) -> float:
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * e / cfg.epochs)) / 2

    if epoch < cfg.warmup_epochs:
        progress = (epoch * steps + step) / (cfg.warmup_epochs * max(steps, 1))
        return cfg.warmup_from + progress * (cosine(cfg.warmup_epochs) - cfg.warmup_from)
    return cosine(epoch + 1)
