"""ALF: adversarial linear finetuning.

As SLF (frozen eval-mode encoder, same optimizer and schedule), but the head trains on PGD-10
examples (eps 8/255, alpha 2/255, uniform random start left unclipped as AdvCL's `AttackPGD`,
CE) crafted through the frozen model in eval mode, so crafting changes no BatchNorm statistic.
`alf.norm = L2` crafts L2 PGD-10 examples instead (`l2_eps` 0.5, `l2_alpha` 0.125;
bench.attacks.threat). The attack is part of training: it runs in the finetuner's `precision`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from bench.attacks import ce_objective, pgd
from bench.attacks.threat import threat_of
from bench.augment import WEAK_VIEW, make_view
from bench.config import param
from bench.finetuners.base import FinetuneConfig, Finetuner
from bench.registry import FINETUNERS


@FINETUNERS.register("alf")
class ALF(Finetuner):
    """Adversarial linear finetuning: frozen eval-mode encoder, linear head on PGD-10 examples."""

    @dataclass
    class Config(FinetuneConfig):
        eps: float = param(8 / 255, min=0.0, max=1.0)
        alpha: float = param(2 / 255, min=0.0, max=1.0)
        attack_steps: int = param(10, min=0)
        clamp_start: bool = param(False, help="clip the random start to [0, 1] (false: as AdvCL's AttackPGD)")
        norm: str = param("Linf", choices=("Linf", "L2"), help="threat model of the training attack")
        l2_eps: float = param(0.5, min=0.0, help="L2 radius (norm = L2)")
        l2_alpha: float = param(0.125, min=0.0, help="L2 PGD step (norm = L2)")

    linear = True
    gpu_share = 0.5  # a linear head, but PGD through the frozen encoder at every step
    test_settings = {"attack_steps": 2}

    def training_step(self, x, y, index, info):
        c = self.cfg
        x = make_view(x, WEAK_VIEW)
        # train_mode() keeps the whole classifier in eval mode: the attack sees running statistics.
        threat = threat_of(c)
        x_adv = pgd(ce_objective(self.model, y), x, eps=threat.eps, alpha=threat.alpha, steps=c.attack_steps,
                    random_start="uniform", clamp_start=c.clamp_start, freeze=self.model, norm=threat.norm)
        logits = self.model.head(self.features(x_adv))
        return {"loss": F.cross_entropy(logits, y), "adv_accuracy": (logits.argmax(1) == y).float().mean()}
