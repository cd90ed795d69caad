"""AdvCL's step as the official code schedules it: every view forwarded at every attack step.

Not part of the product: `methods.advcl.AdvCL.step` computes the same loss, gradients and
BatchNorm statistics with half the forwards. The tests (tests/methods/test_advcl.py) and
`benchmarks/advcl_step.py` compare the two.
"""

from __future__ import annotations

from typing import Sequence

import torch

from bench.attacks import pgd
from methods.advcl import ADV_BRANCH, CLEAN_BRANCH, VIEWS, AdvCL, advcl_contrastive, pseudo_label_ce


def naive_step(method: AdvCL, inputs: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    """Same math, views and random starts (drawn in the same order) as `AdvCL.step`."""
    c, model = method.cfg, method.model
    adv_views = [v for v in method.views if VIEWS[v][1]]
    labels = method.batch_labels(index) if method.uses_ce else []

    def contrastive(advs: Sequence[torch.Tensor]) -> torch.Tensor:
        adv = dict(zip(adv_views, advs))
        z = [model.project(adv[v], ADV_BRANCH) if VIEWS[v][1] else model.project(inputs[VIEWS[v][0]], CLEAN_BRANCH)
             for v in method.views]
        return advcl_contrastive(z, c.temperature, c.contrastive_scale)

    def objective(advs: list[torch.Tensor]) -> torch.Tensor:
        total = contrastive(advs[:len(adv_views)])
        if method.uses_ce:
            total = total + pseudo_label_ce(model.cluster_logits(advs[-1]), labels, "sum")
        return total

    bases = [inputs[VIEWS[v][0]] for v in adv_views] + ([inputs["x_org"]] if method.uses_ce else [])
    advs = pgd(objective, bases, eps=c.eps, alpha=c.alpha, steps=c.attack_steps,
               random_start="uniform", clamp_start=False)
    cl = contrastive(advs[:len(adv_views)])
    out = {"cl_loss": cl, "loss": cl}
    if method.uses_ce:
        ce = pseudo_label_ce(model.cluster_logits(advs[-1]), labels)
        out["ce_loss"] = ce
        out["loss"] = cl + c.ce_weight * ce
    return out
