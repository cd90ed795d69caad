"""The base class of a pretraining-method plugin.

A method is a small class in `methods/`: a `Config` dataclass (paper defaults), `build` (the
model: encoder + heads + BN branches), `training_step` (its loss, running its own attack
through `bench.attacks`), and the BN branch its downstream encoder keeps. Losses live in plain
functions beside it so they can be tested alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bench.config import EncoderConfig, TrainConfig
from bench.models import encoder_from_config, export_encoder
from bench.train import Trainable


@dataclass
class MethodContext:
    """What a method gets at construction: shared settings and the outputs of the jobs it needs."""

    encoder: EncoderConfig
    num_classes: int
    device: torch.device
    inputs: dict[str, Any]  # role -> artifact, e.g. {"pseudo_labels": {K: LongTensor by source-split position}}
    image_size: int = 32


class Method(Trainable):
    Config: type = TrainConfig
    branches: tuple[str, ...] = ("normal",)  # BatchNorm branches of the backbone
    encoder_branch: str = "normal"           # the branch the downstream encoder keeps
    normalize: str = "none"                  # input normalization inside the model
    stem_padding: int = 1                    # padding of the 3x3 stem conv (2: the torchvision-layout CIFAR stem)
    uses_labels: bool = False                # True only for supervised baselines

    def __init__(self, cfg: Any, ctx: MethodContext):
        self.cfg = cfg
        self.ctx = ctx
        self.model = self.build().to(ctx.device)

    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    def new_encoder(self) -> nn.Module:
        """A fresh backbone (see `encoder_for`; the instance's normalization and stem may depend on its config)."""
        return encoder_from_config(self.ctx.encoder, self.branches, self.normalize, self.stem_padding)

    @classmethod
    def encoder_for(cls, encoder: EncoderConfig, branches: tuple[str, ...] | None = None) -> nn.Module:
        """A fresh backbone of this method: its BatchNorm branches, and its input normalization and
        stem padding unless the shared `encoder` settings choose them."""
        return encoder_from_config(encoder, branches or cls.branches, cls.normalize, cls.stem_padding)

    def build(self) -> nn.Module:
        """The whole model; it must have an `encoder` attribute (the backbone)."""
        raise TypeError(f"{type(self).__name__} must define build()")

    @classmethod
    def dependencies(cls, cfg: Any) -> dict[str, tuple[str, dict[str, Any]]]:
        """Jobs this method needs before it can train: role -> (stage name, parameters). Their
        artifacts arrive as `ctx.inputs[role]` (default: none)."""
        return {}

    @classmethod
    def post_stages(cls, cfg: Any) -> list[tuple[str, dict[str, Any]]]:
        """Jobs that run after the pretraining, each on the previous one's output; the last one's
        encoder is what the finetuners get (default: none, the pretrained encoder itself)."""
        return []

    pretrain_as: str | None = None  # a method whose pretraining this one's is (DynACL++: dynacl), shared with it

    @classmethod
    def pretrain_settings(cls, cfg: Any) -> dict[str, Any]:
        """This config's values of the settings that `pretrain_as`'s config has (the rest are this
        method's own, e.g. its post-processing's)."""
        from bench.config import to_dict
        from bench.registry import METHODS

        names = {f.name for f in dataclasses.fields(METHODS.get(cls.pretrain_as).Config)}
        return {k: v for k, v in to_dict(cfg if cfg is not None else cls.Config()).items() if k in names}

    def extra_artifacts(self) -> dict[str, Any]:
        """Files the pretrain job saves beside encoder.pt (file name -> tensors and plain data)."""
        return {}

    def export_encoder(self) -> nn.Module:
        """The downstream encoder: the backbone with `encoder_branch`, in eval mode."""
        enc = self.encoder
        out = export_encoder(enc, self.encoder_branch) if len(enc.branches) > 1 else _copy(enc)
        return out.eval()


def _copy(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)
