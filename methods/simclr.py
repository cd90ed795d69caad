"""SimCLR (non-adversarial) with AdvCL's views and schedule, or solo-learn's CIFAR recipe.

Three roles: a baseline row (what contrastive pretraining gives without any attack), the offline
ClusterFit source of AdvCL's pseudo-labels (docs/methods.md §1: a SimCLR model pretrained on the same
unlabeled data is within 0.4 points of the ImageNet one), and DeACL's teacher (deacl.md §1).

`recipe` selects what the other settings cannot express:

- `advcl` (default): SIMCLR_VIEW views, projection head Linear(d, d) -> BN -> ReLU ->
  Linear(d, 128), one forward of both views (BatchNorm statistics over the 2B images),
  AdvCL's schedule (`supcon_lr`).
- `solo` (vturrisi/solo-learn@de9b927 bash_files/pretrain/cifar/simclr.sh): SOLO_VIEW views
  (bicubic RandomResizedCrop scale 0.08-1, ColorJitter(0.8, 0.8, 0.8, 0.2) p 0.8, Grayscale 0.2,
  HFlip), projector Linear(d, 2048) -> ReLU -> Linear(2048, 256) without BatchNorm, one forward
  per view (solo-learn's `training_step` forwards each crop alone), per-epoch linear warm-up then
  cosine (`linear_warmup_cosine_lr`, Lightning-bolts' LinearWarmupCosineAnnealingLR), and the
  architecture of solo-learn's CIFAR ResNet as this method's own encoder options (stem padding 2;
  CIFAR-10 mean/std inside the model where solo-learn normalizes in the pipeline).
  Its hyperparameters are settings like any other: `SOLO_RECIPE` holds them all (t = 0.2,
  solo-learn's LARS with eta 0.02, lr 0.4, wd 1e-5, warm-up from 0.003 over 10 epochs to
  eta_min 0, 1000 epochs, batch 256); DeACL's teacher dependency sets them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import math

from bench.augment import SIMCLR_VIEW, ViewRecipe, make_view
from bench.config import TrainConfig, param
from bench.losses import nt_xent
from bench.method import Method
from bench.registry import METHODS
from bench.train import supcon_lr

RECIPES = ("advcl", "solo")
# solo-learn's CifarTransform with the script's settings (no blur, no solarization).
SOLO_VIEW = ViewRecipe(crop_scale=(0.08, 1.0), crop_interpolation="bicubic", jitter=(0.8, 0.8, 0.8, 0.2),
                       jitter_p=0.8, grayscale_p=0.2)
# Every setting of solo-learn's CIFAR SimCLR (deacl.md §1); lr 0.4 x batch / 256 on one GPU = 0.4.
SOLO_RECIPE = {"recipe": "solo", "epochs": 1000, "batch_size": 256, "optimizer": "solo_lars", "lr": 0.4,
               "momentum": 0.9, "weight_decay": 1e-5, "trust_coef": 0.02, "warmup_epochs": 10,
               "warmup_from": 0.003, "min_lr": 0.0, "temperature": 0.2}


def simclr_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent of two views' projections (rows i of z1 and z2 are the same image)."""
    return nt_xent(z1, z2, temperature)



class ProjectionHead(nn.Sequential):
    """Linear(d, d) -> BN1d -> ReLU -> Linear(d, 128), d = the encoder's feature size (512)."""

    def __init__(self, dim: int, out_dim: int = 128):
        super().__init__(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True), nn.Linear(dim, out_dim))


class SoloProjector(nn.Sequential):
    """solo-learn's SimCLR projector: Linear(d, 2048) -> ReLU -> Linear(2048, 256), no BatchNorm."""

    def __init__(self, dim: int, hidden: int = 2048, out_dim: int = 256):
        super().__init__(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


class ContrastiveModel(nn.Module):
    def __init__(self, encoder: nn.Module, head: nn.Module | None = None):
        super().__init__()
        self.encoder = encoder
        self.head = head if head is not None else ProjectionHead(encoder.feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def linear_warmup_cosine_lr(lr: float, epoch: int, warmup_epochs: int, epochs: int, warmup_from: float,
                            min_lr: float = 0.0) -> float:
    """Per-epoch LinearWarmupCosineAnnealingLR (Lightning-bolts, as solo-learn and DeACL step it).

    Epoch e < warmup: warmup_from + e (lr - warmup_from) / (warmup - 1) (lr is reached at epoch
    warmup - 1); then min_lr + (lr - min_lr)(1 + cos(pi (e - warmup) / (epochs - warmup))) / 2.
    """
    if epoch < warmup_epochs:
        return warmup_from + epoch * (lr - warmup_from) / max(1, warmup_epochs - 1)
    span = max(epochs - warmup_epochs, 1)
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * (epoch - warmup_epochs) / span)) / 2


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
        recipe: str = param("advcl", choices=RECIPES,
                            help="advcl: AdvCL's views/head/schedule; solo: solo-learn's CIFAR recipe "
                                 "(views, projector, per-view forwards, per-epoch warm-up cosine; its "
                                 "hyperparameters: methods.simclr.SOLO_RECIPE)")
        optimizer: str = param("sgd", choices=("sgd", "lars", "solo_lars"))
        trust_coef: float = param(1e-3, min=0.0, help="LARS trust coefficient (eta; solo-learn's recipe: 0.02)")

    branches = ("normal",)
    encoder_branch = "normal"
    normalize = "none"
    stem_padding = 1

    def __init__(self, cfg, ctx):
        if cfg.recipe == "solo":  # solo-learn's CIFAR ResNet is this recipe's own architecture
            self.normalize, self.stem_padding = "cifar10", 2
        # SupCon's loader (AdvCL's SimCLR) keeps the last partial batch, solo-learn's drops it
        self.drop_last = cfg.recipe == "solo"
        super().__init__(cfg, ctx)

    def build(self) -> nn.Module:
        encoder = self.new_encoder()
        if self.cfg.recipe == "solo":
            return ContrastiveModel(encoder, SoloProjector(encoder.feature_dim))
        return ContrastiveModel(encoder)

    def lr_at(self, epoch: int, step: int, steps: int) -> float:
        c = self.cfg
        if c.recipe == "solo":
            return linear_warmup_cosine_lr(c.lr, epoch, c.warmup_epochs, c.epochs, c.warmup_from, c.min_lr)
        return supcon_lr(c, epoch, step, steps)

    def training_step(self, x, y, index, info):
        if self.cfg.recipe == "solo":
            z1, z2 = (self.model(make_view(x, SOLO_VIEW)) for _ in range(2))  # one forward per view
            return {"loss": simclr_loss(z1, z2, self.cfg.temperature)}
        views = torch.cat([make_view(x, SIMCLR_VIEW), make_view(x, SIMCLR_VIEW)])
        z1, z2 = self.model(views).chunk(2)  # one forward: BN statistics over both views
        return {"loss": simclr_loss(z1, z2, self.cfg.temperature)}
