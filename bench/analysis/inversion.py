"""Feature inversion maps (paper Figure 5): the image x0 + delta that drives one representation coordinate.

The paper (section 5.2, after Mahendran & Vedaldi 2015 and Engstrom et al. 2019, "Adversarial
robustness as a prior for learned representations") computes, for a seed image x0 and the i-th
coordinate of the representation f(x) (its Figure 5: neuron 502 of ResNet-18's 512),

    x_FIM = x0 + delta*,  delta* = argopt_delta [f(x0 + delta)]_i.

Its formula writes a minimisation; the works it follows maximise the activation. Both are here
(`direction = "max" | "min"`), maximising by default as Engstrom et al. do.

Optimisation, as in Engstrom et al.'s direct feature visualisation (the `robustness` library's
PGD with `constraint='2'`, `eps=1000`, `step_size=1`, 200 iterations, no random start, last iterate):
normalised-gradient steps on delta, `delta += step_size * g / ||g||_2` per image, then projection
onto the L2 ball of radius `eps` and clamping x0 + delta to [0, 1]. With eps = 1000 the ball
is no constraint for a 32x32 image (the whole [0,1] cube has diameter about 55): the budget is
"large" as the paper says. `norm = "linf"` takes signed steps and projects onto the L-inf ball
(choose eps and step_size for it; the defaults are the L2 ones).

Differences from `robustness`: its models pass gradients through the last ReLU (`fake_relu`);
ours do not, so a coordinate that is zero at every spatial position of a seed image has no
gradient and that image stays at its seed (minimising stops at 0 for the same reason: the
coordinate is a pooled ReLU output). The values per step show it.

The encoder runs in eval mode, fp32, with its parameters frozen (input gradients only); its
weights and BatchNorm statistics are unchanged afterwards (checked).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

from bench.attacks.pgd import eval_guard, frozen_parameters
from bench.config import param
from bench.errors import BenchError

DIRECTIONS = ("max", "min")
NORMS = ("l2", "linf")
_TINY = 1e-12


@dataclass
class InversionConfig:
    """Settings of one feature inversion (an analysis job's config)."""

    coordinate: int = param(502, min=0, help="i of [f(x)]_i (the paper shows neuron 502 of ResNet-18's 512)")
    direction: str = param("max", choices=DIRECTIONS,
                           help="max: maximise the coordinate (Engstrom et al.); min: the paper's formula as written")
    norm: str = param("l2", choices=NORMS, help="the ball delta is projected onto")
    eps: float = param(1000.0, min=0.0, help="radius of delta's ball (L2 1000 = Engstrom et al.'s 'unconstrained')")
    step_size: float = param(1.0, min=0.0, help="length of each normalised-gradient step (L2) or sign step (L-inf)")
    steps: int = param(200, min=0, help="projected gradient steps")
    n_images: int = param(5, min=1, help="seed images (rows of the figure)")
    seed: int = param(0, help="which seed images are drawn from the split")

    def check(self, feature_dim: int | None = None) -> "InversionConfig":
        if self.direction not in DIRECTIONS:
            raise BenchError(f"inversion direction {self.direction!r}: use one of {', '.join(DIRECTIONS)}")
        if self.norm not in NORMS:
            raise BenchError(f"inversion norm {self.norm!r}: use one of {', '.join(NORMS)}")
        if self.eps < 0 or self.step_size < 0 or self.steps < 0 or self.n_images < 1:
            raise BenchError("inversion: eps, step_size and steps must be >= 0 and n_images >= 1")
        if feature_dim is not None and not 0 <= self.coordinate < feature_dim:
            raise BenchError(f"inversion coordinate {self.coordinate} is outside this encoder's representation "
                             f"(size {feature_dim}); choose 0..{feature_dim - 1}")
        return self


@dataclass
class Inversion:
    """The result: seed images, optimised images (both [n, 3, H, W] in [0, 1], on the CPU) and
    `values[t, k]` = [f(x_t)]_i of image k after t steps (t = 0: the seed image)."""

    seeds: torch.Tensor
    images: torch.Tensor
    values: torch.Tensor
    config: InversionConfig
    seed_indices: list[int] | None = None

    @property
    def delta(self) -> torch.Tensor:
        return self.images - self.seeds

    def to_record(self) -> dict[str, Any]:
        """Plain JSON data (what an analysis job stores and `fim_figures` takes): images as uint8 HWC
        nested lists, values as floats [steps + 1][n], the settings."""
        return {"seeds": to_uint8_hwc(self.seeds).tolist(), "images": to_uint8_hwc(self.images).tolist(),
                "values": self.values.tolist(), "coordinate": self.config.coordinate,
                "direction": self.config.direction, "settings": asdict(self.config),
                "seed_indices": list(self.seed_indices) if self.seed_indices is not None else None}


def to_uint8_hwc(images: torch.Tensor):
    """[n, 3, H, W] floats in [0, 1] -> a numpy uint8 array [n, H, W, 3]."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def choose_seed_images(n_total: int, n: int, seed: int) -> list[int]:
    """`n` distinct positions of a split of `n_total` images, the same for every encoder (seeded)."""
    if n > n_total:
        raise BenchError(f"inversion: {n} seed images asked for, the split has {n_total}")
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_total, generator=generator)[:n].tolist())


def _project(delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    length = delta.flatten(1).norm(dim=1).clamp_min(_TINY).view(-1, *[1] * (delta.dim() - 1))
    return delta * torch.clamp(eps / length, max=1.0)


def _step(grad: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return grad.sign()
    length = grad.flatten(1).norm(dim=1).clamp_min(_TINY).view(-1, *[1] * (grad.dim() - 1))
    return grad / length


def invert_feature(encoder: nn.Module, x0: torch.Tensor, cfg: InversionConfig | None = None, *,
                   seed_indices: list[int] | None = None, resume: dict[str, Any] | None = None,
                   on_step: Callable[[dict[str, Any]], None] | None = None, **settings: Any) -> Inversion:
    """Optimise delta for the seed images `x0` ([n, 3, H, W] in [0, 1]) so that [encoder(x0 + delta)]_i
    moves in `cfg.direction`. Keyword settings override fields of `cfg` (or of the defaults).

    `on_step(state)` gets the state after each step ({"t": steps done, "delta", "values"}); passing
    such a state as `resume` continues from it exactly (the steps are deterministic)."""
    cfg = InversionConfig(**{**(asdict(cfg) if cfg is not None else {}), **settings})
    feature_dim = getattr(encoder, "feature_dim", None)
    cfg.check(feature_dim)
    sign = 1.0 if cfg.direction == "max" else -1.0
    i = cfg.coordinate
    x0 = x0.detach().float()
    values = []
    with eval_guard(encoder), frozen_parameters(encoder):
        if feature_dim is None:
            with torch.no_grad():
                cfg.check(encoder(x0[:1]).shape[1])
        delta = torch.zeros_like(x0)
        first = 0
        if resume is not None:
            first, delta = int(resume["t"]), resume["delta"].to(x0)
            values = [torch.as_tensor(v) for v in resume["values"]]
            if len(values) != first or delta.shape != x0.shape:
                raise BenchError(f"inversion: a resume state of {first} steps holds {len(values)} values and delta "
                                 f"{tuple(delta.shape)} for seeds {tuple(x0.shape)}")
        for t in range(first, cfg.steps + 1):
            x = (x0 + delta).requires_grad_(t < cfg.steps)
            with torch.enable_grad() if t < cfg.steps else torch.no_grad():
                value = encoder(x)[:, i]
                values.append(value.detach().cpu())
                if t == cfg.steps:
                    break
                (grad,) = torch.autograd.grad(sign * value.sum(), x)
            with torch.no_grad():
                delta = _project(delta + cfg.step_size * _step(grad, cfg.norm), cfg.norm, cfg.eps)
                # clamping to the image box only shrinks |delta| per pixel: it stays in the ball
                delta = (x0 + delta).clamp(0, 1) - x0
            if on_step is not None:
                on_step({"t": t + 1, "delta": delta.detach(), "values": list(values)})
    return Inversion(seeds=x0.cpu(), images=(x0 + delta).clamp(0, 1).detach().cpu(), values=torch.stack(values),
                     config=cfg, seed_indices=seed_indices)
