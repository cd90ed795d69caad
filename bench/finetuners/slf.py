"""SLF: standard linear finetuning (AdvCL's released protocol).

The encoder is frozen and in eval mode; a linear head learns with cross-entropy on clean,
weakly augmented images (RandomCrop(32, 4) + horizontal flip). SGD lr 0.01, momentum 0.9,
weight decay 2e-4, batch 512, 25 epochs, lr x0.1 at epochs 15 and 20.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from bench.augment import WEAK_VIEW, make_view
from bench.finetuners.base import FinetuneConfig, Finetuner
from bench.registry import FINETUNERS


@FINETUNERS.register("slf")
class SLF(Finetuner):
    """Standard linear finetuning: frozen eval-mode encoder, linear head on clean images."""

    @dataclass
    class Config(FinetuneConfig):
        pass

    linear = True
    gpu_share = 0.25  # a linear head on clean images: light, four share a GPU

    def training_step(self, x, y, index, info):
        x = make_view(x, WEAK_VIEW)
        logits = self.model.head(self.features(x))
        return {"loss": F.cross_entropy(logits, y), "accuracy": (logits.argmax(1) == y).float().mean()}
