"""Per-sample accuracy under attack, shared by model selection (finetuners) and evaluation.

Every function here runs the model in eval mode, in fp32, with its parameters frozen (input
gradients only), and a `Watch` records what the sanity checks need: forwards of a module in
train mode during an attack, BatchNorm statistics that changed, the mode not restored,
perturbations outside the eps ball or [0, 1]. Data comes as a callable that yields (x, y)
batches (`tensor_batches`, `image_batches`), so nothing here depends on how datasets are stored.
The `*_protocol` functions give the protocol dict every stored number carries.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

import bench
from bench.attacks.pgd import eval_guard, frozen_parameters, perturbation_size, pgd
from bench.models.norm import bn_state

PGD_IMPLEMENTATION = "bench.attacks.pgd"
PERTURBATION_TOLERANCE = 1e-6
Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


# ---------------------------------------------------------------- the watch on the model


@dataclass
class Watch:
    """What the sanity checks need to know about the attacks run under it."""

    train_forwards: int = 0           # forwards of a BatchNorm/Dropout module in train mode
    max_perturbation: float = 0.0     # max |x_adv - x| seen
    out_of_range: bool = False        # an x_adv outside [0,1]
    violations: list[str] = field(default_factory=list)  # perturbation problems, named
    bn_changed: list[str] = field(default_factory=list)
    mode_restored: bool = True

    def check_perturbation(self, x_adv: torch.Tensor, x: torch.Tensor, eps: float, what: str,
                           norm: str = "Linf") -> None:
        if len(x) == 0:
            return
        delta = float((x_adv - x).abs().max()) if norm == "Linf" else perturbation_size(x_adv, x, norm)
        self.max_perturbation = max(self.max_perturbation, delta)
        if delta > eps + PERTURBATION_TOLERANCE:
            size = "max |x_adv - x|" if norm == "Linf" else "max ||x_adv - x||_2"
            self.violations.append(f"{what}: {size} = {delta:.6g} exceeds eps = {eps:.6g}")
        if bool(x_adv.min() < 0) or bool(x_adv.max() > 1):
            self.out_of_range = True
            self.violations.append(f"{what}: adversarial images outside [0, 1] "
                                   f"(min {float(x_adv.min()):.4g}, max {float(x_adv.max()):.4g})")

    @classmethod
    def merged(cls, watches: Iterable["Watch"]) -> "Watch":
        """One watch from several, as if a single watch had seen them in this order."""
        out = cls()
        for w in watches:
            out.train_forwards += w.train_forwards
            out.max_perturbation = max(out.max_perturbation, w.max_perturbation)
            out.out_of_range = out.out_of_range or w.out_of_range
            out.violations += w.violations
            out.bn_changed += w.bn_changed
            out.mode_restored = out.mode_restored and w.mode_restored
        return out


_WATCHED = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)


@contextlib.contextmanager
def watched(model: nn.Module, watch: Watch) -> Iterator[nn.Module]:
    """Eval mode, fp32, frozen parameters, with forward hooks that count train-mode forwards;
    afterwards records whether the mode came back and whether any BN statistic changed."""
    was_training = model.training
    before = bn_state(model)

    def hook(module: nn.Module, _inputs: Any) -> None:
        if module.training:
            watch.train_forwards += 1

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, _WATCHED)]
    try:
        with eval_guard(model, check_bn=False), frozen_parameters(model):
            yield model
    finally:
        for h in handles:
            h.remove()
        if model.training != was_training:
            watch.mode_restored = False
            model.train(was_training)
        after = bn_state(model)
        watch.bn_changed += [k for k in before if not torch.equal(before[k], after[k])]


# ---------------------------------------------------------------- clean and PGD accuracy


def tensor_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Batches:
    return lambda: ((x[s:s + batch_size], y[s:s + batch_size]) for s in range(0, len(y), batch_size))


def image_batches(data: Any, batch_size: int) -> Batches:
    """Float [0,1] batches of an ImageSet (anything with `images(slice)`, `y`), in order (uint8
    on the device until each batch)."""
    return lambda: ((data.images(slice(s, s + batch_size)), data.y[s:s + batch_size])
                    for s in range(0, len(data), batch_size))


def clean_correct(model: nn.Module, batches: Batches, watch: Watch | None = None,
                  predictions: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Per-sample correctness on clean images (bool, on the CPU); the predicted classes of each
    batch are appended to `predictions` when given (the collapse check counts them)."""
    watch = watch if watch is not None else Watch()
    out = []
    with watched(model, watch), torch.no_grad():
        for x, y in batches():
            predicted = model(x.float()).argmax(1)
            out.append((predicted == y).cpu())
            if predictions is not None:
                predictions.append(predicted.cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def pgd_correct(model: nn.Module, batches: Batches, *, eps: float, alpha: float, steps: int, seed: int,
                restarts: int = 1, watch: Watch | None = None,
                on_batch: Callable[[], None] | None = None, clamp_start: bool = False,
                norm: str = "Linf") -> torch.Tensor:
    """Per-sample robustness to PGD in `norm` (CE, uniform random start, fp32, eval mode).

    `clamp_start`: clip the random start x + U(-eps, eps) to [0, 1] before the first step (False,
    the default: unclipped, as AdvCL's and ACL's official evaluations; every step clips).

    A sample counts as robust only if the model classifies it correctly after every restart.
    Restart r draws its random starts from one generator seeded `seed + r`, consumed batch by
    batch in order, so a run is reproducible for a given batch size.
    """
    robust: torch.Tensor | None = None
    for r in range(restarts):
        this = pgd_correct_at(model, batches, eps=eps, alpha=alpha, steps=[steps], seed=seed + r, watch=watch,
                              on_batch=on_batch, clamp_start=clamp_start, norm=norm)[steps]
        robust = this if robust is None else robust & this
    return robust if robust is not None else torch.zeros(0, dtype=torch.bool)


def pgd_correct_at(model: nn.Module, batches: Batches, *, eps: float, alpha: float, steps: Iterable[int],
                   seed: int, watch: Watch | None = None, on_batch: Callable[[], None] | None = None,
                   clamp_start: bool = False, norm: str = "Linf") -> dict[int, torch.Tensor]:
    """Per-sample correctness after k PGD steps, for every k in `steps`, from one run of max(steps).

    PGD with k steps is the first k iterations of PGD with more steps (same start, same step
    size), so one run gives the whole steps axis of a sweep; the correctness of an iterate comes
    from the forward pass that computes its gradient (no extra pass).
    """
    watch = watch if watch is not None else Watch()
    wanted = sorted(set(int(k) for k in steps))
    last = wanted[-1]
    out: dict[int, list[torch.Tensor]] = {k: [] for k in wanted}
    generator = None
    with watched(model, watch):
        for x, y in batches():
            x = x.float()
            if generator is None:
                generator = torch.Generator(device=x.device).manual_seed(seed)
            seen: dict[int, torch.Tensor] = {}
            calls = 0

            def gradient(advs: list[torch.Tensor]) -> list[torch.Tensor]:
                nonlocal calls
                logits = model(advs[0])
                if calls in out:  # this iterate is the result of `calls` steps
                    seen[calls] = (logits.detach().argmax(1) == y).cpu()
                calls += 1
                return list(torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), advs))

            x_adv = pgd(None, x, eps=eps, alpha=alpha, steps=last, random_start="uniform", generator=generator,
                        gradient=gradient, clamp_start=clamp_start, norm=norm)
            where = f"eps={eps * 255:.3g}/255" if norm == "Linf" else f"L2 eps={eps:.3g}"
            watch.check_perturbation(x_adv, x, eps, f"PGD-{last} {where}", norm)
            with torch.no_grad():
                seen[last] = (model(x_adv).argmax(1) == y).cpu()
            for k in wanted:
                out[k].append(seen[k])
            if on_batch is not None:
                on_batch()
    return {k: torch.cat(v) if v else torch.zeros(0, dtype=torch.bool) for k, v in out.items()}


# ---------------------------------------------------------------- protocols


def pgd_protocol(*, eps: float, alpha: float, steps: int, restarts: int, n: int, seed: int,
                 batch_size: int, images: str, clamp_start: bool = False, norm: str = "Linf") -> dict[str, Any]:
    return {"attack": "pgd", "norm": norm, "eps": eps, "eps_255": round(eps * 255, 6), "alpha": alpha,
            "alpha_255": round(alpha * 255, 6), "steps": steps, "restarts": restarts, "random_start": "uniform",
            "clamp_start": clamp_start, "loss": "ce", "precision": "fp32", "mode": "eval", "n": n, "seed": seed, "batch_size": batch_size,
            "images": images, "implementation": PGD_IMPLEMENTATION, "version": bench.__version__}


def clean_protocol(*, n: int, seed: int, batch_size: int, images: str) -> dict[str, Any]:
    return {"attack": None, "precision": "fp32", "mode": "eval", "n": n, "seed": seed, "batch_size": batch_size,
            "images": images, "implementation": "bench.attacks.accuracy", "version": bench.__version__}
