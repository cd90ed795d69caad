"""A-InfoNCE (Yu et al., ECCV 2022) as a registered method: AdvCL with the IPHN loss (ainfonce.md §6).

Everything but the loss is AdvCL's (methods/advcl.py): views, branches, pseudo-labels, attack
procedure, export (`pgd` branch). The defaults are the official CIFAR-10 IPHN shell
(`yqy2001/A-InfoNCE@b28763e Asym-AdvCL/shell/cifar10/advcl-IPHN-cifar10.sh`): lr 2.0, sd 0.2,
w 0.7, adaptive stop degree over 30 warm-up epochs with d_min 0.4, tau+ 0.1, beta 1.0, 400 epochs,
the released code's loss (`ainfonce_impl = "code"`). `PRESETS` lists every official shell
(variants x datasets) as settings; e.g. CIFAR-100 is `PRESETS[("iphn", "cifar100")]`.

Schedule: AdvCL's (per-iteration warm-up from 0.01 over 10 epochs, then per-epoch cosine) with
eta_min tied to lr (`min_lr_ratio`: the SupCon code's lr x 0.1^3). The official loop trains 401
epochs for "400" (A6); `epochs = 401, schedule_epochs = 400` reproduces its checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from bench.config import param
from bench.registry import METHODS
from bench.train import supcon_lr
from methods.advcl import AdvCL

_C10, _C100 = "cifar10", "cifar100"
# The official shells (Asym-AdvCL/shell/{cifar10,cifar100}/advcl-*.sh:3-9), all 400 epochs with
# --cosine; the HN rows pass --attack_ori (= ainfonce_attack_loss "plain", the default).
PRESETS: dict[tuple[str, str], dict[str, float | int | str]] = {
    ("base", _C10): {"ainfonce_variant": "base", "lr": 0.5},
    ("ip", _C10): {"ainfonce_variant": "ip", "lr": 1.0, "ainfonce_stop_degree": 0.2, "ainfonce_adv_weight": 1.2,
                   "ainfonce_sd_adaptive_epochs": 30, "ainfonce_d_min": 0.4},
    ("hn", _C10): {"ainfonce_variant": "hn", "lr": 1.2, "ainfonce_tau_plus": 0.12, "ainfonce_beta": 1.0},
    ("iphn", _C10): {"ainfonce_variant": "iphn", "lr": 2.0, "ainfonce_stop_degree": 0.2, "ainfonce_adv_weight": 0.7,
                     "ainfonce_sd_adaptive_epochs": 30, "ainfonce_d_min": 0.4, "ainfonce_tau_plus": 0.1,
                     "ainfonce_beta": 1.0},
    ("base", _C100): {"ainfonce_variant": "base", "lr": 0.5},
    ("ip", _C100): {"ainfonce_variant": "ip", "lr": 2.0, "ainfonce_stop_degree": 0.3, "ainfonce_adv_weight": 1.5,
                    "ainfonce_sd_adaptive_epochs": 20, "ainfonce_d_min": 0.5},
    ("hn", _C100): {"ainfonce_variant": "hn", "lr": 2.0, "ainfonce_tau_plus": 0.01, "ainfonce_beta": 1.0},
    ("iphn", _C100): {"ainfonce_variant": "iphn", "lr": 2.0, "ainfonce_stop_degree": 0.3, "ainfonce_adv_weight": 1.5,
                      "ainfonce_sd_adaptive_epochs": 20, "ainfonce_d_min": 0.5, "ainfonce_tau_plus": 0.01,
                      "ainfonce_beta": 1.0},
}
_DEFAULT = PRESETS[("iphn", _C10)]


def _default(name: str, value):
    """AdvCL's setting `name` (its rules and help) with another default."""
    field = {f.name: f for f in dataclasses.fields(AdvCL.Config)}[name]
    return dataclasses.field(default=value, metadata=field.metadata)


@METHODS.register("ainfonce")
class AInfoNCE(AdvCL):
    """A-InfoNCE: AdvCL with the asymmetric IPHN contrastive loss (adaptive stop degree, hard negatives)."""

    @dataclass
    class Config(AdvCL.Config):
        epochs: int = _default("epochs", 400)
        lr: float = _default("lr", _DEFAULT["lr"])
        min_lr_ratio: float = param(1e-3, min=0.0, help="eta_min = ratio x lr (the code's lr x 0.1^3); "
                                                        "0 = use min_lr")
        schedule_epochs: int = param(0, min=0, help="epochs of the cosine (0 = epochs; 400 with epochs 401 "
                                                    "reproduces the official checkpoint)")
        ainfonce_variant: str = _default("ainfonce_variant", _DEFAULT["ainfonce_variant"])
        ainfonce_adv_weight: float = _default("ainfonce_adv_weight", _DEFAULT["ainfonce_adv_weight"])
        ainfonce_stop_degree: float = _default("ainfonce_stop_degree", _DEFAULT["ainfonce_stop_degree"])
        ainfonce_sd_adaptive_epochs: int = _default("ainfonce_sd_adaptive_epochs",
                                                    _DEFAULT["ainfonce_sd_adaptive_epochs"])
        ainfonce_d_min: float = _default("ainfonce_d_min", _DEFAULT["ainfonce_d_min"])
        ainfonce_tau_plus: float = _default("ainfonce_tau_plus", _DEFAULT["ainfonce_tau_plus"])
        ainfonce_beta: float = _default("ainfonce_beta", _DEFAULT["ainfonce_beta"])

    # lr 2.0 on one fixed batch of a width-4 encoder is the shared tests' only divergence risk
    test_settings = {"attack_steps": 2, "lr": 0.5}

    def lr_at(self, epoch: int, step: int, steps: int) -> float:
        c = self.cfg
        changes = {}
        if c.min_lr_ratio > 0:
            changes["min_lr"] = c.lr * c.min_lr_ratio
        if c.schedule_epochs:
            changes["epochs"] = c.schedule_epochs
        return supcon_lr(dataclasses.replace(c, **changes) if changes else c, epoch, step, steps)
