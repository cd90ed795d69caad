"""AP-DPE (TAMU-VITA/Adv-SS-Pretraining): `pretraining/ensemble_pretrain.py` checkpoints.

The official network is not a ResNet-18 and the harness's ResNet cannot express it: it is a
pre-activation ResNet-50 (`pretraining/resnetv2.py`): Bottleneck blocks with a BatchNorm + ReLU
*before* the block (`bn0`), none after `conv3`, the shortcut taken from the pre-activated input
when it has a conv. `model_ensemble.PretrainEnsembleModel` keeps `blocks` = (conv1, layer1,
layer2, layer3) of it, with **no stem BatchNorm** (the first block's `bn0` acts on the conv
output), two task heads `layer4_rotation` / `layer4_jigsaw` (each a ResNet-50 layer4) with
`fc_rotation` (4 classes) / `fc_jigsaw` (31), and ImageNet normalization in its forward (not a
buffer). Files: `{'epoch', 'selfie_state', 'state_dict', 'best_prec1'}`.

So this module has its own encoder, `APDPEEncoder`: normalize -> blocks -> the layer4 of one task
-> global average pool (2048 features), `branch` = "rotation" (default, as `apdpe.encoder_task`
in docs/apdpe.md) or "jigsaw"; "selfie" keeps the trunk only (layer3 pooled, 1024 features; the
selfie task has no layer4). The task fcs and the selfie transformer are dropped. The official
finetuning averages three networks' softmax outputs (`finetune/model_ensemble.py`), which one
encoder cannot express; pick the branch. The harness's own AP-DPE (`methods/apdpe.py`, a
ResNet-18 trunk) writes `bench` files instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.checkpoints.base import Loaded, check_want, finish, load_strict, read_checkpoint, register, \
    strip_prefix, take, unwrap
from bench.errors import BenchError
from bench.models.norm import Normalize

TASKS = ("rotation", "jigsaw", "selfie")
STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2))  # planes, blocks, stride of layer1..3
LAYER4 = (512, 3, 2)


class PreActBottleneck(nn.Module):
    """resnetv2.Bottleneck: bn0+ReLU first, conv1-bn1-ReLU, conv2-bn2-ReLU, conv3; no BN after conv3."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes * 4:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes * 4, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes * 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn0(x))
        out = F.relu(self.bn1(self.conv1(pre)))
        out = F.relu(self.bn2(self.conv2(out)))
        # an identity shortcut adds the raw input, a conv shortcut the pre-activated one (as resnetv2)
        return self.conv3(out) + (self.shortcut(pre) if len(self.shortcut) else x)


def _layer(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = []
    for i in range(blocks):
        layers.append(PreActBottleneck(in_planes, planes, stride if i == 0 else 1))
        in_planes = planes * 4
    return nn.Sequential(*layers)


class APDPEEncoder(nn.Module):
    """The official AP-DPE trunk with one task's layer4: images in [0,1] -> pooled features."""

    def __init__(self, task: str = "rotation"):
        super().__init__()
        if task not in TASKS:
            raise BenchError(f"AP-DPE branch {task!r}: one of {', '.join(TASKS)}")
        self.task = task
        self.normalize = Normalize("imagenet")
        layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False)]
        in_planes = 64
        for planes, blocks, stride in STAGES:
            layers.append(_layer(in_planes, planes, blocks, stride))
            in_planes = planes * 4
        self.blocks = nn.Sequential(*layers)
        self.layer4 = _layer(in_planes, *LAYER4) if task != "selfie" else nn.Identity()
        self.feature_dim = LAYER4[0] * 4 if task != "selfie" else in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(self.blocks(self.normalize(x)))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


@register("apdpe", "AP-DPE's official ensemble_pretrain.py checkpoint (pre-activation ResNet-50; branch = "
                   "rotation | jigsaw | selfie)")
def load_apdpe(source, *, branch=None, want="auto", device="cpu", normalize=None, **_):
    check_want(want)
    where = str(source)
    if want == "classifier":
        raise BenchError(f"{where}: an AP-DPE pretraining checkpoint has no classification head for the data "
                         f"(only the rotation/jigsaw pretext heads); load it as an encoder and finetune it")
    if normalize not in (None, "imagenet"):
        raise BenchError(f"{where}: AP-DPE normalizes inputs with ImageNet statistics in its forward; "
                         f"normalize={normalize!r} contradicts it")
    state, _ = unwrap(read_checkpoint(source), ("state_dict",), where)
    state, _ = strip_prefix(state, ("module.",))
    task = branch or "rotation"
    if task not in TASKS:
        raise BenchError(f"{where}: no AP-DPE branch {task!r}; one of {', '.join(TASKS)} (the task whose layer4 "
                         f"the encoder keeps; selfie = the trunk only)")
    if any(k.startswith("layer1.") for k in state) and not any(k.startswith("blocks.") for k in state):
        raise BenchError(f"{where}: a plain ResNet layout (layer1...), not AP-DPE's ensemble checkpoint (blocks.*, "
                         f"layer4_rotation.*); for the harness's own AP-DPE use the `bench` format")
    dropped = []
    kept: dict[str, torch.Tensor] = take(state, "blocks")
    kept = {f"blocks.{k}": v for k, v in kept.items()}
    for name in TASKS[:2]:
        layer4 = take(state, f"layer4_{name}")
        if name == task:
            kept.update({f"layer4.{k}": v for k, v in layer4.items()})
        elif layer4:
            dropped.append(f"layer4_{name}.* (the {name} task's layer4)")
    for head in ("fc_rotation", "fc_jigsaw"):
        if take(state, head):
            dropped.append(f"{head}.* (pretext head)")
    encoder = APDPEEncoder(task)
    load_strict(encoder, kept, source=where, layout="apdpe", unexpected=list(state),
                hint="AP-DPE's layout: blocks.0 (conv1), blocks.1-3 (layer1-3, pre-activation Bottlenecks with "
                     "bn0), layer4_rotation / layer4_jigsaw, fc_rotation / fc_jigsaw")
    arch = f"AP-DPE pre-activation ResNet-50 trunk + {task} {'layer4' if task != 'selfie' else '(no layer4)'}"
    return Loaded(model=finish(encoder, device), kind="encoder", format="apdpe", source=where, branch=task,
                  architecture=arch, normalize="imagenet", dropped=dropped,
                  notes=["the official finetuning ensembles three networks; this is one encoder (one branch)"])
