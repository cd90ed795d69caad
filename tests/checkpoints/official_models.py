"""Stand-ins for the official model definitions, with their attribute names (hence state-dict key
names and shapes) and forward passes, written from the official code's structure:

- multi-BN ResNet-18 (ACL / DynACL `models/resnet_multi_bn.py`, AdvCL
  `models/resnet_cifar_multibn_ensembleFC.py`): `batch_norm_multiple.bn_list`, `Downsample_multiple`
  with `.conv` / `.bn`, optional `NormalizeByChannelMeanStd` buffers at `normalize`;
- kuangliu ResNet-18 (RoCL `src/models/resnet.py`, AdvCL `models/resnet_cifar.py`): `shortcut`
  Sequential;
- torchvision-layout ResNet-18 with a CIFAR stem (ACL `models/resnet.py`);
- AP-DPE's `PretrainEnsembleModel` over the pre-activation ResNet-50 of `pretraining/resnetv2.py`.
The tests save their state dicts the way each official script does and compare forwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


class NormalizeByChannelMeanStd(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, x):
        return (x - self.mean[None, :, None, None]) / self.std[None, :, None, None]


class BatchNormMultiple(nn.Module):
    """batch_norm_multiple: `bn_list` a ModuleList (one BN per branch name) or one BN if no names."""

    def __init__(self, norm, planes, bn_names=None):
        super().__init__()
        self.bn_names = bn_names
        self.bn_list = norm(planes) if bn_names is None else nn.ModuleList([norm(planes) for _ in bn_names])

    def forward(self, x, bn):
        return self.bn_list(x) if self.bn_names is None else self.bn_list[self.bn_names.index(bn)](x)


class DownsampleMultiple(nn.Module):
    def __init__(self, inplanes, planes, stride, bn_names):
        super().__init__()
        self.conv = nn.Conv2d(inplanes, planes, 1, stride, bias=False)
        self.bn = BatchNormMultiple(nn.BatchNorm2d, planes, bn_names)

    def forward(self, x, bn):
        return self.bn(self.conv(x), bn)


class MultiBNBlock(nn.Module):
    def __init__(self, inplanes, planes, stride, bn_names):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = BatchNormMultiple(nn.BatchNorm2d, planes, bn_names)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = BatchNormMultiple(nn.BatchNorm2d, planes, bn_names)
        self.downsample = DownsampleMultiple(inplanes, planes, stride, bn_names) \
            if stride != 1 or inplanes != planes else None

    def forward(self, x, bn):
        out = F.relu(self.bn1(self.conv1(x), bn))
        out = self.bn2(self.conv2(out), bn)
        return F.relu(out + (self.downsample(x, bn) if self.downsample is not None else x))


class ProjHead(nn.Module):
    """ACL's proj_head: fc1 (bias), bn1, fc2 / fc3 (no bias), bn2, bn3, all multi-BN."""

    def __init__(self, ch, bn_names):
        super().__init__()
        self.fc1 = nn.Linear(ch, ch)
        self.bn1 = BatchNormMultiple(nn.BatchNorm1d, ch, bn_names)
        self.fc2 = nn.Linear(ch, ch, bias=False)
        self.bn2 = BatchNormMultiple(nn.BatchNorm1d, ch, bn_names)
        self.fc3 = nn.Linear(ch, ch, bias=False)
        self.bn3 = BatchNormMultiple(nn.BatchNorm1d, ch, bn_names)


class MultiBNResNet18(nn.Module):
    """`resnet18(bn_names=...)` of resnet_multi_bn.py; `heads` = "acl" (fc = proj_head) or "advcl"
    (fc_002 ... fc_500, head_ce, head_proj, head_pred as in resnet_cifar_multibn_ensembleFC.py)."""

    def __init__(self, bn_names, normalize=True, heads="acl", width=64):
        super().__init__()
        if normalize:
            self.normalize = NormalizeByChannelMeanStd(*IMAGENET)
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = BatchNormMultiple(nn.BatchNorm2d, width, bn_names)
        inplanes = width
        for stage in range(4):
            planes = width * 2 ** stage
            blocks = [MultiBNBlock(inplanes, planes, 1 if stage == 0 else 2, bn_names),
                      MultiBNBlock(planes, planes, 1, bn_names)]
            setattr(self, f"layer{stage + 1}", nn.ModuleList(blocks))
            inplanes = planes
        dim = inplanes
        if heads == "acl":
            self.fc = ProjHead(dim, bn_names)
        else:
            for k in (2, 10, 50, 100, 500):
                setattr(self, f"fc_{k:03d}", nn.Linear(dim, k))
            self.head_ce = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(), nn.Linear(dim, 1000))
            self.head_proj = nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.ReLU(), nn.Linear(dim, 128))
            self.head_pred = nn.Sequential(nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 128))

    def features(self, x, bn):
        if hasattr(self, "normalize"):
            x = self.normalize(x)
        out = F.relu(self.bn1(self.conv1(x), bn))
        for stage in range(1, 5):
            for block in getattr(self, f"layer{stage}"):
                out = block(out, bn)
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


class KuangliuBlock(nn.Module):
    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class KuangliuResNet18(nn.Module):
    """RoCL's / AdvCL-finetuning's ResNet18 (F.avg_pool2d(out, 4) = global pool at 32x32). `extra`
    = "rocl" (a `linear` head only if not contrastive) or "advcl" (linear + head_proj + head_pred)."""

    def __init__(self, num_classes=10, linear=False, extra="rocl", width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        in_planes = width
        for stage in range(4):
            planes = width * 2 ** stage
            setattr(self, f"layer{stage + 1}", nn.Sequential(KuangliuBlock(in_planes, planes, 1 if stage == 0 else 2),
                                                             KuangliuBlock(planes, planes, 1)))
            in_planes = planes
        if linear or extra == "advcl":
            self.linear = nn.Linear(in_planes, num_classes)
        if extra == "advcl":
            self.head_proj = nn.Sequential(nn.Linear(in_planes, in_planes), nn.ReLU(), nn.Linear(in_planes, 128))
            self.head_pred = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128))

    def features(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.avg_pool2d(out, 4).flatten(1)


class PreActBottleneckV2(nn.Module):
    """resnetv2.Bottleneck."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.relu = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(in_planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != 4 * planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, 4 * planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(4 * planes))

    def forward(self, x):
        pre = self.relu(self.bn0(x))
        out = self.relu(self.bn1(self.conv1(pre)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.conv3(out)
        return out + (self.shortcut(x) if len(self.shortcut) == 0 else self.shortcut(pre))


def _v2_layer(in_planes, planes, n, stride):
    layers = []
    for s in [stride] + [1] * (n - 1):
        layers.append(PreActBottleneckV2(in_planes, planes, s))
        in_planes = 4 * planes
    return nn.Sequential(*layers), in_planes


class PretrainEnsembleModel(nn.Module):
    """model_ensemble.PretrainEnsembleModel: blocks = (conv1, layer1, layer2, layer3) of a resnetv2
    ResNet-50 (its bn1 unused), a layer4 and fc per task; ImageNet normalization in forward."""

    def __init__(self):
        super().__init__()
        layer1, c = _v2_layer(64, 64, 3, 1)
        layer2, c = _v2_layer(c, 128, 4, 2)
        layer3, c = _v2_layer(c, 256, 6, 2)
        self.blocks = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), layer1, layer2, layer3)
        self.layer4_rotation, _ = _v2_layer(1024, 512, 3, 2)
        self.layer4_jigsaw, _ = _v2_layer(1024, 512, 3, 2)
        self.fc_rotation = nn.Linear(2048, 4)
        self.fc_jigsaw = nn.Linear(2048, 31)

    def trunk(self, x):
        mean, std = (torch.tensor(v)[None, :, None, None] for v in IMAGENET)
        return self.blocks((x - mean) / std)

    def features(self, x, task):
        out = self.trunk(x)
        if task != "selfie":
            out = getattr(self, f"layer4_{task}")(out)
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Distinct affine parameters and running statistics in every BN (so a wrong branch shows)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.weight.data = 1 + 0.2 * torch.randn(n, generator=g)
            m.bias.data = 0.1 * torch.randn(n, generator=g)
            m.running_mean.data = 0.1 * torch.randn(n, generator=g)
            m.running_var.data = 1 + 0.3 * torch.rand(n, generator=g)
            m.num_batches_tracked.fill_(7)
    return model.eval()
