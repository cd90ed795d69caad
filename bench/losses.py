"""Contrastive losses shared by methods and attacks (plain functions, testable alone).

`multiview_nt_xent` is docs/methods.md §0's loss. `weighted_multiview_nt_xent` generalises it
for asymmetric variants (A-InfoNCE): a weight per (anchor view, positive view) pair, a second set
of pair terms computed with detached keys, and HCL's hard-negative reweighting of the denominator
(`HardNegatives`), including the forms of A-InfoNCE's released code. Under data-parallel training
every process computes them over the whole global batch (`bench.train.distributed.gather_rows`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from bench.train.distributed import gather_rows


@dataclass(frozen=True)
class HardNegatives:
    """HCL's debiased hard-negative denominator (Robinson et al. 2021) for one pair term.

    For anchor r with N negatives, exponentials e_rk = exp(s_rk), positives' mean pos_r,
    importance imp_rk = e_rk^beta normalized by its mean I_r over r's negatives:
    Ng_r = max((sum_neg imp_rk e_rk / I_r - tau_plus N pos_r) / (1 - tau_plus), N e^(-1/t_b)),
    l(r -> p) = -log(e_rp / (pos_r + Ng_r)); t_b = `bound_temperature` (None: the loss's).

    The three flags reproduce A-InfoNCE's released code (ainfonce.md sections 3 and 7), computed
    densely as it does (imp = (e + 1e-9)^beta over all columns, masked entries included):
    - `key_row_importance` (A2a): column k is normalized by the mean of row k over all columns;
    - `positive_row_denominator` (A2b): l(r -> p) takes row p's denominator pos_p + Ng_p;
    - `shifted` (A3): exponentials of s_rk - max_k s_rk, the bound applied to the shifted values.
    """

    tau_plus: float = 0.1
    beta: float = 1.0
    bound_temperature: float | None = None
    key_row_importance: bool = False
    positive_row_denominator: bool = False
    shifted: bool = False

    @property
    def released_form(self) -> bool:
        return self.key_row_importance or self.positive_row_denominator or self.shifted


def _masks(n: int, b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    eye = torch.eye(n, dtype=torch.bool, device=device)
    image = torch.arange(n, device=device) % b
    positives = (image[:, None] == image[None, :]) & ~eye
    return eye, positives


def _plain_pair_losses(sim: torch.Tensor, eye: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """-log softmax over k != r, kept at positive pairs (0 elsewhere)."""
    log_prob = sim.masked_fill(eye, float("-inf")).log_softmax(dim=1)
    return -(log_prob.masked_fill(~positives, 0.0))


def _hcl_pair_losses(sim: torch.Tensor, eye: torch.Tensor, positives: torch.Tensor, n_neg: int,
                     temperature: float, hn: HardNegatives) -> torch.Tensor:
    """HCL's term in log space, row-wise, over each row's negatives only."""
    negatives = ~positives & ~eye
    shift = sim.max(dim=1, keepdim=True).values.detach()  # for stability only: every term is shift-invariant
    logits = sim - shift
    e = logits.exp()
    pos = (e * positives).sum(1) / positives.sum(1)
    weighted = (((hn.beta + 1) * logits).exp() * negatives).sum(1)
    norm = ((hn.beta * logits).exp() * negatives).sum(1)
    reweighted = n_neg * weighted / norm  # sum_neg imp e / I with I the mean of imp over the negatives
    bound_t = hn.bound_temperature or temperature
    bound = n_neg * torch.exp(-1.0 / bound_t - shift.squeeze(1))  # N e^(-1/t) in unshifted units
    ng = torch.maximum((reweighted - hn.tau_plus * n_neg * pos) / (1 - hn.tau_plus), bound)
    losses = torch.log(pos + ng)[:, None] - logits
    return losses.masked_fill(~positives, 0.0)


def _released_pair_losses(sim: torch.Tensor, eye: torch.Tensor, positives: torch.Tensor, n_neg: int,
                          temperature: float, hn: HardNegatives) -> torch.Tensor:
    """The dense computation of A-InfoNCE's released HN losses, quirks selected by the flags."""
    negatives = (~positives & ~eye).to(sim.dtype)
    pos_mask = positives.to(sim.dtype)
    logits = sim - sim.max(dim=1, keepdim=True).values.detach() if hn.shifted else sim
    e = logits.exp()
    neg = e * negatives
    pos = (e * pos_mask).sum(1) / pos_mask.sum(1)
    imp = (hn.beta * (neg + 1e-9).log()).exp()
    if hn.key_row_importance:
        reweight = imp * neg / imp.mean(dim=-1)  # broadcasts along columns: column k / mean of row k
    else:
        reweight = imp * neg / ((imp * negatives).sum(dim=-1, keepdim=True) / n_neg)
    ng = (reweight.sum(dim=-1) - hn.tau_plus * n_neg * pos) / (1 - hn.tau_plus)
    bound_t = hn.bound_temperature or temperature
    ng = torch.clamp(ng, min=n_neg * math.exp(-1.0 / bound_t))
    denominator = pos + ng
    denominator = denominator[None, :] if hn.positive_row_denominator else denominator[:, None]
    return (-torch.log(e / denominator)).masked_fill(~positives, 0.0)


def pair_losses(z: torch.Tensor, keys: torch.Tensor, b: int, temperature: float,
                hard_negatives: HardNegatives | None = None) -> torch.Tensor:
    """(n, n) matrix of l(r -> k) = -log(e^{s_rk} / denominator_r) with s = z keys^T / t, at the
    positive pairs of rows r, k (the same image, rows are view-major: row = view * b + image);
    0 elsewhere. Plain: the denominator sums over every k != r (positives included)."""
    n = z.shape[0]
    sim = z @ keys.T / temperature
    eye, positives = _masks(n, b, z.device)
    if hard_negatives is None:
        return _plain_pair_losses(sim, eye, positives)
    n_neg = n - n // b  # N: every row of another image (m views of b - 1 images)
    form = _released_pair_losses if hard_negatives.released_form else _hcl_pair_losses
    return form(sim, eye, positives, n_neg, temperature, hard_negatives)


def _pair_weights(weights: torch.Tensor | Sequence[Sequence[float]], m: int, b: int,
                  like: torch.Tensor) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    if w.shape != (m, m):
        raise ValueError(f"pair weights must be {m} x {m} (anchor view, positive view), got {tuple(w.shape)}")
    view = torch.arange(m * b, device=like.device) // b
    return w[view][:, view]


def weighted_multiview_nt_xent(views: Sequence[torch.Tensor], temperature: float = 0.5, *,
                               weights: torch.Tensor | Sequence[Sequence[float]] | None = None,
                               stopped_weights: torch.Tensor | Sequence[Sequence[float]] | None = None,
                               hard_negatives: HardNegatives | None = None,
                               sum_positives: bool = False, detach_keys: bool = False) -> torch.Tensor:
    """Multi-view NT-Xent with a weight per (anchor view, positive view).

    Per anchor r: sum over its positives p of W[v(r), v(p)] l(r -> p) + W_sg[v(r), v(p)] l_sg(r -> p),
    divided by m - 1 (the number of positives) unless `sum_positives`; mean over all mB anchors.
    l_sg is the same term computed from z keys.detach()^T (its gradient reaches only the anchor).
    W = `weights` (None: all 1), W_sg = `stopped_weights` (None: no l_sg terms). `detach_keys`
    detaches the keys of the l terms too (RoCL's similarity). `hard_negatives` replaces every
    term's denominator (`HardNegatives`). With no option this is `multiview_nt_xent`.
    """
    # data-parallel training: the views of the whole global batch (every process's rows), so the
    # negatives are the global batch's as on one device (bench.train.distributed)
    views = [gather_rows(v) for v in views]
    m, b = len(views), views[0].shape[0]
    z = F.normalize(torch.cat(list(views)).float(), dim=1)
    losses = pair_losses(z, z.detach() if detach_keys else z, b, temperature, hard_negatives)
    if weights is not None:
        losses = losses * _pair_weights(weights, m, b, losses)
    per_anchor = losses.sum(dim=1)
    if stopped_weights is not None:
        stopped = pair_losses(z, z.detach(), b, temperature, hard_negatives)
        per_anchor = per_anchor + (stopped * _pair_weights(stopped_weights, m, b, stopped)).sum(dim=1)
    if not sum_positives:
        per_anchor = per_anchor / (m - 1)
    return per_anchor.mean()


def multiview_nt_xent(views: Sequence[torch.Tensor], temperature: float = 0.5, *,
                      sum_positives: bool = False, detach_keys: bool = False) -> torch.Tensor:
    """NT-Xent over m views of B images (m = 2 is SimCLR's loss).

    For anchor i, the positives are the other m-1 views of its image and the denominator runs
    over all mB-1 other rows (positives included). Each anchor averages its positive terms
    (`sum_positives=True` sums them, RoCL's form). `detach_keys` computes z @ z.detach().T,
    the similarity of RoCL's released code. Features are L2-normalized here. Mean over anchors.
    """
    return weighted_multiview_nt_xent(views, temperature, sum_positives=sum_positives, detach_keys=detach_keys)


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's two-view NT-Xent."""
    return multiview_nt_xent([a, b], temperature)
