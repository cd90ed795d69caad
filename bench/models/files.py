"""Encoder and classifier files: an architecture spec plus weights, loadable with weights_only.

`encoder.pt` = {"spec", "state", "meta"}; `classifier.pt` = {"spec", "num_classes", "classes",
"image_size", "encoder", "head", "meta"}. The spec names a registered encoder (`arch`) and its
options, so a file rebuilds its model without the code that trained it.

A classifier finetuned on an outside encoder that no spec describes (a `module:function`
WideResNet, torchvision's own ResNet) stores `encoder_job` instead of `spec`: the key of the job
whose artifact rebuilds that architecture (a checkpoint job); its loader passes `encoder_of`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from bench import files
from bench.errors import BenchError
from bench.models.resnet import Classifier, build_encoder


def encoder_spec(encoder: nn.Module) -> dict[str, Any]:
    """What rebuilds a single-branch encoder's architecture (stored in encoder and classifier files)."""
    return {"arch": getattr(encoder, "arch", "resnet18"), "width": int(encoder.width),
            "normalize": encoder.normalize.kind, "branch": encoder.branches[0],
            "stem_padding": int(getattr(encoder, "stem_padding", 1))}


def encoder_from_spec(spec: dict[str, Any]) -> nn.Module:
    """The (untrained) encoder an `encoder_spec` describes; files written before `stem_padding`
    existed have padding 1."""
    return build_encoder(spec.get("arch", "resnet18"), spec["width"], (spec["branch"],), spec["normalize"],
                         stem_padding=int(spec.get("stem_padding", 1)))


def describable(encoder: nn.Module) -> bool:
    """Whether `encoder_spec` rebuilds `encoder` exactly: a registered architecture with one
    BatchNorm set whose rebuilt state dict has the same keys and shapes (the harness's ResNet-18 of
    any width, stem padding and normalization; not a deeper ResNet, several branches or foreign code)."""
    try:
        if len(encoder.branches) != 1:
            return False
        rebuilt = encoder_from_spec(encoder_spec(encoder))
    except (AttributeError, KeyError, TypeError, ValueError, BenchError):
        return False
    own, other = encoder.state_dict(), rebuilt.state_dict()
    return (type(rebuilt) is type(encoder) and own.keys() == other.keys()
            and all(own[k].shape == other[k].shape for k in own))


def save_encoder(path: Path | str, encoder: nn.Module, meta: dict[str, Any] | None = None) -> Path:
    """An exported encoder file: its architecture and weights."""
    return files.write_torch(path, {"spec": encoder_spec(encoder), "state": encoder.state_dict(), "meta": meta or {}})


def _blob(path: Path | str, keys: tuple[str, ...]) -> dict[str, Any]:
    blob = files.read_torch(path)
    if not isinstance(blob, dict) or any(k not in blob for k in keys):
        raise BenchError(f"{path} is not a bench file (expected the keys {', '.join(keys)})")
    return blob


def _load_state(model: nn.Module, state: Any, path: Path | str) -> None:
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise BenchError(f"{path}: the weights do not fit its architecture ({exc})") from exc


def load_encoder(path: Path | str, device: torch.device | str = "cpu") -> nn.Module:
    """The saved encoder in eval mode on `device`; its file's meta (method, image_size, ...) as `.meta`."""
    blob = _blob(path, ("spec", "state"))
    encoder = encoder_from_spec(blob["spec"])
    _load_state(encoder, blob["state"], path)
    encoder.meta = dict(blob.get("meta") or {})
    return encoder.to(device).eval()


def encoder_meta(path: Path | str) -> dict[str, Any]:
    return dict(_blob(path, ("spec", "state")).get("meta") or {})


def save_classifier(path: Path | str, model: Classifier, *, classes: list[str], image_size: int,
                    meta: dict[str, Any] | None = None, encoder_job: str | None = None) -> Path:
    """Encoder spec + encoder weights + head weights (+ what evaluation needs). An encoder no spec
    describes needs `encoder_job`, the job whose artifact rebuilds its architecture."""
    blob = {"num_classes": int(model.head.out_features),
            "classes": [str(c) for c in classes], "image_size": int(image_size),
            "encoder": model.encoder.state_dict(), "head": model.head.state_dict(), "meta": meta or {}}
    if describable(model.encoder):
        blob["spec"] = encoder_spec(model.encoder)
    elif encoder_job:
        blob["encoder_job"] = str(encoder_job)
    else:
        raise BenchError(f"{type(model.encoder).__name__} is not an architecture a bench file describes; "
                         f"save it with the key of the job that rebuilds it (encoder_job=)")
    return files.write_torch(path, blob)


def load_classifier(path: Path | str, device: torch.device | str = "cpu", with_meta: bool = False,
                    encoder_of: Callable[[str], nn.Module] | None = None
                    ) -> Classifier | tuple[Classifier, dict[str, Any]]:
    """The saved classifier in eval mode on `device` (and its description: `.meta`, and returned
    beside it if `with_meta`). `encoder_of(key)`: a fresh encoder of the architecture job `key`
    provides, for a file that names its `encoder_job` instead of a spec."""
    blob = _blob(path, ("num_classes", "encoder", "head"))
    if "spec" in blob:
        encoder = encoder_from_spec(blob["spec"])
    elif "encoder_job" in blob and encoder_of is not None:
        encoder = encoder_of(blob["encoder_job"])
    elif "encoder_job" in blob:
        raise BenchError(f"{path}: its encoder is an outside architecture rebuilt by job {blob['encoder_job']}; "
                         f"load it through its finetune job (bench export JOB writes a plain state dict)")
    else:
        raise BenchError(f"{path} is not a bench file (it has neither 'spec' nor 'encoder_job')")
    _load_state(encoder, blob["encoder"], path)
    model = Classifier(encoder, blob["num_classes"])
    _load_state(model.head, blob["head"], path)
    model = model.to(device).eval()
    meta = {k: blob[k] for k in ("spec", "encoder_job", "num_classes", "classes", "image_size") if k in blob}
    meta.update(blob.get("meta", {}))
    model.meta = meta
    return (model, meta) if with_meta else model
