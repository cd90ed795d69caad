"""Supervised adversarial training (PGD-AT, Madry et al.): the labelled reference row.

Choices where docs/methods.md §5 leaves room:
- PGD-10 (the paper's table uses 7) crafted with the model in **train mode**, as in Madry's
  reference code: the attack's forwards also update BatchNorm running statistics.
- Step decay x0.1 at 50% and 75% of the epochs (epochs 50 and 75 of 100).
- Weight decay 2e-4 (AdvCL's recipe; AP-DPE uses 3e-4).
- `supervised_at.norm = L2` trains against L2 PGD (`l2_eps` 0.5, `l2_alpha` 0.125; bench.attacks.threat).
The downstream encoder is the backbone without its classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench.attacks import ce_objective, pgd
from bench.attacks.threat import threat_of
from bench.augment import WEAK_VIEW, make_view
from bench.config import TrainConfig, param
from bench.method import Method
from bench.models import Classifier
from bench.registry import METHODS


def supervised_at_loss(adv_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PGD-AT's outer loss: cross-entropy on the adversarial examples only."""
    return F.cross_entropy(adv_logits, y)


@METHODS.register("supervised_at")
class SupervisedAT(Method):
    """Supervised PGD adversarial training (uses labels)."""

    @dataclass
    class Config(TrainConfig):
        epochs: int = param(100, min=1)
        batch_size: int = param(128, min=1)
        lr: float = param(0.1, min=0.0)
        momentum: float = param(0.9, min=0.0, max=1.0)
        weight_decay: float = param(2e-4, min=0.0)
        schedule: str = param("step", choices=("cosine", "step", "constant"))
        decay_at: tuple[float, ...] = param((0.5, 0.75), min=0.0, max=1.0, help="epochs 50 and 75 of 100")
        gamma: float = param(0.1, min=0.0, max=1.0)
        eps: float = param(8 / 255, min=0.0, max=1.0)
        alpha: float = param(2 / 255, min=0.0, max=1.0)
        attack_steps: int = param(10, min=0)
        norm: str = param("Linf", choices=("Linf", "L2"), help="threat model of the training attack")
        l2_eps: float = param(0.5, min=0.0, help="L2 radius (norm = L2)")
        l2_alpha: float = param(0.125, min=0.0, help="L2 PGD step (norm = L2)")

    uses_labels = True
    drop_last = False  # PyTorch PGD-AT/TRADES reference loaders keep the last partial batch
    test_settings = {"attack_steps": 2}

    def build(self) -> nn.Module:
        return Classifier(self.new_encoder(), self.ctx.num_classes)

    def training_step(self, x, y, index, info):
        x = make_view(x, WEAK_VIEW)
        c = self.cfg
        # Train mode on purpose (Madry's reference): see the module docstring.
        threat = threat_of(c)
        x_adv = pgd(ce_objective(self.model, y), x, eps=threat.eps, alpha=threat.alpha, steps=c.attack_steps,
                    freeze=self.model, norm=threat.norm)
        logits = self.model(x_adv)
        accuracy = (logits.argmax(1) == y).float().mean()
        return {"loss": supervised_at_loss(logits, y), "adv_accuracy": accuracy}
