"""PGD (L-inf or L2) on input gradients only, with a pluggable objective.

`pgd` attacks one tensor or several at once: the objective receives the current adversarial
tensors and returns one scalar to ascend; each tensor steps along the sign of its own gradient
(L-inf) or along its gradient normalized per sample (L2). Attacks that want another direction
(AP-DPE's diversity term) pass `gradient`.

L2 (`norm="L2"`, per sample = per index of the first dimension): the uniform random start is
uniform in the L2 ball of radius eps (a Gaussian direction, radius eps * U^(1/d)); each step is
x + alpha * g / ||g||_2, then the perturbation is scaled back onto the ball (x + delta * min(1,
eps / ||delta||_2)) and clamped to [0,1] (which only shortens delta). L-inf is the default and
computes exactly what it did before `norm` existed.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bench.models.norm import bn_state
from bench.tf32 import strict_fp32
from bench.attacks.compiled import attack_step

Tensors = Sequence[torch.Tensor]
NORMS = ("Linf", "L2")
_TINY = 1e-12  # guards the per-sample divisions of L2 (a zero gradient or perturbation stays zero)


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, not {norm!r}")
    return norm


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample values (N,) shaped to broadcast against `like` (N, ...): (N, 1, 1, ...)."""
    return values.view(-1, *([1] * (like.dim() - 1)))


def l2_norms(t: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norms (over every dimension but the first)."""
    return t.flatten(1).norm(dim=1) if t.dim() > 1 else t.abs()


def perturbation_size(x_adv: torch.Tensor, x: torch.Tensor, norm: str = "Linf") -> float:
    """The largest per-sample perturbation in the norm (0 for no samples)."""
    if x_adv.numel() == 0:
        return 0.0
    delta = (x_adv - x).double()
    return float(delta.abs().max()) if norm == "Linf" else float(l2_norms(delta).max())


def _l2_ball(shape: torch.Size, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """Points uniform in the unit L2 ball, one per sample."""
    direction = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    direction = direction / _per_sample(l2_norms(direction).clamp_min(_TINY), direction)
    radius = torch.rand(shape[0], generator=generator, device=device, dtype=dtype)
    return direction * _per_sample(radius.pow(1.0 / max(1, direction[0].numel())), direction)


def _start(x: torch.Tensor, eps: float, random_start: str | None, clamp_start: bool,
           generator: torch.Generator | None, norm: str = "Linf") -> torch.Tensor:
    if random_start == "uniform" and norm == "L2":
        x_adv = x + eps * _l2_ball(x.shape, generator, x.device, x.dtype)
    elif random_start == "uniform":
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
        freeze: nn.Module | None = None, norm: str = "Linf"):
    """Return adversarial versions of `inputs` (same structure), detached, in [0,1] and the eps ball.

    `freeze`: the model under attack, whose parameters are frozen while the attack runs.
    `norm`: "Linf" (default) or "L2"; eps and alpha are radii in that norm.
    """
    check_norm(norm)
    with frozen_parameters(freeze) if freeze is not None else contextlib.nullcontext():
        return _pgd(objective, inputs, eps=eps, alpha=alpha, steps=steps, random_start=random_start,
                    clamp_start=clamp_start, generator=generator, gradient=gradient, norm=norm)


def _linf_step(a: torch.Tensor, g: torch.Tensor, x: torch.Tensor, eps: float, alpha: float) -> torch.Tensor:
    return torch.min(torch.max(a + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)


def _l2_step(a: torch.Tensor, g: torch.Tensor, x: torch.Tensor, eps: float, alpha: float) -> torch.Tensor:
    a = a + alpha * g / _per_sample(l2_norms(g).clamp_min(_TINY), g)
    delta = a - x
    scale = (eps / l2_norms(delta).clamp_min(_TINY)).clamp(max=1.0)
    return (x + delta * _per_sample(scale, delta)).clamp(0, 1)


def _pgd(objective, inputs, *, eps, alpha, steps, random_start, clamp_start, generator, gradient, norm="Linf"):
    single = isinstance(inputs, torch.Tensor)
    clean = [inputs] if single else list(inputs)
    clean = [x.detach() for x in clean]
    advs = [_start(x, eps, random_start, clamp_start, generator, norm) for x in clean]
    step = attack_step(_linf_step if norm == "Linf" else _l2_step)  # compiled under train.compile
    for _ in range(steps):
        advs = [a.detach().requires_grad_(True) for a in advs]
        with torch.enable_grad():
            if gradient is not None:
                grads = gradient(advs)
            else:
                grads = torch.autograd.grad(objective(advs), advs)
        with torch.no_grad():
            advs = [step(a, g, x, eps, alpha) for a, g, x in zip(advs, grads, clean)]
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
                      random_start: str | None = "uniform", norm: str = "Linf") -> torch.Tensor:
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
                   generator=generator, freeze=model, norm=norm)
