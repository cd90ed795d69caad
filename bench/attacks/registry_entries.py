"""The evaluation attacks as ATTACKS registry entries (`bench list attacks`).

Each entry has the same shape: `attack(model, x, y, *, eps, seed, ...) -> bool tensor`, True where
the model still classifies the sample correctly after the attack. "autoattack" is registered
in `bench.attacks.autoattack`.
"""

from __future__ import annotations

import torch
from torch import nn

from bench.registry import ATTACKS


@ATTACKS.register("pgd")
def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 8 / 255, alpha: float = 2 / 255,
               steps: int = 20, seed: int = 0, restarts: int = 1, batch_size: int = 500,
               clamp_start: bool = False, norm: str = "Linf") -> torch.Tensor:
    """PGD in `norm` (Linf or L2; CE, uniform random start in the ball, fp32, eval mode, seeded
    restarts): per-sample robust flags. `eps` and `alpha` are in that norm (L2: e.g. 0.5 and 0.125)."""
    from bench.attacks.accuracy import pgd_correct, tensor_batches

    return pgd_correct(model, tensor_batches(x, y, batch_size), eps=eps, alpha=alpha, steps=steps, seed=seed,
                       restarts=restarts, clamp_start=clamp_start, norm=norm)
