"""TinyCL: a minimal contrastive method living outside bench (found through its entry point)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bench.augment import SIMCLR_VIEW, make_view
from bench.config import TrainConfig, param
from bench.losses import nt_xent
from bench.method import Method


def tinycl_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    return nt_xent(z1, z2, temperature)


class TinyModel(nn.Module):
    def __init__(self, encoder: nn.Module, out_dim: int = 32):
        super().__init__()
        self.encoder = encoder  # the backbone: what gets exported
        self.head = nn.Linear(encoder.feature_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class TinyCL(Method):
    """SimCLR views, a linear projection head, NT-Xent."""

    @dataclass
    class Config(TrainConfig):
        epochs: int = param(10, min=1)
        batch_size: int = param(256, min=2)
        lr: float = param(0.3, min=0.0)
        weight_decay: float = param(1e-4, min=0.0)
        temperature: float = param(0.5, min=1e-6)

    branches = ("normal",)
    encoder_branch = "normal"

    def build(self) -> nn.Module:
        return TinyModel(self.new_encoder())

    def training_step(self, x, y, index, info):
        z1, z2 = self.model(torch.cat([make_view(x, SIMCLR_VIEW), make_view(x, SIMCLR_VIEW)])).chunk(2)
        return {"loss": tinycl_loss(z1, z2, self.cfg.temperature)}
