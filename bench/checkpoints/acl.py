"""ACL (VITA-Group/Adversarial-Contrastive-Learning): `train_simCLR.py` checkpoints.

`models/resnet_multi_bn.py`: a torchvision-style ResNet-18 with a CIFAR stem, ImageNet
normalization as buffers (`normalize.mean/std`), every BatchNorm a `bn_list` of branches
`normal` (0) and `pgd` (1) (`--ACL_DS`; one branch without it), shortcuts `downsample.conv` /
`downsample.bn`, and the projection head at `fc` (`proj_head`: fc1/bn1/fc2/bn2/fc3/bn3, dropped).
Files: `{'epoch', 'state_dict', 'optim'}` (no DataParallel prefix). The downstream encoder keeps
`pgd` (docs/methods.md §2). A finetuned ACL classifier (`train_trades.py`, `models/resnet.py`: single
BN, `downsample.0/1`, a linear `fc`) loads through the same layout as a classifier.
"""

from __future__ import annotations

from bench.checkpoints.base import register
from bench.checkpoints.resnet_keys import ResNetLayout, load_layout

LAYOUT = ResNetLayout("acl", branch_names=("normal", "pgd"), default_branch="pgd", heads=("fc",),
                      normalize="imagenet", styles=("multibn", "torchvision"))


@register("acl", "ACL's train_simCLR.py model.pt (dual BN normal/pgd; keeps pgd) or its finetuned classifier")
def load_acl(source, *, branch=None, want="auto", device="cpu", normalize=None, **_):
    return load_layout(source, LAYOUT, branch=branch, want=want, device=device, normalize=normalize,
                       containers=("state_dict", "model", "P_state"))
