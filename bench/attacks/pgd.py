"""L-inf PGD on input gradients only, with a pluggable objective.

`pgd` attacks one tensor or several at once: the objective receives the current adversarial
tensors and returns one scalar to ascend; each tensor steps along the sign of its own gradient.
Attacks that want another direction (AP-DPE's diversity term) pass `gradient`.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bench.models.norm import bn_state
from bench.train.precision import strict_fp32

Tensors = Sequence[torch.Tensor]


def _start(x: torch.Tensor, eps: float, random_start: str | None, clamp_start: bool,
           generator: torch.Generator | None) -> torch.Tensor:
    if random_start == "uniform":
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        x_adv = x + eps * noise
    elif random_start == "normal":  # TRADES: x + 0.001 N(0, 1)
        x_adv = x + 0.001 * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    elif random_start is None:
        x_adv = x.clone()
    else:
        raise ValueError(f"random_start must be 'uniform', 'normal' or None, not {random_start!r}")
    return x_adv.clamp(0, 1) if clamp_start else x_adv


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """requires_grad off for every parameter, restored afterwards. Attacks need input gradients
    only: frozen weights spare the weight-gradient work of every attack backward (and FAB's
    backward() cannot fill their .grad)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def pgd(objective: Callable[[list[torch.Tensor]], torch.Tensor], inputs: torch.Tensor | Tensors, *,
        eps: float, alpha: float, steps: int, random_start: str | None = "uniform",
        clamp_start: bool = True, generator: torch.Generator | None = None,
        gradient: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
        freeze: nn.Module | None = None):
    """Return adversarial versions of `inputs` (same structure), detached, in [0,1] and the eps ball.

    `freeze`: the model under attack, whose parameters are frozen while the attack runs.
    """
    with frozen_parameters(freeze) if freeze is not None else contextlib.nullcontext():
        return _pgd(objective, inputs, eps=eps, alpha=alpha, steps=steps, random_start=random_start,
                    clamp_start=clamp_start, generator=generator, gradient=gradient)


def _pgd(objective, inputs, *, eps, alpha, steps, random_start, clamp_start, generator, gradient):
    single = isinstance(inputs, torch.Tensor)
    clean = [inputs] if single else list(inputs)
    clean = [x.detach() for x in clean]
    advs = [_start(x, eps, random_start, clamp_start, generator) for x in clean]
    for _ in range(steps):
        advs = [a.detach().requires_grad_(True) for a in advs]
        with torch.enable_grad():
            if gradient is not None:
                grads = gradient(advs)
            else:
                grads = torch.autograd.grad(objective(advs), advs)
        with torch.no_grad():
            advs = [torch.min(torch.max(a + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
                    for a, g, x in zip(advs, grads, clean)]
    advs = [a.detach() for a in advs]
    return advs[0] if single else advs


def ce_objective(model: nn.Module, y: torch.Tensor):
    return lambda advs: F.cross_entropy(model(advs[0]), y, reduction="sum")


def kl_objective(model: nn.Module, clean_logits: torch.Tensor):
    """TRADES' inner objective: KL(p_clean || p_adv), summed over the batch."""
    p_clean = F.softmax(clean_logits.detach(), dim=1)
    return lambda advs: F.kl_div(F.log_softmax(model(advs[0]), dim=1), p_clean, reduction="sum")


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Every submodule in eval mode for the duration, then each one's own mode restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


@contextlib.contextmanager
def eval_guard(model: nn.Module, check_bn: bool = True):
    """Eval mode, strict fp32 (no autocast, TF32 off for CUDA matmuls and cuDNN); restores the modes
    and the TF32 flags, and checks BN statistics afterwards."""
    before = bn_state(model) if check_bn else None
    device_type = next(model.parameters()).device.type
    with eval_mode(model), torch.autocast(device_type=device_type, enabled=False), strict_fp32():
        yield model
    if before is not None:
        after = bn_state(model)
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        if changed:
            raise RuntimeError(f"attack changed BatchNorm statistics: {changed[:3]}")


def attack_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                      alpha: float, steps: int, seed: int, objective: str = "ce",
                      random_start: str | None = "uniform") -> torch.Tensor:
    """Evaluation-grade PGD on a classifier: eval mode, fp32, seeded, BN statistics untouched."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    with eval_guard(model):
        x = x.float()
        if objective == "ce":
            obj = ce_objective(model, y)
        elif objective == "kl":
            with torch.no_grad():
                obj = kl_objective(model, model(x))
        else:
            raise ValueError(f"unknown objective {objective!r}")
        return pgd(obj, x, eps=eps, alpha=alpha, steps=steps, random_start=random_start,
                   generator=generator, freeze=model)
