"""Export an encoder or classifier for use without bench: a plain state dict plus a JSON model card.

`<name>.pt` holds `model.state_dict()` only (tensors on the CPU): it loads with
`torch.load(path, weights_only=True)` into a model definition of the same names, with no bench
class involved. `<name>.json` is a model card with RobustBench's model-info fields (`link`,
`name`, `authors`, `additional_data`, `number_forward_passes`, `dataset`, `venue`,
`architecture`, `eps`, `clean_acc`, `reported`, `autoattack_acc`, `corruptions_acc`,
`footnote`; accuracies as percent strings with two decimals, eps as RobustBench writes it:
"8/255" for L-inf, "0.5" for L2) and, under `bench`, what a user needs to rebuild and trust it:
the threat model, n and protocol of every metric, the input range and in-model normalization,
the state-dict layout (the harness's ResNet names) and the weights' sha256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

import bench
from bench.errors import BenchError
from bench.models.norm import NORMALIZATIONS, BranchedBatchNorm2d, Normalize
from bench.record import Metric

CARD_FIELDS = ("link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
               "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "corruptions_acc", "footnote")
RESNET_LAYOUT = ("bench ResNet: conv1 (3x3, stride 1, padding 1, no bias), bn1, ReLU, then blocks.0 ... blocks.N-1 "
                 "(BasicBlock: conv1, bn1, ReLU, conv2, bn2, + shortcut (shortcut_conv 1x1 + shortcut_bn when the "
                 "stride or width changes, else identity), ReLU; stage k>0 starts with stride 2; widths w, 2w, 4w, "
                 "8w), global average pool; a classifier adds head (Linear) and prefixes the encoder's keys with "
                 "encoder.")


def _as_dict(metric: Any) -> dict[str, Any] | None:
    if metric is None:
        return None
    if isinstance(metric, Metric):
        return json.loads(json.dumps(dataclasses.asdict(metric)))
    if isinstance(metric, dict) and "value" in metric:
        return metric
    raise BenchError(f"not a metric: {metric!r}")


def _percent(metric: dict[str, Any] | None) -> str | None:
    return None if metric is None else f"{100 * float(metric['value']):.2f}"


def eps_text(eps: float, norm: str) -> str:
    """RobustBench's way: "8/255" for an L-inf radius that is k/255, else the number ("0.5")."""
    if norm == "Linf" and abs(eps * 255 - round(eps * 255)) < 1e-6:
        return f"{round(eps * 255)}/255"
    return f"{eps:g}"


def _normalization(model: nn.Module) -> dict[str, Any]:
    kinds = {m.kind for m in model.modules() if isinstance(m, Normalize) and m.kind != "none"}
    if not kinds:
        return {"kind": "none", "mean": None, "std": None}
    kind = kinds.pop()
    mean, std = NORMALIZATIONS[kind]
    return {"kind": kind, "mean": list(mean), "std": list(std)}


def export_model(model: nn.Module, out_dir: str | Path, *, name: str, metrics: dict[str, Any] | None = None,
                 dataset: str | None = None, architecture: str | None = None, card: dict[str, Any] | None = None,
                 extra: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write `<out_dir>/<name>.pt` (state dict) and `<name>.json` (model card); return both paths.

    `metrics`: {"sa", "ra", "aa", "corruptions"}: Metrics or their record dicts (an evaluate
    record's `metrics`, or `bench.api.Evaluation.metrics`); the threat model is read from their
    protocols. `card`: RobustBench fields to set (name, authors, link, venue, additional_data,
    reported, footnote, ...). `extra`: more facts under `bench`.
    """
    if not name or any(c in name for c in "/\\\0") or name.startswith("."):
        raise BenchError(f"export name {name!r}: a plain file name")
    if any(isinstance(m, BranchedBatchNorm2d) for m in model.modules()):
        raise BenchError("this model has several BatchNorm branches; export one branch (bench.models.export_encoder)")
    unknown = set(card or {}) - set(CARD_FIELDS)
    if unknown:
        raise BenchError(f"unknown model-card fields {sorted(unknown)}; RobustBench's are {', '.join(CARD_FIELDS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    weights = out / f"{name}.pt"
    tmp = weights.with_name(weights.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()

    metrics = metrics or {}
    sa, ra, aa = (_as_dict(metrics.get(k)) for k in ("sa", "ra", "aa"))
    corruptions = metrics.get("corruptions")
    corruptions_mean = _as_dict(corruptions.get("mean") if isinstance(corruptions, dict) else
                                getattr(corruptions, "mean", None)) if corruptions is not None else None
    attack = aa or ra
    norm = (attack or {}).get("protocol", {}).get("norm", "Linf")
    eps = (attack or {}).get("protocol", {}).get("eps")
    num_classes = next((m.out_features for m in [getattr(model, "head", None)] if isinstance(m, nn.Linear)), None)
    info: dict[str, Any] = {field: None for field in CARD_FIELDS}
    info.update(name=name, number_forward_passes=1, dataset=dataset, additional_data=False,
                architecture=architecture or type(getattr(model, "encoder", model)).__name__,
                eps=eps_text(float(eps), norm) if eps is not None else None,
                clean_acc=_percent(sa), autoattack_acc=_percent(aa), corruptions_acc=_percent(corruptions_mean))
    if aa is None:
        info["footnote"] = "AutoAttack was not run for this export (bench.autoattack_acc is null)."
    info.update(card or {})
    info["threat_model"] = norm if attack is not None else None
    info["bench"] = {
        "version": bench.__version__, "kind": "classifier" if num_classes is not None else "encoder",
        "weights": weights.name, "weights_sha256": digest, "num_classes": num_classes,
        "feature_dim": getattr(getattr(model, "encoder", model), "feature_dim", None),
        "input": "float images in [0, 1], N x 3 x H x W; any normalization is inside the model",
        "normalization": _normalization(model), "state_dict_layout": RESNET_LAYOUT, "load":
            "torch.load(path, weights_only=True) -> model.load_state_dict(state, strict=True)",
        "metrics": {k: v for k, v in (("sa", sa), ("ra", ra), ("aa", aa), ("corruptions_mean", corruptions_mean))
                    if v is not None},
        **(extra or {}),
    }
    card_path = out / f"{name}.json"
    card_path.write_text(json.dumps(info, indent=2, sort_keys=False, default=str) + "\n")
    return weights, card_path


def export_file(path: str | Path, out_dir: str | Path, *, name: str, format: str = "bench",
                metrics: dict[str, Any] | None = None, dataset: str | None = None,
                card: dict[str, Any] | None = None, **load_options: Any) -> tuple[Path, Path]:
    """Export a checkpoint file of any format (a job's classifier.pt by default): the wrapping the
    `bench export JOB` command needs (metrics = the job's evaluate record's `metrics`)."""
    from bench.checkpoints import load_model

    loaded = load_model(path, format, **load_options)
    return export_model(loaded.model, out_dir, name=name, metrics=metrics, dataset=dataset,
                        architecture=loaded.architecture or None, card=card,
                        extra={"exported_from": {"path": str(path), **loaded.describe()}})
