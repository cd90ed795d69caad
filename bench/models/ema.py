"""Momentum (EMA) copies of a module, as MoCo-style key encoders use them (DynACL's `encoder_k`).

The copy's parameters are frozen (`requires_grad = False`, so `build_optimizer` leaves them
out) and follow the online module by `theta_k <- m theta_k + (1 - m) theta_q` over parameters
only: BatchNorm running statistics are not averaged, each copy keeps the statistics of its own
train-mode forwards. The copy lives inside the model, so it is checkpointed and resumed with it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` (parameters and buffers) whose parameters take no gradient."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def matched_parameters(ema: nn.Module, online: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ema, online) parameter pairs by name; the two modules must have the same structure."""
    ema_params, online_params = dict(ema.named_parameters()), dict(online.named_parameters())
    if ema_params.keys() != online_params.keys():
        missing = sorted(set(ema_params) ^ set(online_params))[:3]
        raise ValueError(f"EMA copy and online module differ in parameters: {missing}")
    return [(ema_params[name], online_params[name]) for name in ema_params]


@torch.no_grad()
def ema_update_(pairs: list[tuple[torch.Tensor, torch.Tensor]], momentum: float) -> None:
    """theta_k <- momentum * theta_k + (1 - momentum) * theta_q for every (theta_k, theta_q) pair."""
    for k, q in pairs:
        k.copy_(k * momentum + q * (1.0 - momentum))
