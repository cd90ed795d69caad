"""Evaluation of a finetuned classifier: SA, RA (PGD-20), AA, attack-strength sweeps, sanity checks.

Every number is a `Metric` (value, n, correct, Wilson 95% interval) with the full protocol that
produced it. Every attack runs in fp32 with the model in eval mode and its parameters frozen;
a watch on the model records what the sanity checks need (a module in train mode during an
attack, BatchNorm statistics that changed, the mode not restored, perturbations outside the eps
ball or [0,1]). Problems become warnings in the record; they do not stop the job.

`run_evaluate_job` is the runner's job function; `evaluate_classifier` does the work on a
model and an `ImageSet`, for tests and scripts. In a job, each finished stage (SA, RA, sweeps,
AA) is saved in the job folder (`Stages`) and AutoAttack keeps a per-batch state, so a rerun
after an interruption redoes neither.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

import bench
from bench.attacks.autoattack import (AAResult, to_bits, from_bits, cuda_devices, model_digest,
                                     pyautoattack_version, run_autoattack, square_gain)
from bench.attacks.pgd import eval_guard, frozen_parameters, perturbation_size, pgd
from bench.attacks.threat import sweep_eps, sweep_points, threat_of
from bench.config import DataConfig, EvalConfig, from_dict
from bench.datasets import ImageSet
from bench.models.norm import bn_state
from bench.record import Metric, Record, provenance

log = logging.getLogger(__name__)

PGD_IMPLEMENTATION = "bench.attacks.pgd"
AA_IMPLEMENTATION = "pyautoattack"
AA_STATE = "aa_state.json"      # AutoAttack's per-batch state (bench.attacks.autoattack)
EVAL_STATE = "eval_state.json"  # the finished stages (Stages)
EVAL_STATE_FORMAT = "bench-eval-state/1"
PERTURBATION_TOLERANCE = 1e-6
SQUARE_TOLERANCE = 0.002  # pyautoattack's own threshold (check_square_sr), as a fraction of n
Progress = Callable[[dict[str, Any]], None]
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


def image_batches(data: ImageSet, batch_size: int) -> Batches:
    """Float [0,1] batches of an ImageSet, in order (uint8 on the device until each batch)."""
    return lambda: ((data.images(slice(s, s + batch_size)), data.y[s:s + batch_size])
                    for s in range(0, len(data), batch_size))


def clean_correct(model: nn.Module, batches: Batches, watch: Watch | None = None) -> torch.Tensor:
    """Per-sample correctness on clean images (bool, on the CPU)."""
    watch = watch if watch is not None else Watch()
    out = []
    with watched(model, watch), torch.no_grad():
        for x, y in batches():
            out.append((model(x.float()).argmax(1) == y).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def pgd_correct(model: nn.Module, batches: Batches, *, eps: float, alpha: float, steps: int, seed: int,
                restarts: int = 1, watch: Watch | None = None,
                on_batch: Callable[[], None] | None = None, norm: str = "Linf") -> torch.Tensor:
    """Per-sample robustness to PGD in `norm` (CE, uniform random start, fp32, eval mode).

    A sample counts as robust only if the model classifies it correctly after every restart.
    Restart r draws its random starts from one generator seeded `seed + r`, consumed batch by
    batch in order, so a run is reproducible for a given batch size.
    """
    robust: torch.Tensor | None = None
    for r in range(restarts):
        this = pgd_correct_at(model, batches, eps=eps, alpha=alpha, steps=[steps], seed=seed + r, watch=watch,
                              on_batch=on_batch, norm=norm)[steps]
        robust = this if robust is None else robust & this
    return robust if robust is not None else torch.zeros(0, dtype=torch.bool)


def pgd_correct_at(model: nn.Module, batches: Batches, *, eps: float, alpha: float, steps: Iterable[int],
                   seed: int, watch: Watch | None = None,
                   on_batch: Callable[[], None] | None = None, norm: str = "Linf") -> dict[int, torch.Tensor]:
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
                        gradient=gradient, norm=norm)
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
                 batch_size: int, images: str, norm: str = "Linf") -> dict[str, Any]:
    return {"attack": "pgd", "norm": norm, "eps": eps, "eps_255": round(eps * 255, 6), "alpha": alpha,
            "alpha_255": round(alpha * 255, 6), "steps": steps, "restarts": restarts, "random_start": "uniform",
            "loss": "ce", "precision": "fp32", "mode": "eval", "n": n, "seed": seed, "batch_size": batch_size,
            "images": images, "implementation": PGD_IMPLEMENTATION, "version": bench.__version__}


def clean_protocol(*, n: int, seed: int, batch_size: int, images: str) -> dict[str, Any]:
    return {"attack": None, "precision": "fp32", "mode": "eval", "n": n, "seed": seed, "batch_size": batch_size,
            "images": images, "implementation": "bench.evaluate", "version": bench.__version__}


def aa_protocol(result: AAResult, *, eps: float, n: int, seed: int, batch_size: int, images: str,
                norm: str = "Linf") -> dict[str, Any]:
    s = result.settings
    return {"attack": "autoattack", "norm": norm, "eps": eps, "eps_255": round(eps * 255, 6),
            "aa_version": result.aa_version, "attacks": list(result.attacks),
            "n_target_classes": result.n_target_classes, "steps": s.get("apgd_iterations"),
            "restarts": s.get("apgd_restarts"), "alpha": None, "settings": dict(s),
            "robust_after": dict(result.robust_after), "precision": "fp32", "mode": "eval", "n": n,
            "seed": seed, "batch_size": batch_size, "images": images, "implementation": AA_IMPLEMENTATION,
            "version": result.version}


def plain(metric: Metric | None) -> dict[str, Any] | None:
    """A Metric as the JSON-native dict a record stores (so a record read back compares equal)."""
    if metric is None:
        return None
    return json.loads(json.dumps(dataclasses.asdict(metric)))


def _value(m: Any) -> float:
    return float(m["value"] if isinstance(m, dict) else m.value)


def _n(m: Any) -> int:
    return int(m["n"] if isinstance(m, dict) else m.n)


def _ci(m: Any) -> tuple[float, float]:
    lo, hi = m["ci95"] if isinstance(m, dict) else m.ci95
    return float(lo), float(hi)


# ---------------------------------------------------------------- sanity checks


def sanity_warnings(sa: Any, ra: Any, aa: Any | None = None, *, ra_on_aa: Any | None = None,
                    watch: Watch | None = None, aa_result: AAResult | None = None,
                    sweeps: dict[str, list[Any]] | None = None) -> list[str]:
    """Warnings for one evaluated cell. Metrics may be `Metric`s or their dicts.

    RA <= SA and AA <= RA must hold up to sampling noise: a warning when the smaller-expected
    value is above the other's 95% interval. AA is compared with `ra_on_aa`, PGD's accuracy on
    AA's own images, when given (the first aa_n images can be easier or harder than the first
    n), else with RA. The sweeps must not rise with eps or steps beyond
    the interval of an earlier point. From the watch: a train-mode forward during an attack,
    BN statistics changed, mode not restored, perturbations outside eps or [0,1]. From the AA
    run: Square breaking samples that APGD-CE, APGD-T and FAB-T all missed (more than
    pyautoattack's 0.2% of n), and pyautoattack's own check messages.
    """
    out: list[str] = []
    if ra is not None and sa is not None and _value(ra) > _ci(sa)[1]:
        out.append(f"RA ({_value(ra):.4f}) is above SA ({_value(sa):.4f}, 95% CI up to {_ci(sa)[1]:.4f}): "
                   f"the PGD attack is broken or the model's outputs are random")
    versus = ra_on_aa if ra_on_aa is not None else ra
    if aa is not None and versus is not None and _value(aa) > _ci(versus)[1]:
        same = f" on the same {_n(versus)} images" if ra_on_aa is not None else ""
        out.append(f"AA ({_value(aa):.4f}) is above RA{same} ({_value(versus):.4f}, 95% CI up to "
                   f"{_ci(versus)[1]:.4f}): AutoAttack should never be weaker than PGD-20")
    for axis, points in (sweeps or {}).items():
        for i in range(1, len(points)):
            prev, cur = points[i - 1], points[i]
            if _value(cur) > _ci(prev)[1]:
                out.append(f"the {axis} sweep rises: RA {_value(cur):.4f} at {_label(cur, axis)} is above the "
                           f"95% CI of {_label(prev, axis)} ({_value(prev):.4f}, up to {_ci(prev)[1]:.4f})")
    if watch is not None:
        if watch.train_forwards:
            out.append(f"the model was in train mode during an attack ({watch.train_forwards} module forwards "
                       f"in train mode)")
        if watch.bn_changed:
            out.append(f"BatchNorm statistics changed during evaluation: {', '.join(watch.bn_changed[:3])}"
                       f"{' ...' if len(watch.bn_changed) > 3 else ''}")
        if not watch.mode_restored:
            out.append("the model's train/eval mode was not restored after an attack")
        out.extend(dict.fromkeys(watch.violations))  # each distinct violation once
    if aa_result is not None:
        gain = square_gain(aa_result.robust_after, aa_result.attacks)
        if aa_result.n and gain / aa_result.n > SQUARE_TOLERANCE:
            out.append(f"Square broke {gain} of {aa_result.n} samples that APGD-CE, APGD-T and FAB-T all "
                       f"failed on ({100 * gain / aa_result.n:.2f}%): the gradient attacks are unreliable "
                       f"here (gradient masking?)")
        out.extend(f"pyautoattack: {m}" for m in aa_result.messages)
        budget = aa_result.settings.get("budget", 1.0)
        if budget < 1:
            out.append(f"AutoAttack ran at {budget:g} of its standard iterations and queries (eval.aa_budget): "
                       f"a smoke-test AA, weaker than the standard evaluation")
    return out


def _label(m: Any, axis: str) -> str:
    protocol = m["protocol"] if isinstance(m, dict) else m.protocol
    if axis != "eps":
        return f"{protocol.get('steps')} steps"
    return f"eps {protocol.get('eps_255')}/255" if protocol.get("norm", "Linf") == "Linf" else f"L2 eps {protocol.get('eps')}"


# ---------------------------------------------------------------- the evaluation


def evaluate_classifier(model: nn.Module, test: ImageSet, eval_cfg: EvalConfig, seed: int,
                        workdir: Path | str | None = None, on_progress: Progress | None = None
                        ) -> dict[str, Any]:
    """SA and RA on the first eval.n test images, sweeps on the first eval.sweep_n, AA on the first
    eval.aa_n. Returns {"sa", "ra", "aa", "sweeps": Metric / None, "warnings": [...],
    "per_sample": {"clean", "pgd", "aa": bool tensors}, "aa_result": AAResult | None}.

    With `workdir` (the evaluate job's folder) every finished stage is saved there (`Stages`) and
    AutoAttack keeps its per-batch state in `aa_state.json`, so a rerun after an interruption skips
    the finished stages and AutoAttack continues from the samples already decided. AutoAttack runs
    last: it dominates the time, so an interruption is most likely there.
    """
    c = eval_cfg
    threat = threat_of(c)  # the norm and its eps, alpha
    bs = c.batch_size
    n = min(c.n, len(test))
    aa_n = min(c.aa_n, len(test))
    sweep_n = min(c.sweep_n, len(test))
    head = test.first(n)
    where = f"first {{}} of {test.name} test"
    total = _work(c, n, aa_n, sweep_n)
    done = 0
    stages = Stages(Path(workdir) / EVAL_STATE if workdir is not None else None, model)
    watches: list[Watch] = []  # one per stage, merged in run order (a skipped stage's comes from its file)

    def tick(phase: str, amount: int = 1) -> None:
        nonlocal done
        done += amount
        if on_progress is not None:
            on_progress({"phase": phase, "done": done, "total": total})

    def stage(name: str, data: ImageSet, settings: dict[str, Any], work: int,
              compute: Callable[[Watch], dict[str, Any]]) -> dict[str, Any]:
        result, watch, skipped = stages.run(name, data, settings, compute)
        watches.append(watch)
        if skipped:
            tick(name, work)
        return result

    def sa_stage(watch: Watch) -> dict[str, Any]:
        flags = clean_correct(model, image_batches(head, bs), watch)
        tick("clean", _batches(n, bs))
        return {"correct": to_bits(flags)}

    clean = from_bits(stage("clean", head, {"batch_size": bs}, _batches(n, bs), sa_stage)["correct"])
    sa = Metric.from_counts(int(clean.sum()), n, clean_protocol(n=n, seed=seed, batch_size=bs, images=where.format(n)))

    def ra_stage(watch: Watch) -> dict[str, Any]:
        flags = pgd_correct(model, image_batches(head, bs), eps=threat.eps, alpha=threat.alpha, steps=c.steps,
                            seed=seed, restarts=c.restarts, watch=watch, on_batch=lambda: tick("pgd", c.steps),
                            norm=threat.norm)
        return {"robust": to_bits(flags)}

    ra_settings = {"eps": threat.eps, "alpha": threat.alpha, "steps": c.steps, "restarts": c.restarts, "seed": seed,
                   "batch_size": bs, "norm": threat.norm}
    robust = from_bits(stage("pgd", head, ra_settings, _batches(n, bs) * c.steps * c.restarts, ra_stage)["robust"])
    ra = Metric.from_counts(int(robust.sum()), n, pgd_protocol(
        eps=threat.eps, alpha=threat.alpha, steps=c.steps, restarts=c.restarts, n=n, seed=seed, batch_size=bs,
        images=where.format(n), norm=threat.norm))

    sweeps = None
    if sweep_n > 0:
        part = test.first(sweep_n)

        def sweep_stage(watch: Watch) -> dict[str, Any]:
            flags = sweep_flags(model, part, c, seed, watch, on_batch=lambda steps: tick("sweeps", steps))
            return {axis: [to_bits(f) for f in points] for axis, points in flags.items()}

        sweep_settings = {"eps": threat.eps, "alpha": threat.alpha, "sweep_eps": sweep_eps(c),
                          "sweep_steps": list(c.sweep_steps), "seed": seed, "batch_size": bs, "norm": threat.norm}
        saved = stage("sweeps", part, sweep_settings, _sweep_work(c, sweep_n), sweep_stage)
        sweeps = sweep_metrics({axis: [from_bits(f) for f in points] for axis, points in saved.items()}, c, seed,
                               batch_size=bs, images=where.format(sweep_n))

    aa = None
    aa_result = None
    aa_flags = None
    if aa_n > 0:
        part = test.first(aa_n)
        aa_state_path = Path(workdir) / AA_STATE if workdir is not None else None

        def aa_stage(watch: Watch) -> dict[str, Any]:
            x = part.images(slice(0, aa_n))
            with watched(model, watch), torch.random.fork_rng(devices=cuda_devices(x)):
                result = run_autoattack(model, x, part.y, eps=threat.eps, num_classes=test.num_classes, seed=seed,
                                        version=c.aa_version, batch_size=bs, budget=c.aa_budget,
                                        state_path=aa_state_path,
                                        on_batch=lambda attack, *_: tick(f"autoattack {attack}", 0),
                                        norm=threat.norm)
            watch.max_perturbation = max(watch.max_perturbation, result.max_perturbation)
            if result.max_perturbation > threat.eps + PERTURBATION_TOLERANCE:
                size = "max |x_adv - x|" if threat.norm == "Linf" else "max ||x_adv - x||_2"
                watch.violations.append(f"AutoAttack: {size} = {result.max_perturbation:.6g} exceeds "
                                        f"eps = {threat.eps:.6g}")
            if result.out_of_range:
                watch.violations.append("AutoAttack: adversarial images outside [0, 1]")
            tick("autoattack", _aa_work(aa_n, bs))
            return result.to_dict()

        aa_settings = {"eps": threat.eps, "seed": seed, "aa_version": c.aa_version, "aa_budget": c.aa_budget,
                       "num_classes": test.num_classes, "norm": threat.norm,
                       "batch_size": bs, "pyautoattack": pyautoattack_version()}
        aa_result = AAResult.from_dict(stage("autoattack", part, aa_settings, _aa_work(aa_n, bs), aa_stage))
        aa_flags = aa_result.robust
        aa = Metric.from_counts(aa_result.correct, aa_n, aa_protocol(
            aa_result, eps=threat.eps, n=aa_n, seed=seed, batch_size=bs, images=where.format(aa_n),
            norm=threat.norm))

    # AA's images are the first aa_n, so within RA's first n when aa_n <= n: compare on those
    ra_on_aa = Metric.from_counts(int(robust[:aa_n].sum()), aa_n) if aa is not None and aa_n <= n else None
    watch = merge_watches(watches)
    warnings = sanity_warnings(sa, ra, aa, ra_on_aa=ra_on_aa, watch=watch, aa_result=aa_result, sweeps=sweeps)
    for w in warnings:
        log.warning("%s", w)
    return {"sa": sa, "ra": ra, "aa": aa, "sweeps": sweeps, "warnings": warnings,
            "per_sample": {"clean": clean, "pgd": robust, "aa": aa_flags}, "aa_result": aa_result}


def sweep_flags(model: nn.Module, data: ImageSet, c: EvalConfig, seed: int, watch: Watch | None = None, *,
                on_batch: Callable[[int], None] | None = None) -> dict[str, list[torch.Tensor]]:
    """Per-sample robustness at every sweep point: {"eps": [one per eval.sweep_eps (L-inf) or
    eval.l2_sweep_eps (L2)], "steps": [one per eval.sweep_steps]}. The eps axis runs 20 steps with
    eval's ratio alpha/eps (2/255 at 8/255, 0.125 at 0.5); the steps axis runs at eval's eps and
    alpha of its norm. One restart, the same seed everywhere.
    The steps axis is one run of max(steps) read at every count (see `pgd_correct_at`)."""
    watch = watch if watch is not None else Watch()
    threat = threat_of(c)
    batches = image_batches(data, c.batch_size)
    by_steps: list[torch.Tensor] = []
    reuse: dict[tuple[float, float, int], torch.Tensor] = {}
    if c.sweep_steps:
        most = max(c.sweep_steps)
        flags = pgd_correct_at(model, batches, eps=threat.eps, alpha=threat.alpha, steps=c.sweep_steps, seed=seed,
                               watch=watch, on_batch=(lambda: on_batch(most)) if on_batch else None, norm=threat.norm)
        by_steps = [flags[s] for s in c.sweep_steps]
        reuse = {(round(threat.eps, 12), round(threat.alpha, 12), s): f for s, f in flags.items()}
    by_eps: list[torch.Tensor] = []
    for eps, alpha in sweep_points(c):
        key = (round(eps, 12), round(alpha, 12), 20)
        if key not in reuse:
            reuse[key] = pgd_correct(model, batches, eps=eps, alpha=alpha, steps=20, seed=seed, watch=watch,
                                     on_batch=(lambda: on_batch(20)) if on_batch else None, norm=threat.norm)
        by_eps.append(reuse[key])
    return {"eps": by_eps, "steps": by_steps}


def sweep_metrics(flags: dict[str, list[torch.Tensor]], c: EvalConfig, seed: int, *, batch_size: int,
                  images: str = "") -> dict[str, list[Metric]]:
    """The sweep points of `sweep_flags` as Metrics with their protocol."""
    threat = threat_of(c)

    def metric(f: torch.Tensor, eps: float, alpha: float, steps: int) -> Metric:
        n = len(f)
        return Metric.from_counts(int(f.sum()), n, pgd_protocol(
            eps=eps, alpha=alpha, steps=steps, restarts=1, n=n, seed=seed, batch_size=batch_size, images=images,
            norm=threat.norm))

    return {"eps": [metric(f, e, a, 20) for (e, a), f in zip(sweep_points(c), flags["eps"])],
            "steps": [metric(f, threat.eps, threat.alpha, s) for s, f in zip(c.sweep_steps, flags["steps"])]}


def attack_sweeps(model: nn.Module, data: ImageSet, c: EvalConfig, seed: int, watch: Watch | None = None, *,
                  on_batch: Callable[[int], None] | None = None, images: str = "") -> dict[str, list[Metric]]:
    """RA against eps and against steps (paper Figure 3): `sweep_flags` as Metrics."""
    flags = sweep_flags(model, data, c, seed, watch, on_batch=on_batch)
    return sweep_metrics(flags, c, seed, batch_size=c.batch_size, images=images)


# ---------------------------------------------------------------- saved stages


def merge_watches(watches: Iterable[Watch]) -> Watch:
    """One watch from the stages' watches, as if a single watch had seen them in this order."""
    out = Watch()
    for w in watches:
        out.train_forwards += w.train_forwards
        out.max_perturbation = max(out.max_perturbation, w.max_perturbation)
        out.out_of_range = out.out_of_range or w.out_of_range
        out.violations += w.violations
        out.bn_changed += w.bn_changed
        out.mode_restored = out.mode_restored and w.mode_restored
    return out


class Stages:
    """The finished stages of one evaluation (clean, pgd, sweeps, autoattack) in one JSON file,
    rewritten atomically after each stage, so a rerun of the job skips them.

    Each entry holds the stage's per-sample flags and its watch, under a fingerprint of the
    model's weights, the stage's images and labels, the device type, the bench version and the
    stage's settings: an entry made for anything else is ignored and the stage runs again.
    With no path nothing is saved and every stage runs.
    """

    def __init__(self, path: Path | None, model: nn.Module):
        self.path = path
        self.model = model
        self.model_sha: str | None = None
        self.entries: dict[str, Any] = {}
        if path is None or not path.is_file():
            return
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("ignored an unreadable evaluation state %s (%s)", path, exc)
            return
        if isinstance(data, dict) and data.get("format") == EVAL_STATE_FORMAT:
            self.entries = dict(data.get("stages") or {})

    def fingerprint(self, name: str, data: ImageSet, settings: dict[str, Any]) -> dict[str, Any]:
        if self.model_sha is None:
            self.model_sha = model_digest(self.model)
        digest = hashlib.sha256(data.x.detach().cpu().contiguous().numpy().tobytes())
        digest.update(data.y.detach().cpu().numpy().astype("int64").tobytes())
        fp = {"stage": name, "model_sha256": self.model_sha, "data_sha256": digest.hexdigest()[:16], "n": len(data),
              "device": data.x.device.type, "bench": bench.__version__, "settings": settings}
        return json.loads(json.dumps(fp))  # JSON-native, to compare with what a file holds

    def run(self, name: str, data: ImageSet, settings: dict[str, Any],
            compute: Callable[[Watch], dict[str, Any]]) -> tuple[dict[str, Any], Watch, bool]:
        """(result, watch, skipped): the saved result if it fits, else compute(watch), saved."""
        fp = self.fingerprint(name, data, settings) if self.path is not None else None
        entry = self.entries.get(name)
        if fp is not None and isinstance(entry, dict) and entry.get("fingerprint") == fp:
            log.info("evaluation stage %s: done before, read from %s", name, self.path)
            return entry["result"], Watch(**entry["watch"]), True
        if entry is not None:
            log.info("evaluation stage %s: the saved result was made for another model, other data or other "
                     "settings; running it again", name)
        watch = Watch()
        result = compute(watch)
        # Through JSON in every case, so a straight run and a resumed one build the record from the same data.
        entry = json.loads(json.dumps({"fingerprint": fp, "result": result, "watch": dataclasses.asdict(watch)}))
        if self.path is not None:
            from bench.store import write_text_atomic

            self.entries[name] = entry
            write_text_atomic(self.path, json.dumps({"format": EVAL_STATE_FORMAT, "stages": self.entries}))
        return entry["result"], Watch(**entry["watch"]), False


def _batches(n: int, bs: int) -> int:
    return -(-n // bs)


def _aa_work(n: int, bs: int) -> int:
    return _batches(n, bs) * 400  # a rough PGD-step equivalent, for the progress bar only


def _sweep_work(c: EvalConfig, sweep_n: int) -> int:
    return _batches(sweep_n, c.batch_size) * (20 * len(sweep_eps(c)) + max(c.sweep_steps, default=0))


def _work(c: EvalConfig, n: int, aa_n: int, sweep_n: int) -> int:
    total = _batches(n, c.batch_size) * (1 + c.steps * c.restarts)
    if aa_n:
        total += _aa_work(aa_n, c.batch_size)
    if sweep_n:
        total += _sweep_work(c, sweep_n)
    return total


# ---------------------------------------------------------------- the job


def run_evaluate_job(job, store, device: torch.device | str, on_progress: Progress | None = None) -> Record:
    """Evaluate the classifier of job.deps["finetune"] on the target's test split; return the record."""
    from bench import datasets
    from bench.errors import BenchError
    from bench.finetune import (CLASSIFIER_FILE, TEST_SELECTION_FLAG, TEST_SELECTION_WARNING, check_image_size,
                                load_classifier, target_config)

    started = time.time()
    device = torch.device(device)
    eval_cfg = from_dict(EvalConfig, job.config.get("eval", {}), "eval")
    data_cfg = from_dict(DataConfig, job.config.get("data", {}), "data")
    ft_dir = store.job_dir(job.deps["finetune"])
    model, meta = load_classifier(ft_dir / CLASSIFIER_FILE, device, with_meta=True)
    target_cfg = target_config(job.target, job.config)
    check_image_size(job.target, target_cfg, meta["image_size"])
    test = datasets.load(job.target, "test", data_dir=job.data_dir, download=data_cfg.download,
                         cfg=target_cfg, device=device, image_size=meta["image_size"])
    if test.num_classes != meta["num_classes"]:
        raise BenchError(f"{job.target} has {test.num_classes} classes but the classifier of "
                         f"{job.deps['finetune']} predicts {meta['num_classes']}")
    workdir = store.job_dir(job.key)
    workdir.mkdir(parents=True, exist_ok=True)
    result = evaluate_classifier(model, test, eval_cfg, eval_cfg.seed, workdir=workdir, on_progress=on_progress)
    ft_record = store.read(job.deps["finetune"])
    flags = list(ft_record.flags) if ft_record is not None else list(meta.get("flags", []))
    warnings = list(result["warnings"])
    if TEST_SELECTION_FLAG in flags:
        warnings.insert(0, TEST_SELECTION_WARNING)
    sweeps = result["sweeps"]
    metrics = {"sa": plain(result["sa"]), "ra": plain(result["ra"]), "aa": plain(result["aa"]),
               "sweeps": {axis: [plain(m) for m in points] for axis, points in sweeps.items()} if sweeps else None}
    record = Record(kind="evaluate", key=job.key, seed=job.seed, method=job.method, finetuner=job.finetuner,
                    source=job.source, target=job.target, config=job.config, inputs=dict(job.deps),
                    metrics=metrics, warnings=warnings, flags=flags, provenance=provenance(device, started))
    # The saved stages stay: the worker writes the record after this returns, and until then they
    # are the only copy of the results. The record, once written, marks the job done.
    return record
