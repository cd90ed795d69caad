"""CIFAR ResNet-18 (3x3 stem, no max-pool) with a width multiplier and named BN branches.

`stem_padding` is the padding of the 3x3 stride-1 stem conv: 1 (the CIFAR ResNet, 32x32 stem
output, then 16, 8, 4) or 2 (the torchvision-layout CIFAR ResNet of solo-learn and DeACL: conv1
padding 2, 34x34, then 17, 9, 5). Both have the same weights and shapes, so a file must say which
it is: the encoder spec (`encoder_spec`) carries it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.models.norm import Normalize, make_bn2d, run_bn
from bench.registry import ENCODERS


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, branches: tuple[str, ...]):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = make_bn2d(planes, branches)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = make_bn2d(planes, branches)
        self.has_shortcut = stride != 1 or in_planes != planes
        if self.has_shortcut:
            self.shortcut_conv = nn.Conv2d(in_planes, planes, 1, stride, bias=False)
            self.shortcut_bn = make_bn2d(planes, branches)

    def forward(self, x: torch.Tensor, branch: str | None = None) -> torch.Tensor:
        out = F.relu(run_bn(self.bn1, self.conv1(x), branch))
        out = run_bn(self.bn2, self.conv2(out), branch)
        short = run_bn(self.shortcut_bn, self.shortcut_conv(x), branch) if self.has_shortcut else x
        return F.relu(out + short)


class ResNet18(nn.Module):
    """Input [0,1] images -> pooled features of size `feature_dim` (8 * width)."""

    channels_last = False  # feed the stem channels-last on every device (`train.channels_last`; CPU always does)

    def __init__(self, width: int = 64, branches: tuple[str, ...] = ("normal",),
                 normalize: str = "none", layers: tuple[int, ...] = (2, 2, 2, 2), stem_padding: int = 1):
        super().__init__()
        self.width = width
        self.branches = tuple(branches)
        self.stem_padding = int(stem_padding)
        self.normalize = Normalize(normalize)
        self.conv1 = nn.Conv2d(3, width, 3, 1, self.stem_padding, bias=False)
        self.bn1 = make_bn2d(width, self.branches)
        blocks = []
        in_planes = width
        for stage, n_blocks in enumerate(layers):
            planes = width * 2 ** stage
            for i in range(n_blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride, self.branches))
                in_planes = planes
        self.blocks = nn.ModuleList(blocks)
        self.feature_dim = in_planes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_stem(self, x: torch.Tensor, branch: str | None = None) -> torch.Tensor:
        if x.device.type == "cpu" or self.channels_last:
            # oneDNN's convolution backward is much faster channels-last (the whole network follows
            # the input's layout): about 25% off an AdvCL step on CPU (benchmarks/advcl_step.py);
            # on CUDA cuDNN's tensor-core convolutions prefer it (`bench.train.fastpath`)
            x = x.contiguous(memory_format=torch.channels_last)
        return F.relu(run_bn(self.bn1, self.conv1(self.normalize(x)), branch))

    def forward(self, x: torch.Tensor, branch: str | None = None) -> torch.Tensor:
        out = self.forward_stem(x, branch)
        for block in self.blocks:
            out = block(out, branch)
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


@ENCODERS.register("resnet18")
def resnet18(width: int = 64, branches: tuple[str, ...] = ("normal",), normalize: str = "none",
             stem_padding: int = 1) -> ResNet18:
    """CIFAR ResNet-18 (3x3 stem, no max-pool), width multiplier, named BN branches."""
    return ResNet18(width=width, branches=branches, normalize=normalize, stem_padding=stem_padding)


def build_encoder(arch: str, width: int, branches: tuple[str, ...] = ("normal",),
                  normalize: str = "none", stem_padding: int = 1) -> nn.Module:
    extra = {"stem_padding": stem_padding} if stem_padding != 1 else {}  # other encoders need not know it
    return ENCODERS.get(arch)(width=width, branches=branches, normalize=normalize, **extra)


def encoder_options(cfg, normalize: str = "none", stem_padding: int = 1) -> dict:
    """The architecture options of the shared `encoder` settings, a method's own values filling
    those left to it (`stem_padding = -1`, `normalize = "method"`)."""
    padding = getattr(cfg, "stem_padding", -1)
    kind = getattr(cfg, "normalize", "method")
    return {"normalize": normalize if kind == "method" else kind,
            "stem_padding": stem_padding if padding < 0 else padding}


def encoder_from_config(cfg, branches: tuple[str, ...], normalize: str = "none", stem_padding: int = 1) -> nn.Module:
    """A new encoder from the shared `encoder` settings (`bench.config.EncoderConfig`) and a
    method's branches and defaults (what `Method.new_encoder` builds)."""
    return build_encoder(cfg.arch, cfg.width, branches, **encoder_options(cfg, normalize, stem_padding))


def export_encoder(model: ResNet18, branch: str) -> ResNet18:
    """A plain single-branch copy of `model` that keeps the BatchNorm set of `branch`."""
    plain = ResNet18(width=model.width, branches=(branch,), normalize=model.normalize.kind,
                     stem_padding=model.stem_padding)
    state = {}
    for key, value in model.state_dict().items():
        if ".bns." in key:
            prefix, rest = key.split(".bns.", 1)
            name, _, leaf = rest.partition(".")
            if name != branch:
                continue
            key = f"{prefix}.{leaf}"
        state[key] = value.detach().clone()
    plain.load_state_dict(state)
    return plain


class Classifier(nn.Module):
    """Encoder + linear head: the model that finetuning trains and evaluation attacks."""

    def __init__(self, encoder: nn.Module, num_classes: int, zero_init: bool = False):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.feature_dim, num_classes)
        if zero_init:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))
