"""AdvCL (LijieFan/AdvCL): pretraining and SLF checkpoints.

Pretraining (`pretraining_advCL.py`, `models/resnet_cifar_multibn_ensembleFC.py`): `{'model':
DataParallel state dict, 'epoch', 'rng_state'}`, keys under `module.`; a torchvision-style
ResNet-18 with a CIFAR stem and no normalization, every BatchNorm a `bn_list` of branches
`normal` (0), `pgd` (1), `pgd_ce` (2), shortcuts `downsample.conv` / `downsample.bn`; heads
`fc_002 ... fc_500` (the pseudo-label classifiers), `head_ce`, `head_proj`, `head_pred` (all
dropped). The downstream encoder keeps `pgd` (docs/methods.md §1).

SLF (`finetuning_advCL_SLF.py`, `models/resnet_cifar.py` + `models/linear.py`): `{'model':
ResNet18 state (single BN, `shortcut.0/1`, its own `linear` and `head_proj`/`head_pred`),
'classifier': {'fc.weight', 'fc.bias'}, ...}`. The script trains only `classifier`; the model's
own `linear` is never trained and is dropped; the classifier's `fc` is the head.
"""

from __future__ import annotations

from bench.checkpoints.base import is_state_dict, register, strip_prefix
from bench.checkpoints.resnet_keys import ResNetLayout, linear_head, load_layout

HEADS = ("fc_002", "fc_010", "fc_050", "fc_100", "fc_500", "head_ce", "head_proj", "head_pred")
LAYOUT = ResNetLayout("advcl", branch_names=("normal", "pgd", "pgd_ce"), default_branch="pgd", heads=("fc",),
                      drop=(*HEADS, "linear"), normalize="none", styles=("multibn", "kuangliu"))


def _classifier_entry(blob, state):
    """The SLF file's separate linear classifier, if there is one."""
    entry = blob.get("classifier") if isinstance(blob, dict) else None
    if not is_state_dict(entry):
        return state, None, []
    entry, _ = strip_prefix(dict(entry), ("module.",))
    head = {k[len("fc."):]: v for k, v in entry.items() if k.startswith("fc.")}
    if not linear_head(head) or len(head) != len(entry):
        return state, None, []
    return state, head, []


@register("advcl", "AdvCL's pretraining epoch_N.ckpt (3 BN branches; keeps pgd) or its SLF best.ckpt (classifier)")
def load_advcl(source, *, branch=None, want="auto", device="cpu", normalize=None, **_):
    return load_layout(source, LAYOUT, branch=branch, want=want, device=device, normalize=normalize,
                       containers=("model", "state_dict"), prepare=_classifier_entry)
