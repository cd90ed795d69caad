"""A multi-branch encoder as plain data (spec + state dict), e.g. DynACL's dual-BN `encoder_dual.pt`.

`save_encoder` writes single-branch downstream encoders; this keeps every BatchNorm branch, for a
stage that needs more than the exported branch (DynACL++'s LP-AFT clusters the `normal` branch
and finetunes the `pgd` one). The blob loads with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

from typing import Any

import torch

from bench.models.resnet import ResNet18


def encoder_blob(encoder: ResNet18, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = {"arch": "resnet18", "width": encoder.width, "normalize": encoder.normalize.kind,
            "branches": list(encoder.branches)}
    state = {k: v.detach().to("cpu", copy=True) for k, v in encoder.state_dict().items()}
    return {"spec": spec, "state": state, "meta": dict(meta or {})}


def encoder_from_blob(blob: dict[str, Any], device: torch.device | str = "cpu") -> ResNet18:
    """The encoder a blob describes, loaded strictly, in eval mode."""
    spec = blob["spec"]
    if spec.get("arch", "resnet18") != "resnet18":
        raise ValueError(f"encoder blob: unknown arch {spec.get('arch')!r}")
    branches = tuple(spec.get("branches") or (spec["branch"],))
    encoder = ResNet18(width=spec["width"], branches=branches, normalize=spec["normalize"])
    encoder.load_state_dict(blob["state"])
    return encoder.to(device).eval()
