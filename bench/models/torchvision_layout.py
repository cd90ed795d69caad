"""The key correspondence between torchvision's ResNet-18 layout and `ResNet18` (renames only).

Loading such checkpoints (solo-learn and DeACL backbones, plain torchvision / timm state dicts)
is `bench.checkpoints` (formats `solo_learn` and `torchvision`, strict, with the messages that
name missing and unexpected keys), which the checkpoint stage and DeACL's file teacher share.

torchvision names a block `layer{s}.{i}` (stages 1-4, two blocks each) and its projection
shortcut `downsample.0` (1x1 conv) / `downsample.1` (BatchNorm); `ResNet18` numbers its blocks
`blocks.{2 (s - 1) + i}` and calls the shortcut `shortcut_conv` / `shortcut_bn`. Every other name
(conv1, bn1, conv2, bn2 and their BatchNorm buffers) is the same, and so is every shape: the CIFAR
stem of solo-learn (conv1 3x3 stride 1 padding 2, no max-pool, fc = Identity) only needs
`stem_padding = 2` (`bench.models.resnet`).
"""

from __future__ import annotations

import re

import torch

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
