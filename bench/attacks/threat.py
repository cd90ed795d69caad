"""Threat models: the norm, its standard radius and step size, and the eps values of the sweeps.

A config that can attack under either norm keeps one (eps, alpha) pair per norm: `eps`/`alpha`
for L-inf (the harness's historical fields, unchanged) and `l2_eps`/`l2_alpha` for L2, and a
`norm` field that picks the pair. So `eval.norm=L2` alone gives the standard L2 evaluation, and
nothing that reads `eps` for L-inf (model selection, the records of earlier runs) changes meaning.

Standard values (CIFAR, RobustBench): L-inf eps 8/255, L2 eps 0.5. Step size: eps / 4 for both
(2/255 at 8/255 is the harness's L-inf protocol; 0.125 at 0.5 keeps the same ratio for L2, so
PGD-20 reaches the boundary in 4 steps under either norm). AutoAttack needs no step size (APGD
adapts its own). The attack-strength sweep over eps uses the same multiples of the standard
radius under both norms: {2, 4, 6, 8, 10, 12, 16}/255 for L-inf, {0.125, ..., 1.0} for L2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.attacks.pgd import NORMS
from bench.errors import BenchError

STANDARD_EPS = {"Linf": 8 / 255, "L2": 0.5}
STANDARD_ALPHA = {"Linf": 2 / 255, "L2": 0.125}
SWEEP_EPS = {"Linf": tuple(e / 255 for e in (2, 4, 6, 8, 10, 12, 16)),
             "L2": (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 1.0)}


@dataclass(frozen=True)
class Threat:
    norm: str
    eps: float
    alpha: float

    def label(self) -> str:
        """"L-inf eps 8/255" or "L2 eps 0.5"."""
        return f"L-inf eps {self.eps * 255:.4g}/255" if self.norm == "Linf" else f"L2 eps {self.eps:.4g}"


def threat_of(cfg: Any) -> Threat:
    """The threat model a config selects: its `norm` (default L-inf) and that norm's eps and alpha."""
    norm = getattr(cfg, "norm", "Linf")
    if norm not in NORMS:
        raise BenchError(f"norm {norm!r}: one of {', '.join(NORMS)}")
    if norm == "L2":
        return Threat("L2", float(cfg.l2_eps), float(cfg.l2_alpha))
    return Threat("Linf", float(cfg.eps), float(cfg.alpha))


def sweep_eps(cfg: Any) -> list[float]:
    """The eps axis of the attack-strength sweep of an EvalConfig, as given (1/255 units for L-inf)."""
    if getattr(cfg, "norm", "Linf") == "L2":
        return [float(e) for e in cfg.l2_sweep_eps]
    return list(cfg.sweep_eps)


def sweep_points(cfg: Any) -> list[tuple[float, float]]:
    """(eps, alpha) of every point of the eps sweep: eval's ratio alpha/eps at every radius."""
    threat = threat_of(cfg)
    ratio = threat.alpha / threat.eps if threat.eps > 0 else 0.0
    if threat.norm == "L2":
        return [(float(e), ratio * float(e)) for e in cfg.l2_sweep_eps]
    return [(e / 255, ratio * e / 255) for e in cfg.sweep_eps]  # the historical L-inf arithmetic, bit for bit
