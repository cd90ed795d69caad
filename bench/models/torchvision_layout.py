"""Weights in torchvision's ResNet-18 layout (solo-learn and DeACL checkpoints) for `ResNet18`.

torchvision names a block `layer{s}.{i}` (stages 1-4, two blocks each) and its projection
shortcut `downsample.0` (1x1 conv) / `downsample.1` (BatchNorm); `ResNet18` numbers its blocks
`blocks.{2 (s - 1) + i}` and calls the shortcut `shortcut_conv` / `shortcut_bn`. Every other name
(conv1, bn1, conv2, bn2 and their BatchNorm buffers) is the same, and so is every shape: the CIFAR
stem of solo-learn (conv1 3x3 stride 1 padding 2, no max-pool, fc = Identity) only needs
`stem_padding = 2` (`bench.models.resnet`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from bench.errors import BenchError

_BLOCK = re.compile(r"^layer([1-4])\.([0-9]+)\.(.+)$")
_SHORTCUT = {"downsample.0.": "shortcut_conv.", "downsample.1.": "shortcut_bn."}
BLOCKS_PER_STAGE = 2


def torchvision_to_bench(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a torchvision-layout ResNet-18 state dict to `ResNet18`'s names (shapes unchanged)."""
    out = {}
    for key, value in state.items():
        match = _BLOCK.match(key)
        if match:
            stage, index, rest = int(match[1]), int(match[2]), match[3]
            for old, new in _SHORTCUT.items():
                if rest.startswith(old):
                    rest = new + rest[len(old):]
            key = f"blocks.{(stage - 1) * BLOCKS_PER_STAGE + index}.{rest}"
        out[key] = value
    return out


def bench_to_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `torchvision_to_bench`."""
    out = {}
    for key, value in state.items():
        match = re.match(r"^blocks\.([0-9]+)\.(.+)$", key)
        if match:
            block, rest = int(match[1]), match[2]
            for old, new in _SHORTCUT.items():
                if rest.startswith(new):
                    rest = old + rest[len(new):]
            key = f"layer{block // BLOCKS_PER_STAGE + 1}.{block % BLOCKS_PER_STAGE}.{rest}"
        out[key] = value
    return out


def load_torchvision_state(encoder: nn.Module, state: dict[str, torch.Tensor], source: str = "the checkpoint") -> None:
    """Load torchvision-layout weights strictly into a single-branch `ResNet18`, or BenchError
    naming the keys that do not fit."""
    mapped = torchvision_to_bench(state)
    own = encoder.state_dict()
    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(set(mapped) - set(own))
    wrong = sorted(k for k in set(own) & set(mapped) if tuple(own[k].shape) != tuple(mapped[k].shape))
    if missing or unexpected or wrong:
        details = "; ".join(f"{what}: {keys[:4]}{' ...' if len(keys) > 4 else ''}" for what, keys in
                            (("missing", missing), ("unexpected", unexpected), ("shape differs", wrong)) if keys)
        raise BenchError(f"{source} does not fit the encoder (width {getattr(encoder, 'width', '?')}): {details}")
    encoder.load_state_dict(mapped, strict=True)


def solo_learn_backbone(path: str | Path, prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    """The `backbone.*` tensors of a solo-learn (PyTorch Lightning) checkpoint, prefix removed.

    Other keys (projector, momentum copies, the online classifier) are ignored, and so are DeACL's
    `normalize.*` buffers: the normalization constants are the encoder's own. A plain state dict
    (no `state_dict` entry) is read the same way.
    """
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"teacher checkpoint {path} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BenchError(
            f"{path} cannot be read with weights_only=True ({exc}); extract its weights first, e.g. "
            "torch.save(torch.load(PATH, weights_only=False)['state_dict'], 'weights.pt') with a trusted file") from exc
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise BenchError(f"{path} holds no state dict")
    backbone = {k[len(prefix):]: v for k, v in state.items()
                if k.startswith(prefix) and not k[len(prefix):].startswith("normalize.")}
    if not backbone:
        raise BenchError(f"{path} has no {prefix}* weights (keys: {sorted(state)[:5]} ...)")
    return backbone
