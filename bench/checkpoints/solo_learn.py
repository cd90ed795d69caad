"""solo-learn (vturrisi/solo-learn) and DeACL checkpoints: a PyTorch Lightning `.ckpt` whose
`state_dict` holds the backbone under `backbone.*`.

The backbone is torchvision's ResNet-18 with solo-learn's CIFAR stem: conv1 3x3, stride 1,
**padding 2**, no max-pool, `fc = Identity` (so no `fc.*` keys); key names `layer{s}.{b}.*` with
`downsample.0/1` shortcuts. Everything else in the file (the projector, momentum copies, the online
linear probe `classifier.*`, which is monitoring only) is dropped and listed. DeACL's backbone
(`solo/models/resnet_add_normalize.py`) also carries its CIFAR-10 mean/std as `normalize.*`
buffers; they are dropped too, the encoder's own `normalize` is used (default `cifar10`, the
constants DeACL puts in the model; solo-learn itself normalizes in its data pipeline).

A state dict does not record the stem padding: `stem_padding` (default 2) and `normalize` are
options (a DeACL teacher passes the student's). The result is the harness's `ResNet18`, so the
checkpoint stage stores it as a plain `encoder.pt`.
"""

from __future__ import annotations

from bench.checkpoints.base import Loaded, check_want, finish, read_checkpoint, register, unwrap
from bench.checkpoints.resnet_keys import ResNetLayout, build_resnet
from bench.errors import BenchError

PREFIX = "backbone."
LAYOUT = ResNetLayout("solo_learn", heads=(), normalize="cifar10", styles=("torchvision",),
                      hint="a solo-learn checkpoint holds torchvision's ResNet-18 under backbone.*")
STEM_PADDING = 2


@register("solo_learn", "a solo-learn / DeACL Lightning checkpoint: backbone.* (torchvision ResNet-18, CIFAR stem "
                        "padding 2); projector and online probe dropped")
def load_solo_learn(source, *, branch=None, want="auto", device="cpu", normalize=None, stem_padding=STEM_PADDING,
                    **_):
    check_want(want)
    where = str(source)
    if want == "classifier":
        raise BenchError(f"{where}: a solo-learn checkpoint's online linear probe (classifier.*) is monitoring "
                         f"only; load the backbone as an encoder and finetune it")
    state, _ = unwrap(read_checkpoint(source), ("state_dict",), where)
    backbone = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    if not backbone:
        raise BenchError(f"{where}: no {PREFIX}* weights: not a solo-learn checkpoint (first keys: "
                         f"{', '.join(sorted(state)[:5])})")
    dropped = sorted({k.split(".", 1)[0] + ".*" for k in state if not k.startswith(PREFIX)})
    constants = [k for k in backbone if k.startswith("normalize.")]
    for key in constants:
        del backbone[key]
    if constants:
        dropped.append("backbone.normalize.* (in-model constants; the encoder's own normalization is used)")
    try:
        padding = int(stem_padding)
    except (TypeError, ValueError):
        raise BenchError(f"stem_padding={stem_padding!r}: an integer (2 for solo-learn's CIFAR stem)") from None
    model, facts = build_resnet(backbone, LAYOUT, source=where, branch=branch, want="encoder",
                                normalize=normalize or LAYOUT.normalize, stem_padding=padding)
    return Loaded(model=finish(model, device), kind="encoder", format="solo_learn", source=where,
                  branch=facts["branch"], architecture=facts["architecture"], normalize=facts["normalize"],
                  dropped=dropped + facts["dropped"], notes=facts["notes"])
