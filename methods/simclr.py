"""SimCLR (non-adversarial) with AdvCL's views and schedule.

Two roles: a baseline row (what contrastive pretraining gives without any attack), and the
offline ClusterFit source of AdvCL's pseudo-labels (METHODS.md §1: a SimCLR model pretrained on
the same unlabeled data is within 0.4 points of the ImageNet one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bench.augment import SIMCLR_VIEW, make_view
from bench.config import TrainConfig, param
from bench.losses import nt_xent
from bench.method import Method
from bench.registry import METHODS
from bench.train import supcon_lr


def simclr_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent of two views' projections (rows i of z1 and z2 are the same image)."""
    return nt_xent(z1, z2, temperature)



class ProjectionHead(nn.Sequential):
    """Linear(d, d) -> BN1d -> ReLU -> Linear(d, 128), d = the encoder's feature size (512)."""

    def __init__(self, dim: int, out_dim: int = 128):
        super().__init__(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True), nn.Linear(dim, out_dim))


class ContrastiveModel(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = ProjectionHead(encoder.feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


@METHODS.register("simclr")
class SimCLR(Method):
    """SimCLR, no attack (baseline and AdvCL's ClusterFit source)."""

    @dataclass
    class Config(TrainConfig):
        epochs: int = param(1000, min=1)
        batch_size: int = param(512, min=2)
        lr: float = param(0.5, min=0.0)
        momentum: float = param(0.9, min=0.0, max=1.0)
        weight_decay: float = param(1e-4, min=0.0)
        warmup_epochs: int = param(10, min=0)
        warmup_from: float = param(0.01, min=0.0)
        min_lr: float = param(5e-4, min=0.0, help="eta_min of the per-epoch cosine")
        temperature: float = param(0.5, min=1e-6)

    branches = ("normal",)
    encoder_branch = "normal"
    normalize = "none"

    def build(self) -> nn.Module:
        return ContrastiveModel(self.new_encoder())

    def lr_at(self, epoch: int, step: int, steps: int) -> float:
        return supcon_lr(self.cfg, epoch, step, steps)

    def training_step(self, x, y, index, info):
        views = torch.cat([make_view(x, SIMCLR_VIEW), make_view(x, SIMCLR_VIEW)])
        z1, z2 = self.model(views).chunk(2)  # one forward: BN statistics over both views
        return {"loss": simclr_loss(z1, z2, self.cfg.temperature)}
