"""RCS: robustness-aware coreset selection (Xu et al., NeurIPS 2023), air_rcs.md B.3.

What `GodXuxilie/Efficient_ACL_via_RCS@6fc9aef ACL_RCS/small_scale_datasets/RCS.py:213-369`
computes, on the training model in its state at the start of the epoch, every forward in eval
mode (BatchNorm statistics never change):

1. a validation set V (1% of the pool, drawn once) and its adversaries x~: PGD (3 steps of
   (10/255)/3, eps 8/255, uniform start) ascending the representational divergence
   RD = mean_{V x d} Q (log Q - log(mm(c) + 1e-8)), Q = mm(a) + 1e-8, with c = g(f(x), normal),
   a = g(f(x~), pgd) and mm the per-row min-max scaling;
2. theta = the head's Linear parameters (fc1.weight, fc1.bias, fc2.weight, fc3.weight); a
   gradient's sketch = each tensor's gradient averaged over output units, concatenated;
   v = sketch(d RD / d theta);
3. candidates: the pool shuffled into batches of b images; each gets ACL's attack and the
   gradient G_b (and sketch s_b) of its ACL loss (NT-Xent of the clean pair through `normal`
   plus the adversarial pair through `pgd`, over 2) at the starting theta;
4. greedy, K times: pick the remaining candidate with the largest s_b . v; unless it is the
   last pick, theta <- theta - lr G_r (twice: the released code updates the same head under two
   names, `select.rcs_double_step`), then recompute x~ and v at the new theta.

Nothing of the model is modified: theta lives in copies (`torch.func.functional_call`), every
parameter is frozen for the duration and all gradients are taken with `torch.autograd.grad`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call

from bench.attacks import eval_mode, frozen_parameters, pgd
from bench.config import SelectConfig
from bench.datasets import ImageSet
from bench.errors import BenchError
from bench.losses import nt_xent
from bench.selection.base import Selector, budget_batches

log = logging.getLogger(__name__)

THETA = ("fc1.weight", "fc1.bias", "fc2.weight", "fc3.weight")
EPS = 1e-8


@dataclass
class RCSParts:
    """What RCS needs from a method of the ACL family (`Method.rcs_parts(epoch)`)."""

    model: nn.Module                 # holds encoder and head: put in eval mode and frozen meanwhile
    encoder: nn.Module               # f(x, branch) -> pooled features
    head: nn.Module                  # g(h, branch) -> projections; `theta` names its parameters
    views: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # the training views of a batch
    eps: float = 8 / 255             # the candidates' attack (ACL's)
    alpha: float = 2 / 255
    steps: int = 5
    temperature: float = 0.5
    clamp_start: bool = False        # the released attacks do not clip their random start
    clean_branch: str = "normal"
    adv_branch: str = "pgd"
    theta: tuple[str, ...] = THETA


# ---------------------------------------------------------------- the pieces (plain functions)


def minmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x <- x - min_d x; x <- x / max_d x per row (`RCS.py:64-67`), with gradients through min and max."""
    shifted = x - x.min(dim=1, keepdim=True).values
    return shifted / shifted.max(dim=1, keepdim=True).values


def rcs_divergence(adv: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """RD = mean over all entries of Q (log Q - log(mm(clean) + 1e-8)), Q = mm(adv) + 1e-8
    (`kl_loss`, `RCS.py:76-80`: KLDivLoss(reduction='mean'))."""
    q = minmax_rows(adv) + EPS
    return (q * (q.log() - torch.log(minmax_rows(clean) + EPS))).mean()


def sketch(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each gradient averaged over its first (output) dimension, concatenated (`RCS.py:255-261`)."""
    return torch.cat([g.mean(dim=0).reshape(-1) for g in grads])


def greedy_coreset(sketches: torch.Tensor, grads: Sequence[Sequence[torch.Tensor]], theta: Sequence[torch.Tensor],
                   val_sketch: Callable[[list[torch.Tensor]], torch.Tensor], picks: int, lr: float,
                   double_step: bool = True) -> list[int]:
    """The greedy search (`RCS.py:305-366`): candidate positions in the order picked.

    sketches: (n, d) candidate sketches s_b; grads[b]: G_b, one tensor per theta entry;
    val_sketch(theta) -> v. Candidate sketches are not recomputed as theta moves.
    """
    theta = [t.detach().clone() for t in theta]
    remaining = list(range(len(sketches)))
    chosen: list[int] = []
    v = val_sketch(theta)
    for j in range(min(picks, len(remaining))):
        gains = sketches[remaining] @ v
        r = remaining[int(torch.argmax(gains))]
        chosen.append(r)
        remaining.remove(r)
        if j == picks - 1 or not remaining:
            break
        for _ in range(2 if double_step else 1):
            theta = [t - lr * g for t, g in zip(theta, grads[r])]
        v = val_sketch(theta)
    return chosen


def validation_rows(positions: torch.Tensor, batch: int, mode: str) -> torch.Tensor:
    """The rows RCS evaluates V on. `code`: per loader batch of `batch` images, the first half of
    the batch, each image twice (`view(2B, ...)[:B]` of duplicated CIFAR items, `RCS.py:235-236`);
    `all`: every image once."""
    if mode == "all":
        return positions
    if mode != "code":
        raise ValueError(f"val_rows must be 'code' or 'all', got {mode!r}")
    return torch.cat([chunk.repeat_interleave(2)[:len(chunk)] for chunk in positions.split(batch)])


def project(parts: RCSParts, h: torch.Tensor, branch: str, theta: Sequence[torch.Tensor]) -> torch.Tensor:
    """g(h, branch) with the head's theta replaced."""
    return functional_call(parts.head, dict(zip(parts.theta, theta)), (h, branch))


def _pair_nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    a, b = z.chunk(2)
    return nt_xent(a, b, temperature)


def candidate_gradient(parts: RCSParts, x: torch.Tensor, theta: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """G_b: the head gradient of the ACL loss of one candidate batch (`RCS.py:280-299`)."""
    v1, v2 = parts.views(x)

    def objective(advs: list[torch.Tensor]) -> torch.Tensor:
        z = project(parts, parts.encoder(torch.cat(advs), parts.adv_branch), parts.adv_branch, theta)
        return _pair_nt_xent(z, parts.temperature)

    a1, a2 = pgd(objective, [v1, v2], eps=parts.eps, alpha=parts.alpha, steps=parts.steps, random_start="uniform",
                 clamp_start=parts.clamp_start)
    with torch.no_grad():
        h_clean = parts.encoder(torch.cat([v1, v2]), parts.clean_branch)
        h_adv = parts.encoder(torch.cat([a1, a2]), parts.adv_branch)
    leaves = [t.detach().requires_grad_(True) for t in theta]
    with torch.enable_grad():
        loss = (_pair_nt_xent(project(parts, h_clean, parts.clean_branch, leaves), parts.temperature)
                + _pair_nt_xent(project(parts, h_adv, parts.adv_branch, leaves), parts.temperature)) / 2
        return [g.detach() for g in torch.autograd.grad(loss, leaves)]


def validation_sketch(parts: RCSParts, x: torch.Tensor, h_clean: torch.Tensor, theta: Sequence[torch.Tensor], *,
                      eps: float, step: float, steps: int) -> torch.Tensor:
    """v = sketch(d RD / d theta) at theta, with fresh validation adversaries (`RCS.py:90-125`, `:230-261`)."""
    theta = [t.detach() for t in theta]
    with torch.no_grad():
        reference = project(parts, h_clean, parts.clean_branch, theta)

    def objective(advs: list[torch.Tensor]) -> torch.Tensor:
        a = project(parts, parts.encoder(advs[0], parts.adv_branch), parts.adv_branch, theta)
        return rcs_divergence(a, reference)

    x_adv = pgd(objective, x, eps=eps, alpha=step, steps=steps, random_start="uniform", clamp_start=False)
    with torch.no_grad():
        h_adv = parts.encoder(x_adv, parts.adv_branch)
    leaves = [t.requires_grad_(True) for t in (t.clone() for t in theta)]
    with torch.enable_grad():
        loss = rcs_divergence(project(parts, h_adv, parts.adv_branch, leaves),
                              project(parts, h_clean, parts.clean_branch, leaves))
        return sketch(torch.autograd.grad(loss, leaves))


def rcs_select(parts: RCSParts, pool: ImageSet, *, candidates: torch.Tensor, val_rows: torch.Tensor, picks: int,
               batch: int, lr: float, double_step: bool, val_steps: int, val_step: float) -> torch.Tensor:
    """Positions (in `pool`) of the K candidate batches RCS picks. Uses the global RNG (the
    caller seeds it): the candidates' shuffle, their views and every attack's random start."""
    device = pool.y.device
    named = dict(parts.head.named_parameters())
    missing = [n for n in parts.theta if n not in named]
    if missing:
        raise BenchError(f"RCS: the head has no parameters {missing}")
    with eval_mode(parts.model), frozen_parameters(parts.model), torch.autocast(device.type, enabled=False):
        theta0 = [named[n].detach().clone() for n in parts.theta]
        order = candidates[torch.randperm(len(candidates))]
        members, grads = [], []
        for chunk in order.split(batch):
            members.append(chunk)
            grads.append(candidate_gradient(parts, pool.images(chunk.to(device)), theta0))
        sketches = torch.stack([sketch(g) for g in grads])
        x_val = pool.images(val_rows.to(device))
        with torch.no_grad():
            h_val = parts.encoder(x_val, parts.clean_branch)

        def val_sketch(theta: list[torch.Tensor]) -> torch.Tensor:
            return validation_sketch(parts, x_val, h_val, theta, eps=parts.eps, step=val_step, steps=val_steps)

        chosen = greedy_coreset(sketches, grads, theta0, val_sketch, picks, lr, double_step)
    return torch.cat([members[i] for i in chosen])


# ---------------------------------------------------------------- the selector


class RCSSelector(Selector):
    """RCS on the ACL family: the task must provide `rcs_parts(epoch) -> RCSParts`."""

    name = "rcs"

    def __init__(self, cfg: SelectConfig, seed: int, batch: int):
        super().__init__(cfg, seed, batch)
        self.val: torch.Tensor | None = None

    def validation(self, pool: ImageSet) -> torch.Tensor:
        """RCS's validation positions: drawn once from the run seed (official: numpy seed 1), sorted."""
        if self.val is None:
            n = len(pool)
            n_val = n - int(n * (1 - self.cfg.val_fraction))
            if n_val < 1 or n_val >= n:
                raise BenchError(f"select.val_fraction={self.cfg.val_fraction} of {n} images gives {n_val} "
                                 "RCS validation images; it needs at least one and must leave training images")
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + 7_919))
            self.val = perm[n - n_val:].sort().values
        return self.val

    def training_positions(self, pool: ImageSet) -> torch.Tensor:
        keep = torch.ones(len(pool), dtype=torch.bool)
        keep[self.validation(pool)] = False
        return keep.nonzero().squeeze(1)

    def warmup_indices(self, pool: ImageSet) -> torch.Tensor | None:
        # ACL-RCS trains on the 99% pool from the start; DynACL-RCS (val_in_pool) on everything
        return None if self.cfg.val_in_pool else self.training_positions(pool)

    def choose(self, task: Any, epoch: int, pool: ImageSet) -> torch.Tensor:
        parts_of = getattr(task, "rcs_parts", None)
        if parts_of is None:
            raise BenchError(f"select.method=rcs: {type(task).__name__} does not expose RCS's parts (rcs_parts)")
        parts = parts_of(epoch)
        train = self.training_positions(pool)
        candidates = torch.arange(len(pool)) if self.cfg.val_in_pool else train
        picks = budget_batches(len(train), self.cfg.fraction, self.batch)  # the 99% pool, as RCS.py:167-169
        rows = validation_rows(self.validation(pool), self.batch, self.cfg.val_rows)
        return rcs_select(parts, pool, candidates=candidates, val_rows=rows, picks=picks, batch=self.batch,
                          lr=self.cfg.coreset_lr, double_step=self.cfg.rcs_double_step,
                          val_steps=self.cfg.val_attack_steps, val_step=self.cfg.val_step)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "val": self.val}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        val = state.get("val")
        self.val = None if val is None else torch.as_tensor(val, dtype=torch.long)
