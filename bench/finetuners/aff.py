"""AFF: adversarial full finetuning with TRADES (Zhang et al. 2019).

The whole classifier trains; the new head starts at zero. Per step: weak augmentation, then
the adversarial example is crafted with the model in eval mode by 10 steps of PGD ascending
KL(f(x) || f(x_adv)) (eps 8/255, alpha 2/255, start x + 0.001 N(0, 1) not clamped, as in the
TRADES code), then, in train mode,
`L = CE(f(x), y) + beta * KL(f(x) || f(x_adv))` with beta = 6, KL summed over classes and
averaged over the batch (`batchmean`), gradients through both terms. TRADES' code forwards the
clean batch twice (once per term); here the clean logits are computed once (same loss and
gradient; BatchNorm statistics see the clean batch once instead of twice).
SGD lr 0.1, momentum 0.9, weight decay 2e-4, batch 128, 25 epochs, lr x0.1 at 15 and 20.
`aff.norm = L2` runs the KL-PGD under L2 (`l2_eps` 0.5, `l2_alpha` 0.125; the N(0, 1) * 0.001
start is the same; bench.attacks.threat).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.attacks import kl_objective, pgd
from bench.attacks.threat import threat_of
from bench.augment import WEAK_VIEW, make_view
from bench.config import param
from bench.finetuners.base import FinetuneConfig, Finetuner
from bench.registry import FINETUNERS


def trades_loss(clean_logits: torch.Tensor, adv_logits: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """CE(f(x), y) + beta * KL(softmax f(x) || softmax f(x_adv)), batchmean."""
    natural = F.cross_entropy(clean_logits, y)
    robust = F.kl_div(F.log_softmax(adv_logits, dim=1), F.softmax(clean_logits, dim=1), reduction="batchmean")
    return natural + beta * robust


@FINETUNERS.register("aff")
class AFF(Finetuner):
    """Adversarial full finetuning (TRADES, beta 6): the whole model trains, zero-initialized head."""

    @dataclass
    class Config(FinetuneConfig):
        batch_size: int = param(128, min=1)
        lr: float = param(0.1, min=0.0)
        beta: float = param(6.0, min=0.0)
        eps: float = param(8 / 255, min=0.0, max=1.0)
        alpha: float = param(2 / 255, min=0.0, max=1.0)
        attack_steps: int = param(10, min=0)
        norm: str = param("Linf", choices=("Linf", "L2"), help="threat model of the training attack")
        l2_eps: float = param(0.5, min=0.0, help="L2 radius (norm = L2)")
        l2_alpha: float = param(0.125, min=0.0, help="L2 PGD step (norm = L2)")

    linear = False
    zero_init_head = True
    test_settings = {"attack_steps": 2}

    def training_step(self, x, y, index, info):
        c = self.cfg
        x = make_view(x, WEAK_VIEW)
        self.model.eval()
        try:
            with torch.no_grad():
                reference = self.model(x)
            threat = threat_of(c)
            x_adv = pgd(kl_objective(self.model, reference), x, eps=threat.eps, alpha=threat.alpha,
                        steps=c.attack_steps, random_start="normal", clamp_start=False, freeze=self.model,
                        norm=threat.norm)
        finally:
            self.train_mode()
        clean_logits = self.model(x)
        adv_logits = self.model(x_adv)
        return {"loss": trades_loss(clean_logits, adv_logits, y, c.beta),
                "accuracy": (clean_logits.argmax(1) == y).float().mean(),
                "adv_accuracy": (adv_logits.argmax(1) == y).float().mean()}
