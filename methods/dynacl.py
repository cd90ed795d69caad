"""DynACL and DynACL++ (Luo, Wang, Wang, ICLR 2023), per ../shared/spec/methods/dynacl.md.

ACL's dual-BN model and attack, plus (`PKU-ML/DYNACL@7d143db`, the default `impl = pku`):
- a momentum (EMA) key encoder k: the online model q (backbone + head) trains; k is a frozen
  copy updated by theta_k <- 0.99 theta_k + 0.01 theta_q (parameters only) after the step's
  forwards and before the optimizer step; the **swap forward** sends view 1 through q and view 2
  through k (each sees B rows), in the attack and the loss; the exported encoder is k's `pgd` branch;
- annealed augmentation strength s(e) = 1 - floor((e - 1)/K) K/T (K = 50) and the dynamic loss
  weight omega(e) = lambda floor(e/K) K/T (lambda = 2/3), one epoch ahead of s (the code's
  offset; `weight_sync = true` gives omega = lambda (1 - s(e))); L = ((1 - omega) NAT + (1 + omega) ADV) / 2;
- a per-epoch learning rate (warm-up e/10, then cosine to 1e-6, LambdaLR stepped per epoch),
  LARS with the lr inside the momentum buffer, no drop_last, fp32.

`impl = air | rcs` are the EMA-free rewrites in the AIR and RCS authors' code (section 9): six
switches, each also settable alone (None = the preset's value). Harness epochs are 0-based
(`info.epoch`); the schedules are written with the official 1-based e = epoch + 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from bench.augment import ViewRecipe, make_view
from bench.config import param
from bench.errors import BenchError
from bench.models.blob import encoder_blob
from bench.models.ema import ema_update_, frozen_copy, matched_parameters
from bench.registry import METHODS
from bench.selection.rcs import RCSParts
from methods.acl import ACL, DualBNModel, acl_attack, iteration_lr
from methods.air_loss import acl_family_loss

IMPLS = ("pku", "air", "rcs")
DUAL_ENCODER_FILE = "encoder_dual.pt"


@dataclass(frozen=True)
class Switches:
    ema: bool
    crop_interpolation: str
    weight_sync: bool
    loss_halved: bool
    lr_schedule: str


# dynacl.md section 9 (`lars_lr_in_buffer`, the sixth switch, is true in all three: a plain field)
PRESETS = {
    "pku": Switches(ema=True, crop_interpolation="bilinear", weight_sync=False, loss_halved=True, lr_schedule="epoch"),
    "air": Switches(ema=False, crop_interpolation="bicubic", weight_sync=True, loss_halved=False,
                    lr_schedule="iteration"),
    "rcs": Switches(ema=False, crop_interpolation="bicubic", weight_sync=True, loss_halved=True,
                    lr_schedule="iteration"),
}


def resolve_switches(cfg: Any) -> Switches:
    """The preset of `cfg.impl` with every switch that is set explicitly (not None) overriding it."""
    if cfg.impl not in PRESETS:
        raise BenchError(f"dynacl.impl={cfg.impl!r}: use one of {', '.join(IMPLS)}")
    preset = PRESETS[cfg.impl]
    chosen = {f.name: getattr(cfg, f.name) for f in fields(Switches)}
    return Switches(**{k: getattr(preset, k) if v is None else v for k, v in chosen.items()})


# ---------------------------------------------------------------- schedules (plain functions)


def strength(epoch: int, epochs: int, period: int = 50) -> float:
    """s(e) = 1 - floor((e - 1)/K) K / T for harness epoch `epoch` = e - 1 (`train_DynACL.py:216-221`)."""
    e = epoch + 1
    return 1 - ((e - 1) // period * period) / epochs


def loss_omega(epoch: int, epochs: int, period: int = 50, swap: float = 2 / 3, sync: bool = False) -> float:
    """omega(e), the adversarial weight minus 1: the code's w = min(1 + floor(e/K)(K/T) lambda, 2)
    (`train_DynACL.py:288`), one epoch ahead of the strength; `sync`: lambda (1 - s(e))."""
    if sync:
        return swap * (1 - strength(epoch, epochs, period))
    e = epoch + 1
    return min(1.0 + (e // period) * (period / epochs) * swap, 2) - 1.0


def epoch_lr(lr: float, min_lr: float, warmup: int, epochs: int, epoch: int) -> float:
    """The per-epoch LambdaLR of `train_DynACL.py:171-179` (`utils.py:465-474`): epoch e uses
    lr e/W during the warm-up, then min_lr + (lr - min_lr)(1 + cos(pi (e - 1 - W)/(T - W)))/2."""
    if lr == 0:
        return 0.0
    if epoch < warmup:
        factor = (epoch + 1) / warmup
    else:
        low = min_lr / lr
        factor = low + (1 - low) * 0.5 * (1 + math.cos((epoch - warmup) / max(epochs - warmup, 1) * math.pi))
    return lr * factor


def strength_view(s: float, interpolation: str = "bilinear") -> ViewRecipe:
    """The transform at strength s (`train_DynACL.py:452-465`): crop scale (1 - 0.9 s, 1), flip,
    ColorJitter(0.4 s, 0.4 s, 0.4 s, 0.1 s) with p 0.8 s, grayscale p 0.2 s."""
    return ViewRecipe(crop_scale=(1.0 - 0.9 * s, 1.0), crop_interpolation=interpolation, flip=True,
                      jitter=(0.4 * s, 0.4 * s, 0.4 * s, 0.1 * s), jitter_p=0.8 * s, grayscale_p=0.2 * s)


# ---------------------------------------------------------------- the momentum model


class MomentumDualBNModel(nn.Module):
    """DynACL's `resnet18_momentum` (`models/resnet_multi_bn.py:487-529`).

    `online` (q: backbone + head) trains; `encoder` and `head` are its EMA copy k (frozen), so
    `model.encoder` is the encoder the harness exports. `forward` is the swap forward of a
    [view1; view2] batch: view 1 through q, view 2 through k.
    """

    def __init__(self, online: DualBNModel):
        super().__init__()
        key = frozen_copy(online)
        self.encoder, self.head = key.encoder, key.head
        self.online = online

    def key(self, x: torch.Tensor, branch: str) -> torch.Tensor:
        return self.head(self.encoder(x, branch), branch)

    def forward(self, x: torch.Tensor, branch: str) -> torch.Tensor:
        view1, view2 = x.chunk(2)
        return torch.cat([self.online(view1, branch), self.key(view2, branch)])

    def key_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return matched_parameters(self.encoder, self.online.encoder) + matched_parameters(self.head, self.online.head)

    @torch.no_grad()
    def update_key(self, momentum: float) -> None:
        ema_update_(self.key_pairs(), momentum)


# ---------------------------------------------------------------- the method


@METHODS.register("dynacl")
class DynACL(ACL):
    """DynACL: ACL with a momentum key encoder, annealed augmentations and a dynamic loss weight."""

    @dataclass
    class Config(ACL.Config):
        clamp_start: bool = param(False, help="clip the attack's uniform start to [0, 1] (the released code: false)")
        lars_lr_in_buffer: bool = param(True, help="LARS with the lr inside the momentum buffer (all three impls)")
        lr_step_first: bool = param(True, help="lr_schedule=iteration: iteration i uses the schedule at i + 1")
        impl: str = param("pku", choices=IMPLS, help="pku: PKU-ML/DYNACL as released; air, rcs: the EMA-free "
                                                     "rewrites in the AIR / RCS code (presets of the switches below)")
        ema: bool | None = param(None, choices=(None, True, False), help="momentum key encoder (None: from impl)")
        crop_interpolation: str | None = param(None, choices=(None, "bilinear", "bicubic"),
                                               help="resized-crop interpolation (None: from impl)")
        weight_sync: bool | None = param(None, choices=(None, True, False),
                                         help="omega = lambda (1 - s(e)) instead of the code's one-epoch lead "
                                              "(None: from impl)")
        loss_halved: bool | None = param(None, choices=(None, True, False), help="divide the loss by 2 (None: impl)")
        lr_schedule: str | None = param(None, choices=(None, "epoch", "iteration"),
                                        help="epoch: the official per-epoch LambdaLR; iteration: ACL's (None: impl)")
        ema_momentum: float = param(0.99, min=0.0, max=1.0, help="m of theta_k <- m theta_k + (1 - m) theta_q")
        reload_frequency: int = param(50, min=1, help="K: epochs per augmentation-strength step")
        swap_param: float = param(2 / 3, min=0.0, help="lambda: the final weight omega")

    drop_last = False  # the official loader keeps the last, smaller batch
    test_settings = {"attack_steps": 2, "steps_per_epoch": 2}  # the EMA copy moves from the second step on

    def __init__(self, cfg: Any, ctx):
        self.switches = resolve_switches(cfg)
        super().__init__(cfg, ctx)

    def build(self) -> nn.Module:
        online = DualBNModel(self.new_encoder())
        return MomentumDualBNModel(online) if self.switches.ema else online

    @property
    def online(self) -> DualBNModel:
        """The trained model q (the model itself without the EMA encoder)."""
        return self.model.online if self.switches.ema else self.model

    def lr_at(self, epoch: int, step: int, steps: int) -> float:
        c = self.cfg
        if self.switches.lr_schedule == "epoch":
            return epoch_lr(c.lr, c.min_lr, c.warmup_epochs, c.epochs, epoch)
        return iteration_lr(c, epoch, step, steps, c.lr_step_first)

    def strength(self, epoch: int) -> float:
        return strength(epoch, self.cfg.epochs, self.cfg.reload_frequency)

    def omega(self, epoch: int) -> float:
        c = self.cfg
        return loss_omega(epoch, c.epochs, c.reload_frequency, c.swap_param, self.switches.weight_sync)

    def recipe(self, epoch: int) -> ViewRecipe:
        return strength_view(self.strength(epoch), self.switches.crop_interpolation)

    def epoch_views(self, x: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        recipe = self.recipe(epoch)
        return make_view(x, recipe), make_view(x, recipe)

    def training_step(self, x, y, index, info):
        c, sw = self.cfg, self.switches
        epoch = info.epoch if info is not None else 0
        v1, v2 = self.epoch_views(x, epoch)
        a1, a2 = acl_attack(self.model, v1, v2, eps=c.eps, alpha=c.alpha, steps=c.attack_steps,
                            temperature=c.temperature, clamp_start=c.clamp_start)
        adv = self.model(torch.cat([a1, a2]), "pgd")       # the official order: adversarial, clean, originals
        clean = self.model(torch.cat([v1, v2]), "normal")
        original = self.online(x, "normal") if self.uses_air else None  # q's originals (our choice with EMA)
        if sw.ema:
            self.model.update_key(c.ema_momentum)  # with q's pre-step weights; the loop steps after this
        omega = self.omega(epoch)
        out = acl_family_loss(clean, adv, temperature=c.temperature, omega=omega, halved=sw.loss_halved,
                              original=original, lambda1=c.air_lambda1, lambda2=c.air_lambda2, kl=c.air_kl)
        out["strength"] = torch.tensor(self.strength(epoch))
        out["omega"] = torch.tensor(omega)
        return out

    def rcs_parts(self, epoch: int) -> RCSParts:
        """RCS on DynACL: the online q and its head (our choice with EMA), the epoch's views, ACL's attack."""
        c = self.cfg
        return RCSParts(model=self.model, encoder=self.online.encoder, head=self.online.head,
                        views=lambda x: self.epoch_views(x, epoch), eps=c.eps, alpha=c.alpha, steps=c.attack_steps,
                        temperature=c.temperature)

    def extra_artifacts(self) -> dict[str, Any]:
        """Beside encoder.pt: the dual-branch encoder (both BN branches of the exported copy) for LP-AFT."""
        return {DUAL_ENCODER_FILE: encoder_blob(self.encoder, {"branch_for_features": "normal",
                                                               "branch_for_finetuning": "pgd"})}


# ---------------------------------------------------------------- DynACL++


LPAFT_K_HELP = "k-means pseudo-classes (the code: 10, also for CIFAR-100) or 'classes' (the dataset's number)"
LPAFT_INIT_HELP = "x: TRADES starts at x exactly (the code); normal: x + 0.001 N(0, 1)"


class LPAFTMixin:
    """A method whose pretraining is its base's, followed by the LP-AFT stage (dynacl.md section 8)."""

    pretrain_as = "dynacl"

    @classmethod
    def post_stages(cls, cfg: Any) -> list[tuple[str, dict[str, Any]]]:
        """The LP-AFT job (its other settings: the `lpaft` section, e.g. lpaft.aft_epochs=5)."""
        from bench.lpaft import check_k

        cfg = cfg if cfg is not None else cls.Config()
        return [("lpaft", {"k": check_k(cfg.lpaft_k), "trades_init": cfg.lpaft_trades_init})]


@METHODS.register("dynacl_pp")
class DynACLPP(LPAFTMixin, DynACL):
    """DynACL++: DynACL, then LP-AFT on k-means pseudo-labels (a linear probe, then TRADES)."""

    @dataclass
    class Config(DynACL.Config):
        lpaft_k: str = param("10", help=LPAFT_K_HELP)
        lpaft_trades_init: str = param("x", choices=("x", "normal"), help=LPAFT_INIT_HELP)
