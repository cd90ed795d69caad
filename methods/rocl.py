"""RoCL (Kim et al., NeurIPS 2020), per docs/methods.md §3.

ResNet-18 without input normalization and with one BatchNorm set; projector
Linear(d, 2048) -> ReLU -> Linear(2048, 128), no BatchNorm (d = 512 at width 64).

One training step:

- views t1, t2 = ROCL_VIEW in the official order (`data_loader.py`): ColorJitter(0.4, 0.4, 0.4,
  0.1) p=0.8 -> Gray p=0.2 -> HFlip -> RandomResizedCrop(32, scale 0.08-1);
- instance-wise attack: start at t1 + U(-eps, eps) clamped to [0, 1]; 7 PGD steps, eps 0.0314,
  alpha 0.007, ascending NT-Xent(x_adv, t2; t=0.5) with the encoder AND the projector in eval
  mode (running statistics, none updated; every module's mode is restored afterwards); input
  gradients only. t2's features are computed once: in eval mode they cannot change while x_adv
  moves, so this equals re-forwarding [x_adv; t2] at every step as the official code does;
- loss = NTXent_3([t1, t2, x_adv]; t=0.5), one train-mode forward of the 3N images, each anchor
  summing its two positive terms over the full 3N-1 denominator (the official 'Rep' form,
  `multiview_nt_xent(..., sum_positives=True)`), plus the regularizer
  (1/256) * NTXent_2([x_adv, t2]; t=0.5), a separate train-mode forward of the 2N images
  (official `lamda` = 256, `regularize_to = 'other'`, i.e. t2).

Similarity: the official `pairwise_similarity` computes z @ z.T.detach(): only the anchor
operand carries gradient, which halves the gradient of a symmetric loss. It is the default
(`detach_keys = True`), used by the loss, the regularizer and the attack objective alike;
`detach_keys = false` gives the exact gradient of the same loss values.

Batch: the attack and the regularizer run over the whole batch (512 images: x_adv's NT-Xent
negatives are the other 511 images); in the official 2-GPU DistributedDataParallel run each GPU
attacks and regularizes its own 256 images (`RepresentationAdv.get_loss` with multi_gpu=False),
while the main loss gathers both GPUs' outputs (and SyncBatchNorm gives BatchNorm the full 512).
docs/fidelity.md has the row.

Optimizer: torchlars LARS (trust coefficient 1e-3, eps 1e-8, the lr outside the momentum buffer:
`lars_lr_in_buffer = False`) around SGD(lr 0.1, momentum 0.9, weight decay 1e-6), batch 512
(256 per GPU on the official 2 GPUs), 1000 epochs. Schedule (`lr_at`, per epoch, the official
GradualWarmupScheduler(multiplier=15, total_epoch=10) + CosineAnnealingLR(T_max=epochs), stepped
at the *start* of each epoch, after the constructors' own initial step): epoch e < 10 trains at
lr_e = lr * (1 + (15 - 1)(e + 1) / 10) (0.24 at epoch 0, the 15x peak 1.5 at epoch 9), epoch 10
at the peak again (the cosine's first value), then lr_e = 15 lr * (1 + cos(pi (e - 10) / epochs)) / 2.
The official cosine keeps T_max = epochs although it starts after the warm-up, so the last epoch
still has ~2.5e-4 of the peak. (That is the warm-up scheduler whose `get_lr` returns the cosine's
`get_lr()`; the later pytorch-gradual-warmup-lr release returning `get_last_lr()` would restart
the cosine from the base lr 0.1 at epoch 10. RoCL ships only the compiled scheduler, so which one
ran cannot be read; docs/fidelity.md.)

Pretraining data: the whole training split with the last partial batch kept (the official
DistributedSampler + DataLoader drop nothing).

Downstream encoder: the backbone (its only BatchNorm set).

A-InfoNCE on RoCL (ainfonce.md §7) is the option set `ainfonce_*` (methods/asymmetric_infonce.py):
it replaces the 3-view loss (the attack and the regularizer keep plain NT-Xent);
`ainfonce_variant = "none"` (default) leaves RoCL unchanged.

Its own paper evaluates with PGD-20 at alpha = eps/10; the harness protocol (docs/methods.md §6,
alpha 2/255) overrides this for every method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from bench.attacks import eval_mode, pgd
from bench.config import TrainConfig, param
from bench.losses import multiview_nt_xent
from bench.method import Method
from bench.registry import METHODS
from methods.asymmetric_infonce import AInfoNCELossSettings, rocl_ainfonce_loss


# ---------------------------------------------------------------- losses and schedule (plain functions)


def rocl_loss(z1: torch.Tensor, z2: torch.Tensor, z_adv: torch.Tensor, temperature: float = 0.5, *,
              detach_keys: bool = True) -> torch.Tensor:
    """RoCL's 'Rep' loss: 3-view NT-Xent over [t1, t2, x_adv], positive terms summed per anchor."""
    return multiview_nt_xent([z1, z2, z_adv], temperature, sum_positives=True, detach_keys=detach_keys)


def rocl_regularizer(z_adv: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, *,
                     detach_keys: bool = True) -> torch.Tensor:
    """The regularizer's NT-Xent over [x_adv; t2] (unweighted; the step multiplies by 1/256)."""
    return multiview_nt_xent([z_adv, z2], temperature, detach_keys=detach_keys)


def gradual_warmup_cosine_lr(lr: float, multiplier: float, warmup_epochs: int, epochs: int, epoch: int) -> float:
    """The lr epoch `epoch` (from 0) trains at under the official per-epoch schedule:
    GradualWarmupScheduler(multiplier, warmup_epochs) then CosineAnnealingLR(T_max=epochs), stepped
    at the start of every epoch.

    The step at the start of epoch e makes the warm-up's counter e + 1, so the warm-up epochs
    train at lr * (1 + (multiplier - 1)(e + 1) / warmup_epochs), reaching multiplier * lr at
    epoch warmup_epochs - 1; from epoch warmup_epochs on, a cosine from multiplier * lr evaluated at
    (epoch - warmup_epochs) / epochs (its first value is the peak again).
    """
    if epoch < warmup_epochs:
        return lr * (1 + (multiplier - 1) * (epoch + 1) / warmup_epochs)
    peak = lr * multiplier
    return peak * (1 + math.cos(math.pi * (epoch - warmup_epochs) / epochs)) / 2


# ---------------------------------------------------------------- model


class RoCLModel(nn.Module):
    def __init__(self, encoder: nn.Module, hidden: int = 2048, out_dim: int = 128):
        super().__init__()
        self.encoder = encoder
        self.projector = nn.Sequential(nn.Linear(encoder.feature_dim, hidden), nn.ReLU(inplace=True),
                                       nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))


# ---------------------------------------------------------------- the method


@METHODS.register("rocl")
class RoCL(Method):
    """RoCL: instance-wise attack on NT-Xent, 3-view contrastive loss + 1/256 regularizer."""

    @dataclass
    class Config(TrainConfig, AInfoNCELossSettings):
        epochs: int = param(1000, min=1)
        batch_size: int = param(512, min=2)
        optimizer: str = param("lars", choices=("sgd", "lars"))
        lr: float = param(0.1, min=0.0, help="base lr; the warm-up multiplies it up to warmup_multiplier x lr")
        momentum: float = param(0.9, min=0.0, max=1.0)
        weight_decay: float = param(1e-6, min=0.0)
        trust_coef: float = param(1e-3, min=0.0, help="LARS trust coefficient")
        lars_lr_in_buffer: bool = param(False, help="false = torchlars LARS (lr outside the momentum buffer, "
                                                    "RoCL's official optimizer); true = ACL's form")
        warmup_epochs: int = param(10, min=0, help="per-epoch gradual warm-up length")
        warmup_multiplier: float = param(15.0, min=1.0, help="peak lr = warmup_multiplier x lr")
        temperature: float = param(0.5, min=1e-6)
        eps: float = param(0.0314, min=0.0, max=1.0)
        alpha: float = param(0.007, min=0.0, max=1.0)
        attack_steps: int = param(7, min=0)
        reg_weight: float = param(1 / 256, min=0.0, help="weight of NTXent([x_adv; t2]) (official 1/lamda, lamda=256)")
        detach_keys: bool = param(True, help="official z @ z.T.detach() similarity (halves the gradient); "
                                              "false = exact gradient")
        proj_hidden: int = param(2048, min=1)
        proj_dim: int = param(128, min=1)

    branches = ("normal",)
    encoder_branch = "normal"
    normalize = "none"
    drop_last = False  # the official loader keeps the last partial batch
    # LARS at lr 0.1 moves weights by ~1e-4 per step; the shared fixed-batch test uses the peak lr.
    test_settings = {"attack_steps": 2, "lr": 1.5}

    def build(self) -> nn.Module:
        c = self.cfg
        return RoCLModel(self.new_encoder(), c.proj_hidden, c.proj_dim)

    def lr_at(self, epoch: int, step: int, steps: int) -> float:
        c = self.cfg
        return gradual_warmup_cosine_lr(c.lr, c.warmup_multiplier, c.warmup_epochs, c.epochs, epoch)

    def attack(self, t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
        """x_adv from t1 ascending NT-Xent(x_adv, t2), encoder and projector in eval mode."""
        c, model = self.cfg, self.model
        with eval_mode(model):
            with torch.no_grad():
                z2 = model(t2)  # fixed: eval mode, t2 is not attacked

            def objective(advs: list[torch.Tensor]) -> torch.Tensor:
                return rocl_regularizer(model(advs[0]), z2, c.temperature, detach_keys=c.detach_keys)

            return pgd(objective, t1, eps=c.eps, alpha=c.alpha, steps=c.attack_steps,
                       random_start="uniform", clamp_start=True, freeze=model)

    def step(self, t1: torch.Tensor, t2: torch.Tensor) -> dict[str, torch.Tensor]:
        c, model = self.cfg, self.model
        x_adv = self.attack(t1, t2)
        z1, z2, za = model(torch.cat([t1, t2, x_adv])).chunk(3)
        if c.ainfonce_variant == "none":
            cl = rocl_loss(z1, z2, za, c.temperature, detach_keys=c.detach_keys)
        else:
            cl = rocl_ainfonce_loss(z1, z2, za, c, c.temperature, detach_keys=c.detach_keys)
        ra, r2 = model(torch.cat([x_adv, t2])).chunk(2)
        reg = rocl_regularizer(ra, r2, c.temperature, detach_keys=c.detach_keys)
        return {"loss": cl + c.reg_weight * reg, "cl_loss": cl.detach(), "reg_loss": reg.detach()}

    def training_step(self, x, y, index, info):
        from bench.augment import ROCL_VIEW, make_view

        return self.step(make_view(x, ROCL_VIEW), make_view(x, ROCL_VIEW))
