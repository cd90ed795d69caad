"""Adversarial loss landscape (paper Figure 6, after Li et al. 2018, "Visualizing the loss landscape of neural nets").

For a classifier with weights theta (our `bench.models.Classifier`: encoder + linear head) and
random directions d1, d2 in weight space, the loss at theta + alpha d1 (+ beta d2), where the loss
is the paper's *adversarial* one: the mean cross-entropy on PGD examples crafted against the
model at that very point (L-inf, CE, uniform random start from a fixed seed, fp32, eval mode) on a
fixed set of n images.

Directions, as Li et al.'s code (`net_plotter.create_random_direction`, dir_type="weights",
norm="filter", ignore="biasbn") makes them: one Gaussian tensor per parameter
(`model.parameters()` order, drawn from a CPU generator seeded `seed`, so a direction is the same
on every device); every parameter with one dimension (biases, BatchNorm weights and biases) gets a
zero direction; every other parameter is cut into its filters along dimension 0 and each filter
d_k is rescaled to the norm of the weights' filter: d_k <- d_k * ||theta_k|| / (||d_k|| + 1e-10).
For a conv weight [out, in, h, w] a filter is one output channel; the linear head's weight
[classes, features] is a 2-D parameter like any other, so each class's weight row is a filter,
normalised the same way, and its bias is left at zero. BatchNorm running statistics are buffers,
not parameters: no direction moves them, and eval mode uses them as they are.

The 1-D curve uses d1; the 2-D surface uses (d1, d2), so the curve is the surface's beta = 0 row
where the grids meet (those points are computed once). Weights are restored exactly afterwards
(the saved tensors are copied back) and BatchNorm statistics are checked unchanged.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bench.attacks.pgd import attack_classifier, eval_guard
from bench.config import param
from bench.errors import BenchError

Direction = list[torch.Tensor]  # one tensor per model parameter, in model.parameters() order


@dataclass
class LandscapeConfig:
    """Settings of one loss-landscape sweep (an analysis job's config)."""

    n: int = param(256, min=1, help="test images the adversarial loss averages over (the same at every point)")
    span: float = param(1.0, min=0.0, help="alpha and beta run over [-span, span] (Li et al.: [-1, 1])")
    points_1d: int = param(21, min=1, help="grid points of the 1-D curve")
    points_2d: int = param(11, min=0, help="grid points per axis of the 2-D surface (0: no surface)")
    eps_255: float = param(8.0, min=0.0, help="PGD eps in units of 1/255")
    alpha_255: float = param(2.0, min=0.0, help="PGD step size in units of 1/255")
    steps: int = param(10, min=0, help="PGD steps at every point")
    seed: int = param(0, help="seeds the directions and the attack's random starts")
    batch_size: int = param(256, min=1)

    def check(self) -> "LandscapeConfig":
        if self.n < 1 or self.points_1d < 1 or self.points_2d < 0 or self.span < 0 or self.steps < 0:
            raise BenchError("landscape: need n >= 1, points_1d >= 1, points_2d >= 0, span >= 0, steps >= 0")
        return self

    def attack(self) -> dict[str, Any]:
        return {"eps": self.eps_255 / 255, "alpha": self.alpha_255 / 255, "steps": self.steps}


@dataclass
class Landscape:
    """`loss[j]` at alphas[j] (direction 1); `surface_loss[i][j]` at (surface_alphas[j], surface_betas[i])."""

    alphas: list[float]
    loss: list[float]
    accuracy: list[float]
    surface_alphas: list[float]
    surface_betas: list[float]
    surface_loss: list[list[float]]
    surface_accuracy: list[list[float]]
    config: LandscapeConfig
    n_images: int = 0  # the images the loss averaged over (cfg.n, or fewer if the split is smaller)

    def to_record(self) -> dict[str, Any]:
        """Plain JSON data (what an analysis job stores and `landscape_figures` takes)."""
        surface = None
        if self.surface_alphas:
            surface = {"alphas": self.surface_alphas, "betas": self.surface_betas, "loss": self.surface_loss,
                       "accuracy": self.surface_accuracy}
        return {"alphas": self.alphas, "loss": self.loss, "accuracy": self.accuracy, "surface": surface,
                "n_images": self.n_images, "settings": asdict(self.config)}


# ---------------------------------------------------------------- directions


def filter_normalized_direction(model: nn.Module, generator: torch.Generator) -> Direction:
    """A random direction, filter-normalised as Li et al. define it (see the module docstring)."""
    out = []
    for p in model.parameters():
        w = p.detach()
        d = torch.randn(w.shape, generator=generator, dtype=torch.float32).to(device=w.device, dtype=w.dtype)
        if w.dim() <= 1:
            d.zero_()
        else:
            w_norm = w.flatten(1).norm(dim=1)
            d_norm = d.flatten(1).norm(dim=1)
            d.mul_((w_norm / (d_norm + 1e-10)).view(-1, *[1] * (w.dim() - 1)))
        out.append(d)
    return out


def directions(model: nn.Module, seed: int, count: int = 2) -> list[Direction]:
    generator = torch.Generator().manual_seed(seed)
    return [filter_normalized_direction(model, generator) for _ in range(count)]


@contextlib.contextmanager
def perturbed_weights(model: nn.Module) -> Iterator:
    """Yields `move(coefs, dirs)`, which sets every parameter to theta + sum_k coefs[k] * dirs[k];
    the saved theta is copied back on exit (bit for bit)."""
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]

    def move(coefs: Sequence[float], dirs: Sequence[Direction]) -> None:
        with torch.no_grad():
            for j, (p, w) in enumerate(zip(params, saved)):
                value = w.clone()
                for c, d in zip(coefs, dirs):
                    if c != 0:
                        value.add_(d[j], alpha=float(c))
                p.copy_(value)

    try:
        yield move
    finally:
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)


# ---------------------------------------------------------------- the loss


def adversarial_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float, steps: int,
                     seed: int, batch_size: int = 256) -> tuple[float, float]:
    """(mean CE, accuracy) on PGD examples crafted against `model` as it is now. Batch b draws its random
    start from a generator seeded `seed + b`, so the same images get the same start at every point."""
    total, correct = 0.0, 0
    for b, s in enumerate(range(0, len(y), batch_size)):
        xb, yb = x[s:s + batch_size].float(), y[s:s + batch_size]
        x_adv = attack_classifier(model, xb, yb, eps=eps, alpha=alpha, steps=steps, seed=seed + b)
        with eval_guard(model), torch.no_grad():
            logits = model(x_adv)
        total += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    return total / len(y), correct / len(y)


def grid(span: float, points: int) -> list[float]:
    if points == 1:
        return [0.0]
    return [round(float(v), 10) for v in torch.linspace(-span, span, points, dtype=torch.float64)]


def loss_landscape(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: LandscapeConfig | None = None, *,
                   known: dict[tuple[float, float], tuple[float, float]] | None = None,
                   on_point: Callable[[float, float, float, float], None] | None = None,
                   **settings: Any) -> Landscape:
    """The 1-D curve and the 2-D surface of the adversarial loss around the model's weights.
    `x`, `y`: the n images (float [0, 1]) and labels, already on the model's device.

    `known` holds points already computed with these settings ((alpha, beta) -> (loss, accuracy)),
    which are not computed again (a resumed job); `on_point(alpha, beta, loss, accuracy)` is called
    after each point that is computed."""
    cfg = LandscapeConfig(**{**(asdict(cfg) if cfg is not None else {}), **settings}).check()
    x, y = x[:cfg.n], y[:cfg.n]
    attack = cfg.attack()
    d1, d2 = directions(model, cfg.seed, 2)
    done: dict[tuple[float, float], tuple[float, float]] = dict(known or {})
    with eval_guard(model), perturbed_weights(model) as move:
        def at(a: float, b: float) -> tuple[float, float]:
            if (a, b) not in done:
                move((a, b), (d1, d2))
                done[(a, b)] = adversarial_loss(model, x, y, seed=cfg.seed, batch_size=cfg.batch_size, **attack)
                if on_point is not None:
                    on_point(a, b, *done[(a, b)])
            return done[(a, b)]

        alphas = grid(cfg.span, cfg.points_1d)
        curve = [at(a, 0.0) for a in alphas]
        axis = grid(cfg.span, cfg.points_2d) if cfg.points_2d else []
        surface = [[at(a, b) for a in axis] for b in axis]
    return Landscape(alphas=alphas, loss=[c[0] for c in curve], accuracy=[c[1] for c in curve],
                     surface_alphas=axis, surface_betas=list(axis),
                     surface_loss=[[p[0] for p in row] for row in surface],
                     surface_accuracy=[[p[1] for p in row] for row in surface], config=cfg, n_images=len(y))
