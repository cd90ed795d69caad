"""A plain torchvision-layout ResNet state dict (timm's ResNets use the same key names).

Keys `conv1`, `bn1`, `layer{1..4}.{b}.{conv1,bn1,conv2,bn2,downsample.0,downsample.1}`, `fc`;
optional `normalize.mean/std` buffers (ACL-style classifiers). A BasicBlock network with a CIFAR
3x3 stem becomes the harness's own ResNet (so every finetuner treats it like a harness encoder);
anything else torchvision can build (a 7x7 ImageNet stem with max-pool, Bottleneck ResNet-50/101/152)
becomes torchvision's `ResNet`, whose forward is torchvision's. For a Bottleneck network with a
3x3 stem the stem is rebuilt as a 3x3 stride-1 padding-1 conv with no max-pool (the usual CIFAR
variant): a state dict does not say the stride or padding, so this is an assumption, noted.
A plain state dict carries no input normalization: pass `normalize=` (e.g. "imagenet" for
torchvision's ImageNet weights).
"""

from __future__ import annotations

import torch
from torch import nn

from bench.checkpoints.base import Loaded, check_want, finish, load_strict, read_checkpoint, register, \
    strip_prefix, take, unwrap
from bench.checkpoints.resnet_keys import ResNetLayout, build_resnet, linear_head, normalize_kind
from bench.errors import BenchError
from bench.models.norm import Normalize

LAYOUT = ResNetLayout("torchvision", heads=("fc",), normalize="none")


class TorchvisionEncoder(nn.Module):
    """torchvision's ResNet without its fc: images in [0,1] -> pooled features (`feature_dim`)."""

    def __init__(self, net: nn.Module, feature_dim: int, normalize: str = "none"):
        super().__init__()
        self.normalize = Normalize(normalize)
        self.net = net
        self.net.fc = nn.Identity()
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def _stages(state: dict[str, torch.Tensor]) -> tuple[list[int], bool]:
    counts: dict[int, int] = {}
    bottleneck = False
    for key in state:
        parts = key.split(".")
        if parts[0].startswith("layer") and parts[0][5:].isdigit() and len(parts) > 2 and parts[1].isdigit():
            stage = int(parts[0][5:])
            counts[stage] = max(counts.get(stage, 0), int(parts[1]) + 1)
            bottleneck = bottleneck or parts[2] == "conv3"
    return [counts[s] for s in sorted(counts)], bottleneck


def _torchvision_model(state, *, source, want, normalize):
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    state = dict(state)
    norm = normalize_kind(take(state, "normalize"), normalize or "none", source)
    head = take(state, "fc")
    layers, bottleneck = _stages(state)
    if len(layers) != 4:
        raise BenchError(f"{source}: ResNet stages {layers}: expected layer1..layer4 (torchvision layout)")
    if not linear_head(head):
        raise BenchError(f"{source}: no linear fc head (fc.weight, fc.bias): not a torchvision ResNet classifier")
    stem = state.get("conv1.weight")
    if stem is None or stem.dim() != 4:
        raise BenchError(f"{source}: no conv1.weight: not a torchvision ResNet state dict")
    width = int(stem.shape[0])
    block = Bottleneck if bottleneck else BasicBlock
    net = ResNet(block, layers, num_classes=int(head["weight"].shape[0]), width_per_group=64)
    if width != 64:
        raise BenchError(f"{source}: stem width {width}: torchvision's ResNet has 64")
    notes = []
    if stem.shape[-1] == 3:
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
        notes.append("3x3 stem rebuilt as stride 1, padding 1, no max-pool (not recorded in a state dict)")
    feature_dim = int(head["weight"].shape[1])
    net_state = {**state, **{f"fc.{k}": v for k, v in head.items()}}
    notes += load_strict(net, net_state, source=source, layout="torchvision")
    depth = {(2, 2, 2, 2): 18, (3, 4, 6, 3): 34 if block is BasicBlock else 50, (3, 4, 23, 3): 101,
             (3, 8, 36, 3): 152}.get(tuple(layers), sum(layers) * (3 if bottleneck else 2) + 2)
    arch = f"torchvision ResNet-{depth} ({'CIFAR 3x3' if stem.shape[-1] == 3 else 'ImageNet 7x7'} stem)"
    fc = net.fc
    encoder = TorchvisionEncoder(net, feature_dim, norm)
    if want == "encoder":
        return encoder, "encoder", None, arch, norm, ["the fc classification head"], notes
    from bench.models import Classifier

    model = Classifier(encoder, fc.out_features)
    model.head = fc
    return model, "classifier", fc.out_features, arch, norm, [], notes


@register("torchvision", "a plain torchvision/timm-layout ResNet state dict (CIFAR BasicBlock -> the harness's "
                         "ResNet; ImageNet stem or Bottleneck -> torchvision's ResNet)")
def load_torchvision(source, *, branch=None, want="auto", device="cpu", normalize=None, **_):
    check_want(want)
    where = str(source)
    state, _ = unwrap(read_checkpoint(source), ("state_dict", "model", "net"), where)
    state, _ = strip_prefix(state, ("module.", "model."))
    stem = state.get("conv1.weight")
    layers, bottleneck = _stages(state)
    if stem is not None and stem.dim() == 4 and tuple(stem.shape[1:]) == (3, 3, 3) and not bottleneck:
        model, facts = build_resnet(state, LAYOUT, source=where, branch=branch, want=want, normalize=normalize)
        return Loaded(model=finish(model, device), kind=facts["kind"], format="torchvision", source=where,
                      branch=facts["branch"], num_classes=facts["num_classes"], architecture=facts["architecture"],
                      normalize=facts["normalize"], dropped=facts["dropped"], notes=facts["notes"])
    model, kind, classes, arch, norm, dropped, notes = _torchvision_model(state, source=where, want=want,
                                                                          normalize=normalize)
    return Loaded(model=finish(model, device), kind=kind, format="torchvision", source=where, branch=None,
                  num_classes=classes, architecture=arch, normalize=norm, dropped=dropped, notes=notes)
