"""A-InfoNCE's asymmetric InfoNCE losses (Yu et al., ECCV 2022), per ../shared/spec/methods/ainfonce.md.

A-InfoNCE is a loss, not a pipeline: options of `advcl` and `rocl` (`ainfonce_*` settings) and the
registered `ainfonce` (AdvCL + IPHN, methods/ainfonce.py). Every loss is
`bench.losses.weighted_multiview_nt_xent` with a weight per (anchor view, positive view):

AdvCL side (rows [a, v1, v2, v3], a the adversarial view; C = 0.5/0.07; l_sg = keys detached):

- plain / `base` (w = adv_weight), released code (`impl = "code"`, bug A1: the clean-anchored
  adversarial terms l(v -> a) are replaced by w^2 l(a -> v)):
  C/(12B) sum_i [ (w + w^2) sum_v l(a->v) + sum_{v != v'} l(v->v') ];
  `impl = "fixed"`: C/(12B) sum_i [ w sum_v (l(a->v) + l(v->a)) + sum_{v != v'} l(v->v') ]
  (AdvCL's loss at w = 1).
- `ip` (sd = stop degree): C/(12B) sum_i [ 2w sum_v (sd l_sg(v->a) + (1 - sd) l_sg(a->v)) + sum_{v != v'} l(v->v') ].
- `hn` / `iphn`: the plain / IP weights with HCL's hard-negative terms (`HardNegatives`): the
  released code's dense form (A2a, A2b, A3) or HCL's row-wise form (`fixed`).
- The attack ascends the plain form with the variant's w and plain terms (every shell passes
  --attack_ori); `attack_loss = "train"` uses the HN terms there too.
- Adaptive stop degree (`AdaptiveStopDegree`): during the first A epochs the running mean of the
  mean feature distance |f(x_org) - f(x_cl)| is accumulated (sd = stop_degree); later it is
  frozen and sd moves toward 0.5 as the distance falls to d_min.

RoCL side (rows [t1, t2, a], RoCL's detached keys, each anchor summing its positives, mean over
3N anchors): `ip` = l(1->2) + l(2->1) + w (sd (l(1->a) + l(2->a)) + (1 - sd)(l(a->1) + l(a->2)));
`hn` with RoCL's own HN denominator (only A2a differs from HCL); no adaptive schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from bench.config import param
from bench.errors import BenchError
from bench.losses import HardNegatives, weighted_multiview_nt_xent

VARIANTS = ("none", "base", "ip", "hn", "iphn")
IMPLS = ("code", "fixed")
ATTACK_LOSSES = ("plain", "train")
RELEASED_BOUND_TEMPERATURE = 0.5  # hard-coded in both released HN losses


@dataclass
class AInfoNCELossSettings:
    """The `ainfonce_*` settings shared by `rocl` and `advcl` (flat names, mixed into their Config)."""

    ainfonce_variant: str = param("none", choices=VARIANTS,
                                  help="A-InfoNCE loss: none (the method's own loss), base, ip, hn, iphn")
    ainfonce_impl: str = param("code", choices=IMPLS,
                               help="code: the released code (bugs A1-A4); fixed: the intended math")
    ainfonce_adv_weight: float = param(1.0, min=0.0, help="w: weight of the adversarial-pair terms")
    ainfonce_stop_degree: float = param(0.2, min=0.0, max=1.0,
                                        help="sd: share of the adversarial-pair pull the clean side keeps (IP)")
    ainfonce_tau_plus: float = param(0.1, min=0.0, max=0.99, help="HN: positive class prior tau+")
    ainfonce_beta: float = param(1.0, min=0.0, help="HN: concentration beta of the negatives' importance")


@dataclass
class AInfoNCESettings(AInfoNCELossSettings):
    """AdvCL's `ainfonce_*` settings: the shared ones plus the adaptive stop degree and the attack."""

    ainfonce_sd_adaptive_epochs: int = param(-1, min=-1, help="A: warm-up epochs of the adaptive stop degree "
                                                              "(-1 = off: sd stays ainfonce_stop_degree)")
    ainfonce_d_min: float = param(0.4, min=0.0, help="distance at which the adaptive sd reaches 0.5")
    ainfonce_attack_loss: str = param("plain", choices=ATTACK_LOSSES,
                                      help="plain: the attack ascends the plain form (the shells' --attack_ori); "
                                           "train: with the HN terms of hn/iphn")


def uses_stop_gradient(variant: str) -> bool:
    return variant in ("ip", "iphn")


def uses_hard_negatives(variant: str) -> bool:
    return variant in ("hn", "iphn")


def hard_negatives(cfg: Any, side: str) -> HardNegatives:
    """The HN denominator of `cfg`'s impl: the released AdvCL-side (A2a, A2b, A3) or RoCL-side (A2a)
    code, or HCL's form."""
    if cfg.ainfonce_impl == "fixed":
        return HardNegatives(cfg.ainfonce_tau_plus, cfg.ainfonce_beta)
    return HardNegatives(cfg.ainfonce_tau_plus, cfg.ainfonce_beta, bound_temperature=RELEASED_BOUND_TEMPERATURE,
                         key_row_importance=True, positive_row_denominator=side == "advcl", shifted=side == "advcl")


# ---------------------------------------------------------------- AdvCL side


def plain_weights(m: int, w: float, impl: str) -> torch.Tensor:
    """(m, m) weights of the plain form; view 0 is the adversarial one."""
    weights = torch.ones(m, m, dtype=torch.float64)
    if impl == "code":  # A1: l(v -> a) replaced by w^2 l(a -> v)
        weights[0, 1:], weights[1:, 0] = w + w * w, 0.0
    else:
        weights[0, 1:], weights[1:, 0] = w, w
    return weights


def ip_weights(m: int, w: float, sd: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, stopped weights) of the IP form; view 0 is the adversarial one."""
    weights = torch.ones(m, m, dtype=torch.float64)
    weights[0, :], weights[:, 0] = 0.0, 0.0
    stopped = torch.zeros(m, m, dtype=torch.float64)
    stopped[1:, 0] = 2 * w * sd        # clean anchor, adversarial key: the clean side's share
    stopped[0, 1:] = 2 * w * (1 - sd)  # adversarial anchor, clean keys
    return weights, stopped


def advcl_ainfonce_loss(views: Sequence[torch.Tensor], cfg: Any, *, stop_degree: float | None = None,
                        attack: bool = False, temperature: float = 0.5, scale: float = 0.5 / 0.07) -> torch.Tensor:
    """The A-InfoNCE contrastive term of `cfg`'s variant over [adversarial, clean...] projections.

    `attack`: the attack objective (plain weights; HN terms only with attack_loss = "train").
    """
    variant, m = cfg.ainfonce_variant, len(views)
    hn = None
    if uses_hard_negatives(variant) and (not attack or cfg.ainfonce_attack_loss == "train"):
        hn = hard_negatives(cfg, "advcl")
    if uses_stop_gradient(variant) and not attack:
        sd = cfg.ainfonce_stop_degree if stop_degree is None else stop_degree
        weights, stopped = ip_weights(m, cfg.ainfonce_adv_weight, sd)
    else:
        weights, stopped = plain_weights(m, cfg.ainfonce_adv_weight, cfg.ainfonce_impl), None
    return scale * weighted_multiview_nt_xent(views, temperature, weights=weights, stopped_weights=stopped,
                                              hard_negatives=hn)


class AdaptiveStopDegree:
    """The stop degree of each step (official `Asym-AdvCL/pretraining_advCL.py:314-345`).

    Epochs e (0-based) with e + 1 <= A: the batch-size-weighted running mean of the step distance
    d is accumulated over every step and sd = stop_degree. Later epochs, the mean frozen:
    sd = stop_degree if d > mean; 0.5 if d < d_min; else
    stop_degree + (mean - d) / (mean - d_min) (0.5 - stop_degree). A < 0: always stop_degree.
    The running sum and count are the state saved in checkpoints.
    """

    def __init__(self, stop_degree: float, adaptive_epochs: int = -1, d_min: float = 0.4):
        self.stop_degree, self.adaptive_epochs, self.d_min = stop_degree, adaptive_epochs, d_min
        self.total, self.count = 0.0, 0

    @property
    def enabled(self) -> bool:
        return self.adaptive_epochs >= 0

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0  # AverageMeter's avg before any update

    def __call__(self, epoch: int, distance: float, batch_size: int) -> float:
        sd0 = self.stop_degree
        if not self.enabled:
            return sd0
        if epoch + 1 <= self.adaptive_epochs:
            self.total += distance * batch_size
            self.count += batch_size
            return sd0
        mean = self.mean
        if distance > mean:
            return sd0
        if distance < self.d_min:
            return 0.5
        return sd0 + (mean - distance) / (mean - self.d_min) * (0.5 - sd0)

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total, self.count = float(state["total"]), int(state["count"])


def check_advcl_views(cfg: Any, views: Sequence[str], adversarial: Sequence[str]) -> None:
    if cfg.ainfonce_variant != "none" and len(adversarial) != 1:
        raise BenchError(f"advcl.ainfonce_variant={cfg.ainfonce_variant}: A-InfoNCE contrasts one adversarial view "
                         f"with the clean ones; views {list(views)} have {len(adversarial)} adversarial views")


# ---------------------------------------------------------------- RoCL side


def rocl_ainfonce_loss(z1: torch.Tensor, z2: torch.Tensor, z_adv: torch.Tensor, cfg: Any,
                       temperature: float = 0.5, detach_keys: bool = True) -> torch.Tensor:
    """A-InfoNCE on RoCL's 'Rep' loss over [t1, t2, x_adv] (official `Asym-RoCL/loss.py:118-211`)."""
    variant, w, sd = cfg.ainfonce_variant, cfg.ainfonce_adv_weight, cfg.ainfonce_stop_degree
    weights = torch.ones(3, 3, dtype=torch.float64)
    if uses_stop_gradient(variant):
        weights[:2, 2] = w * sd        # clean anchors, adversarial positive
        weights[2, :2] = w * (1 - sd)  # adversarial anchor, clean positives
    hn = hard_negatives(cfg, "rocl") if uses_hard_negatives(variant) else None
    return weighted_multiview_nt_xent([z1, z2, z_adv], temperature, weights=weights, hard_negatives=hn,
                                      sum_positives=True, detach_keys=detach_keys)
