"""RoCL (Kim-Minseon/RoCL): `rocl_train.py` checkpoints.

`src/models/resnet.py` (kuangliu layout): a ResNet-18 with a CIFAR stem, no normalization, one
BatchNorm set, shortcuts `shortcut.0` / `shortcut.1`, and a `linear` classifier only when built
with `contrastive_learning=False`. `utils.checkpoint` saves `{'epoch', 'acc', 'model':
DistributedDataParallel state dict (keys under `module.`), 'optimizer_state', 'rng_state'}`;
the projector (`linear_1`, `linear_2`) goes to a separate `..._projector` file, which is not an
encoder (dropped if merged in).
"""

from __future__ import annotations

from bench.checkpoints.base import register
from bench.checkpoints.resnet_keys import ResNetLayout, load_layout

LAYOUT = ResNetLayout("rocl", branch_names=("normal",), heads=("linear",), drop=("linear_1", "linear_2"),
                      normalize="none", styles=("kuangliu",))


@register("rocl", "RoCL's rocl_train.py checkpoint (single BN, shortcut.0/1; linear head if any)")
def load_rocl(source, *, branch=None, want="auto", device="cpu", normalize=None, **_):
    return load_layout(source, LAYOUT, branch=branch, want=want, device=device, normalize=normalize,
                       containers=("model", "state_dict", "net"))
