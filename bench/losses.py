"""Contrastive losses shared by methods and attacks (plain functions, testable alone)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def multiview_nt_xent(views: Sequence[torch.Tensor], temperature: float = 0.5, *,
                      sum_positives: bool = False, detach_keys: bool = False) -> torch.Tensor:
    """NT-Xent over m views of B images (m = 2 is SimCLR's loss).

    For anchor i, the positives are the other m-1 views of its image and the denominator runs
    over all mB-1 other rows (positives included). Each anchor averages its positive terms
    (`sum_positives=True` sums them, RoCL's form). `detach_keys` computes z @ z.detach().T,
    the similarity of RoCL's released code. Features are L2-normalized here. Mean over anchors.
    """
    m, b = len(views), views[0].shape[0]
    z = F.normalize(torch.cat(list(views)).float(), dim=1)
    keys = z.detach() if detach_keys else z
    sim = z @ keys.T / temperature
    n = m * b
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    log_prob = sim.masked_fill(eye, float("-inf")).log_softmax(dim=1)
    image = torch.arange(n, device=z.device) % b
    positives = (image[:, None] == image[None, :]) & ~eye
    per_anchor = -(log_prob.masked_fill(~positives, 0.0)).sum(dim=1)
    if not sum_positives:
        per_anchor = per_anchor / (m - 1)
    return per_anchor.mean()


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's two-view NT-Xent."""
    return multiview_nt_xent([a, b], temperature)
