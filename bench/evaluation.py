"""Evaluation of a classifier: SA, RA (PGD-20), AA, attack-strength sweeps, with sanity checks.

Every number is a `Metric` (value, n, correct, Wilson 95% interval) with the full protocol that
produced it. Every attack runs in fp32 with the model in eval mode and its parameters frozen
(`bench.attacks.accuracy`); problems become warnings (`bench.sanity`).

`evaluate_classifier` does the work on a model and an `ImageSet`. With a `workdir`, each
finished part (clean, pgd, sweeps, autoattack) is saved there (`EvalState`) and AutoAttack keeps a
per-batch state, so a rerun after an interruption redoes neither.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import bench
from bench import files
from bench.attacks.accuracy import (PERTURBATION_TOLERANCE, Watch, clean_correct, clean_protocol, image_batches,
                                    pgd_correct, pgd_correct_at, pgd_protocol, watched)
from bench.attacks.autoattack import (AAResult, cuda_devices, from_bits, model_digest, pyautoattack_version,
                                      run_autoattack, to_bits)
from bench.attacks.threat import sweep_eps, sweep_points, threat_of
from bench.config import EvalConfig
from bench.datasets import ImageSet
from bench.record import COLLAPSE_FLAG, EvaluateMetrics, Metric
from bench.sanity import collapse_warning, prediction_share, sanity_warnings

log = logging.getLogger(__name__)

AA_IMPLEMENTATION = "pyautoattack"
AA_STATE = "aa_state.json"      # AutoAttack's per-batch state (bench.attacks.autoattack)
EVAL_STATE = "eval_state.json"  # the finished parts (EvalState)
EVAL_STATE_FORMAT = "bench-eval-state/2"
Progress = Callable[[dict[str, Any]], None]


@dataclass
class Evaluation:
    """What `evaluate_classifier` found: the metrics a record stores, its warnings, per-sample flags."""

    metrics: EvaluateMetrics
    warnings: list[str]
    per_sample: dict[str, torch.Tensor | None]  # "clean", "pgd", "aa": bool per test image
    aa_result: AAResult | None = None
    flags: list[str] = dataclasses.field(default_factory=list)  # COLLAPSE_FLAG when the classifier collapsed


def evaluate_classifier(model: nn.Module, test: ImageSet, eval_cfg: EvalConfig, seed: int,
                        workdir: Path | str | None = None, on_progress: Progress | None = None
                        ) -> Evaluation:
    """SA and RA on the first eval.n test images, sweeps on the first eval.sweep_n, AA on the first
    eval.aa_n (each capped at the test split's size, with a warning: the protocols hold the n used).

    With `workdir` (the evaluate job's folder) every finished part is saved there (`EvalState`) and
    AutoAttack keeps its per-batch state in `aa_state.json`, so a rerun after an interruption skips
    the finished parts and AutoAttack continues from the samples already decided. AutoAttack runs
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
    saved = EvalState(Path(workdir) / EVAL_STATE if workdir is not None else None, model)
    watches: list[Watch] = []  # one per part, merged in run order (a skipped part's comes from its file)

    def tick(phase: str, amount: int = 1) -> None:
        nonlocal done
        done += amount
        if on_progress is not None:
            on_progress({"phase": phase, "done": done, "total": total})

    def part(name: str, data: ImageSet, settings: dict[str, Any], work: int,
             compute: Callable[[Watch], dict[str, Any]]) -> dict[str, Any]:
        result, watch, skipped = saved.run(name, data, settings, compute)
        watches.append(watch)
        if skipped:
            tick(name, work)
        return result

    def sa_part(watch: Watch) -> dict[str, Any]:
        predictions: list[torch.Tensor] = []
        flags = clean_correct(model, image_batches(head, bs), watch, predictions=predictions)
        tick("clean", _batches(n, bs))
        predicted = torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)
        return {"correct": to_bits(flags), "predicted": torch.bincount(predicted, minlength=test.num_classes).tolist()}

    clean_result = part("clean", head, {"batch_size": bs, "counts": "predicted"}, _batches(n, bs), sa_part)
    clean = from_bits(clean_result["correct"])
    sa = Metric.from_counts(int(clean.sum()), n, clean_protocol(n=n, seed=seed, batch_size=bs, images=where.format(n)))

    def ra_part(watch: Watch) -> dict[str, Any]:
        flags = pgd_correct(model, image_batches(head, bs), eps=threat.eps, alpha=threat.alpha, steps=c.steps,
                            seed=seed, restarts=c.restarts, watch=watch, on_batch=lambda: tick("pgd", c.steps),
                            clamp_start=c.clamp_start, norm=threat.norm)
        return {"robust": to_bits(flags)}

    ra_settings = {"eps": threat.eps, "alpha": threat.alpha, "steps": c.steps, "restarts": c.restarts, "seed": seed,
                   "batch_size": bs, "clamp_start": c.clamp_start, "norm": threat.norm}
    robust = from_bits(part("pgd", head, ra_settings, _batches(n, bs) * c.steps * c.restarts, ra_part)["robust"])
    ra = Metric.from_counts(int(robust.sum()), n, pgd_protocol(
        eps=threat.eps, alpha=threat.alpha, steps=c.steps, restarts=c.restarts, n=n, seed=seed, batch_size=bs,
        images=where.format(n), clamp_start=c.clamp_start, norm=threat.norm))

    sweeps = None
    if sweep_n > 0:
        subset = test.first(sweep_n)

        def sweep_part(watch: Watch) -> dict[str, Any]:
            flags = sweep_flags(model, subset, c, seed, watch, on_batch=lambda steps: tick("sweeps", steps))
            return {axis: [to_bits(f) for f in points] for axis, points in flags.items()}

        sweep_settings = {"eps": threat.eps, "alpha": threat.alpha, "sweep_eps": sweep_eps(c),
                          "sweep_steps": list(c.sweep_steps), "seed": seed, "batch_size": bs,
                          "clamp_start": c.clamp_start, "norm": threat.norm}
        saved_sweeps = part("sweeps", subset, sweep_settings, _sweep_work(c, sweep_n), sweep_part)
        sweeps = sweep_metrics({axis: [from_bits(f) for f in points] for axis, points in saved_sweeps.items()}, c, seed,
                               batch_size=bs, images=where.format(sweep_n))

    aa = None
    aa_result = None
    aa_flags = None
    if aa_n > 0:
        subset = test.first(aa_n)
        aa_state_path = Path(workdir) / AA_STATE if workdir is not None else None

        def aa_part(watch: Watch) -> dict[str, Any]:
            x = subset.images(slice(0, aa_n))
            with watched(model, watch), torch.random.fork_rng(devices=cuda_devices(x)):
                result = run_autoattack(model, x, subset.y, eps=threat.eps, num_classes=test.num_classes, seed=seed,
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
        aa_result = AAResult.from_dict(part("autoattack", subset, aa_settings, _aa_work(aa_n, bs), aa_part))
        aa_flags = aa_result.robust
        aa = Metric.from_counts(aa_result.correct, aa_n, aa_protocol(
            aa_result, eps=threat.eps, n=aa_n, seed=seed, batch_size=bs, images=where.format(aa_n),
            norm=threat.norm))

    # AA's images are the first aa_n, so within RA's first n when aa_n <= n: compare on those
    ra_on_aa = Metric.from_counts(int(robust[:aa_n].sum()), aa_n) if aa is not None and aa_n <= n else None
    watch = Watch.merged(watches)
    warnings = capped_warnings(c, len(test), test.name)
    warnings += sanity_warnings(sa, ra, aa, ra_on_aa=ra_on_aa, watch=watch, aa_result=aa_result, sweeps=sweeps)
    share, collapse = _collapse(clean_result["predicted"], head)
    flags = []
    if collapse is not None:
        warnings.append(collapse)
        flags.append(COLLAPSE_FLAG)
    for w in warnings:
        log.warning("%s", w)
    metrics = EvaluateMetrics(sa=sa, ra=ra, aa=aa, sweeps=sweeps, prediction_share=share)
    return Evaluation(metrics, warnings, {"clean": clean, "pgd": robust, "aa": aa_flags}, aa_result, flags)


def _collapse(counts: list[int], head: ImageSet) -> tuple[float | None, str | None]:
    """(share of the most predicted class, the collapse warning or None) from the predicted-class counts."""
    n = int(sum(counts))
    if n == 0:
        return None, None
    top = max(range(len(counts)), key=lambda k: counts[k])
    share = counts[top] / n
    label_share, _ = prediction_share(head.y, head.num_classes)
    return share, collapse_warning(share, top, n, head.num_classes, label_share, head.classes)


def capped_warnings(c: EvalConfig, size: int, name: str) -> list[str]:
    """A warning for every requested number of images that the test split cannot give."""
    return [f"eval.{key}={getattr(c, key)} is larger than the {size} images of the {name} test split: "
            f"{size} used (the records say so)" for key in ("n", "aa_n", "sweep_n") if getattr(c, key) > size]


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
                               watch=watch, on_batch=(lambda: on_batch(most)) if on_batch else None,
                               clamp_start=c.clamp_start, norm=threat.norm)
        by_steps = [flags[s] for s in c.sweep_steps]
        reuse = {(round(threat.eps, 12), round(threat.alpha, 12), s): f for s, f in flags.items()}
    by_eps: list[torch.Tensor] = []
    for eps, alpha in sweep_points(c):
        key = (round(eps, 12), round(alpha, 12), 20)
        if key not in reuse:
            reuse[key] = pgd_correct(model, batches, eps=eps, alpha=alpha, steps=20, seed=seed, watch=watch,
                                     on_batch=(lambda: on_batch(20)) if on_batch else None,
                                     clamp_start=c.clamp_start, norm=threat.norm)
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
            clamp_start=c.clamp_start, norm=threat.norm))

    return {"eps": [metric(f, e, a, 20) for (e, a), f in zip(sweep_points(c), flags["eps"])],
            "steps": [metric(f, threat.eps, threat.alpha, s) for s, f in zip(c.sweep_steps, flags["steps"])]}



def aa_protocol(result: AAResult, *, eps: float, n: int, seed: int, batch_size: int, images: str,
                norm: str = "Linf") -> dict[str, Any]:
    s = result.settings
    return {"attack": "autoattack", "norm": norm, "eps": eps, "eps_255": round(eps * 255, 6),
            "aa_version": result.aa_version, "attacks": list(result.attacks), "not_run": list(result.not_run),
            "n_target_classes": result.n_target_classes, "steps": s.get("apgd_iterations"),
            "restarts": s.get("apgd_restarts"), "alpha": None, "settings": dict(s),
            "robust_after": dict(result.robust_after), "precision": "fp32", "mode": "eval", "n": n,
            "seed": seed, "batch_size": batch_size, "images": images, "implementation": AA_IMPLEMENTATION,
            "version": result.version}


class EvalState:
    """The finished parts of one evaluation (clean, pgd, sweeps, autoattack) in one JSON file,
    rewritten atomically after each part, so a rerun of the job skips them.

    Each entry holds the part's per-sample flags and its watch, under a fingerprint of the
    model's weights, the part's images and labels, the device type, the bench version and the
    part's settings: an entry made for anything else is ignored and the part runs again.
    With no path nothing is saved and every part runs.
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
            self.entries = dict(data.get("parts") or {})

    def fingerprint(self, name: str, data: ImageSet, settings: dict[str, Any]) -> dict[str, Any]:
        if self.model_sha is None:
            self.model_sha = model_digest(self.model)
        digest = hashlib.sha256(data.x.detach().cpu().contiguous().numpy().tobytes())
        digest.update(data.y.detach().cpu().numpy().astype("int64").tobytes())
        fp = {"part": name, "model_sha256": self.model_sha, "data_sha256": digest.hexdigest()[:16], "n": len(data),
              "device": data.x.device.type, "bench": bench.__version__, "settings": settings}
        return json.loads(json.dumps(fp))  # JSON-native, to compare with what a file holds

    def run(self, name: str, data: ImageSet, settings: dict[str, Any],
            compute: Callable[[Watch], dict[str, Any]]) -> tuple[dict[str, Any], Watch, bool]:
        """(result, watch, skipped): the saved result if it fits, else compute(watch), saved."""
        fp = self.fingerprint(name, data, settings) if self.path is not None else None
        entry = self.entries.get(name)
        if fp is not None and isinstance(entry, dict) and entry.get("fingerprint") == fp:
            log.info("evaluation part %s: done before, read from %s", name, self.path)
            return entry["result"], Watch(**entry["watch"]), True
        if entry is not None:
            log.info("evaluation part %s: the saved result was made for another model, other data or other "
                     "settings; running it again", name)
        watch = Watch()
        result = compute(watch)
        # Through JSON in every case, so a straight run and a resumed one build the record from the same data.
        entry = json.loads(json.dumps({"fingerprint": fp, "result": result, "watch": dataclasses.asdict(watch)}))
        if self.path is not None:
            self.entries[name] = entry
            files.write_json(self.path, {"format": EVAL_STATE_FORMAT, "parts": self.entries})
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
