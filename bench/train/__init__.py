"""The one training loop: methods and finetuners supply a step; they do not write loops."""

from bench.train.loop import Trainable, StepInfo, fit, load_checkpoint
from bench.train.optim import LARS, build_optimizer, lr_at, supcon_lr

__all__ = ["Trainable", "StepInfo", "fit", "load_checkpoint", "LARS", "build_optimizer", "lr_at", "supcon_lr"]
