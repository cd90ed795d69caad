"""DynACL (PKU-ML/DYNACL): `train_DynACL.py` checkpoints (dynacl.md §7).

`model_encoder_k.pt` = `{'epoch', 'state_dict': encoder_k.state_dict()}`: ACL's multi-BN ResNet-18
(`models/resnet_multi_bn.py`: ImageNet normalization buffers, `bn_list` branches `normal` (0) and
`pgd` (1), `downsample.conv/bn`, projection head at `fc`, dropped). `model.pt` and
`model_encoder_k_{e}.pt` hold the whole `resnet18_momentum` wrapper (`encoder_q.*`, `encoder_k.*`):
the `encoder_k` half is used, as the official downstream scripts do, and `encoder_q` is dropped.
The downstream encoder keeps `pgd`. Loading is strict (the official `strict=False` silently loads
nothing from a wrong file, dynacl.md §7).
"""

from __future__ import annotations

from bench.checkpoints.base import register
from bench.checkpoints.resnet_keys import ResNetLayout, load_layout

LAYOUT = ResNetLayout("dynacl", branch_names=("normal", "pgd"), default_branch="pgd", heads=("fc",),
                      normalize="imagenet", styles=("multibn", "torchvision"))


def _encoder_k(blob, state):
    if any(k.startswith("encoder_k.") for k in state):
        kept = {k[len("encoder_k."):]: v for k, v in state.items() if k.startswith("encoder_k.")}
        others = sorted({k.split(".", 1)[0] for k in state if not k.startswith("encoder_k.")})
        return kept, None, [f"{name}.* (the momentum wrapper's other parts; encoder_k kept)" for name in others]
    return state, None, []


@register("dynacl", "DynACL's model_encoder_k.pt or the momentum wrapper (encoder_k; dual BN, keeps pgd)")
def load_dynacl(source, *, branch=None, want="auto", device="cpu", normalize=None, **_):
    return load_layout(source, LAYOUT, branch=branch, want=want, device=device, normalize=normalize,
                       containers=("state_dict", "model"), prepare=_encoder_k)
