"""In-model input normalization and BatchNorm with named branches."""

from __future__ import annotations

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# DeACL's in-model constants (pantheon5100/DeACL@3fb81e3 solo/models/resnet_add_normalize.py:224-225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.247, 0.243, 0.261)
NORMALIZATIONS = {
    "none": None,
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
}


class Normalize(nn.Module):
    """(x - mean) / std inside the model, so attacks always work on [0,1] images."""

    def __init__(self, kind: str = "none"):
        super().__init__()
        self.kind = kind
        stats = NORMALIZATIONS[kind]
        mean, std = stats if stats else ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return x
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return self.kind


def _branch(branches: tuple[str, ...], branch: str | None) -> str:
    # No silent default: a forward that forgets its branch would train the wrong statistics.
    if branch not in branches:
        raise ValueError(f"BatchNorm branch {branch!r}: this model's branches are {list(branches)}; name one")
    return branch


class BranchedBatchNorm2d(nn.Module):
    """Several BatchNorm2d sets behind one module; the forward names the branch to use.

    Weights of surrounding convs are shared; each branch has its own affine parameters and
    running statistics (the "multi-BN" of ACL and AdvCL).
    """

    def __init__(self, channels: int, branches: tuple[str, ...]):
        super().__init__()
        self.branches = tuple(branches)
        self.bns = nn.ModuleDict({b: nn.BatchNorm2d(channels) for b in self.branches})

    def forward(self, x: torch.Tensor, branch: str | None = None) -> torch.Tensor:
        return self.bns[_branch(self.branches, branch)](x)


class BranchedBatchNorm1d(nn.Module):
    def __init__(self, features: int, branches: tuple[str, ...], affine: bool = True):
        super().__init__()
        self.branches = tuple(branches)
        self.bns = nn.ModuleDict({b: nn.BatchNorm1d(features, affine=affine) for b in self.branches})

    def forward(self, x: torch.Tensor, branch: str | None = None) -> torch.Tensor:
        return self.bns[_branch(self.branches, branch)](x)


def make_bn2d(channels: int, branches: tuple[str, ...]) -> nn.Module:
    """A plain BatchNorm2d for one branch (so the model is a plain ResNet), else branched."""
    return nn.BatchNorm2d(channels) if len(branches) == 1 else BranchedBatchNorm2d(channels, branches)


def run_bn(bn: nn.Module, x: torch.Tensor, branch: str | None) -> torch.Tensor:
    return bn(x, branch) if isinstance(bn, (BranchedBatchNorm2d, BranchedBatchNorm1d)) else bn(x)


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every BatchNorm running statistic (for 'untouched' checks)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
