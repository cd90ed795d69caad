"""Sanity checks of one evaluated cell: the warnings a record carries.

RA <= SA and AA <= RA up to sampling noise, attack-strength curves that do not rise, what the
`Watch` saw during the attacks (train-mode forwards, BatchNorm statistics changed, perturbations
outside eps or [0, 1]), AutoAttack's own signals, and a classifier that predicts one class for
most inputs (collapsed). Problems become warnings (and flags) in the record; they do not stop
the job.
"""

from __future__ import annotations

from typing import Any

from bench.attacks.accuracy import Watch
from bench.attacks.autoattack import AAResult, square_gain

SQUARE_TOLERANCE = 0.002  # pyautoattack's own threshold (check_square_sr), as a fraction of n


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


# ---------------------------------------------------------------- a collapsed classifier


def collapse_threshold(num_classes: int, label_share: float | None = None) -> float:
    """The share of the most predicted class above which a classifier counts as collapsed.

    Halfway between what a classifier that follows the labels predicts (the largest class's
    share of the images, 1/K on a balanced test set) and a constant classifier (1): for K = 10,
    0.55; for K = 100, 0.505; for K = 2, 0.75. Relative to the class count, so a binary problem
    is not flagged at 50% and a 100-class one is flagged well before a constant output; above
    one half for every K, so the flag means "one class for most inputs".
    """
    expected = max(1.0 / max(num_classes, 1), label_share or 0.0)
    return (1.0 + expected) / 2.0


def prediction_share(predicted: Any, num_classes: int) -> tuple[float, int]:
    """(share of the most predicted class, that class) of a sequence or tensor of predicted labels."""
    import torch

    predicted = torch.as_tensor(predicted).flatten().long()
    if predicted.numel() == 0:
        return 0.0, -1
    counts = torch.bincount(predicted, minlength=num_classes)
    top = int(counts.argmax())
    return float(counts[top]) / predicted.numel(), top


def collapse_warning(share: float, top: int, n: int, num_classes: int, label_share: float | None = None,
                     classes: list[str] | None = None) -> str | None:
    """A warning when one class gets more than `collapse_threshold` of the predictions, else None."""
    threshold = collapse_threshold(num_classes, label_share)
    if n == 0 or share <= threshold:
        return None
    name = f" ({classes[top]})" if classes and 0 <= top < len(classes) else ""
    return (f"collapsed classifier: class {top}{name} for {100 * share:.1f}% of the {n} clean test images "
            f"(threshold {100 * threshold:.1f}%)")


def _label(m: Any, axis: str) -> str:
    protocol = m["protocol"] if isinstance(m, dict) else m.protocol
    if axis != "eps":
        return f"{protocol.get('steps')} steps"
    return f"eps {protocol.get('eps_255')}/255" if protocol.get("norm", "Linf") == "Linf" else f"L2 eps {protocol.get('eps')}"
