"""ALF's training attack starts as AdvCL's `AttackPGD`: uniform noise, not clipped to [0, 1]."""

from __future__ import annotations

import torch

import bench.finetuners.alf as alf
from bench.config import EvalConfig, from_dict
from bench.finetuners.base import FinetuneContext
from bench.models import ResNet18


def test_the_random_start_is_not_clipped(monkeypatch):
    torch.manual_seed(0)
    cfg = from_dict(alf.ALF.Config, {"attack_steps": 0}, "alf")  # no step: the examples are the start
    ft = alf.ALF(cfg, ResNet18(width=4), FinetuneContext(num_classes=4, device=torch.device("cpu"), eval=EvalConfig()))
    seen = []
    real = ft.features
    monkeypatch.setattr(ft, "features", lambda x: seen.append(x) or real(x))
    ft.train_mode()
    ft.training_step(torch.zeros(8, 3, 32, 32), torch.zeros(8, dtype=torch.long), torch.arange(8), None)
    x_adv = seen[-1]
    assert x_adv.min() < 0 and x_adv.min() >= -cfg.eps - 1e-7  # below 0, inside the eps-ball of the black images
