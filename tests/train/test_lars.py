"""LARS in its two official forms, against hand-written references of each official update.

ACL (`optimizer/lars.py` of VITA-Group/Adversarial-Contrastive-Learning): the learning rate is
inside the momentum buffer, local_lr = eta |w| / (|g| + wd |w|), set to 1 where |w| or |g| is
below 1e-15. RoCL (torchlars, kakaobrain): local_lr = trust |w| / (|g| + wd |w| + eps) where
|w| > 0 and |g| > 0 (else 1) scales g + wd w, which then goes through torch SGD with the lr
outside the buffer. The schedule below changes the learning rate at every step (a warm-up),
where the two forms differ.
"""

from __future__ import annotations

import math

import pytest
import torch

from bench.train import LARS, build_optimizer
from methods.acl import ACL
from methods.rocl import RoCL

LRS = [0.05, 0.4, 1.0, 2.5, 5.0, 5.0, 3.0]  # warm-up, then a decay
M, WD, ETA = 0.9, 1e-6, 1e-3


def initial() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(5, 3, generator=g, dtype=torch.float64),
            torch.randn(7, generator=g, dtype=torch.float64),
            torch.zeros(4, dtype=torch.float64),            # |w| = 0: local_lr = 1
            torch.randn(3, generator=g, dtype=torch.float64)]  # its gradient is 0: local_lr = 1


TARGETS = [torch.full((5, 3), 0.5, dtype=torch.float64), torch.linspace(-1, 1, 7, dtype=torch.float64),
           torch.ones(4, dtype=torch.float64), None]


def gradients(ws: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradient of sum_k (k + 1) |w_k - t_k|^2 (a different scale per tensor); 0 for the last."""
    return [2 * (k + 1) * (w - t) if t is not None else torch.zeros_like(w)
            for k, (w, t) in enumerate(zip(ws, TARGETS))]


def acl_reference(lrs: list[float]) -> list[torch.Tensor]:
    """ACL's optimizer/lars.py step, written out: buf <- m buf + lr local_lr (g + wd w); w <- w - buf."""
    ws = [w.clone() for w in initial()]
    bufs = [torch.zeros_like(w) for w in ws]
    for lr in lrs:
        for k, g in enumerate(gradients(ws)):
            w = ws[k]
            w_norm, g_norm = float(w.norm()), float(g.norm())
            local = 1.0 if (w_norm < 1e-15 or g_norm < 1e-15) else ETA * w_norm / (g_norm + WD * w_norm)
            bufs[k] = M * bufs[k] + lr * local * (g + WD * w)
            ws[k] = w - bufs[k]
    return ws


def torchlars_reference(lrs: list[float], eps: float = 1e-8) -> list[torch.Tensor]:
    """torchlars around torch SGD (RoCL), written out: g' = local_lr (g + wd w); buf <- m buf + g'
    (buf = g' at the first step); w <- w - lr buf."""
    ws = [w.clone() for w in initial()]
    bufs: list[torch.Tensor | None] = [None] * len(ws)
    for lr in lrs:
        for k, g in enumerate(gradients(ws)):
            w = ws[k]
            w_norm, g_norm = float(w.norm()), float(g.norm())
            local = ETA * w_norm / (g_norm + WD * w_norm + eps) if (w_norm > 0 and g_norm > 0) else 1.0
            scaled = local * (g + WD * w)
            bufs[k] = scaled.clone() if bufs[k] is None else M * bufs[k] + scaled
            ws[k] = w - lr * bufs[k]
    return ws


def run(optimizer_for, lrs: list[float]) -> list[torch.Tensor]:
    """Our optimizer on the same problem, the lr set before each step as `bench.train.fit` does."""
    ws = [torch.nn.Parameter(w.clone()) for w in initial()]
    opt = optimizer_for(ws)
    for lr in lrs:
        for group in opt.param_groups:
            group["lr"] = lr
        for w, g in zip(ws, gradients([w.detach() for w in ws])):
            w.grad = g
        opt.step()
    return [w.detach() for w in ws]


def config(cls, **overrides):
    cfg = cls.Config()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def test_acl_defaults_to_its_official_lars_and_matches_it_over_a_changing_lr():
    cfg = config(ACL, weight_decay=WD, momentum=M, trust_coef=ETA)
    assert cfg.lars_lr_in_buffer is True
    ours = run(lambda ws: build_optimizer(ws, cfg), LRS)
    for a, b in zip(ours, acl_reference(LRS)):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)


def test_rocl_defaults_to_torchlars_and_matches_it_over_a_changing_lr():
    cfg = config(RoCL, weight_decay=WD, momentum=M, trust_coef=ETA)
    assert cfg.lars_lr_in_buffer is False
    optimizer = build_optimizer([torch.nn.Parameter(torch.ones(2))], cfg)
    assert isinstance(optimizer, LARS) and not optimizer.lr_in_buffer
    ours = run(lambda ws: build_optimizer(ws, cfg), LRS)
    for a, b in zip(ours, torchlars_reference(LRS)):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)


def test_the_two_forms_differ_only_when_the_lr_changes():
    acl, torchlars = acl_reference(LRS), torchlars_reference(LRS, eps=0.0)
    assert not torch.allclose(acl[0], torchlars[0], rtol=1e-6)  # warm-up: a real difference
    flat = [2.0] * 5
    for a, b in zip(acl_reference(flat), torchlars_reference(flat, eps=0.0)):
        assert torch.allclose(a, b, rtol=1e-12)
    # the option is read by name (other methods set lars_lr_in_buffer in their configs too)
    for flag in (True, False):
        cfg = config(RoCL, lars_lr_in_buffer=flag)
        assert build_optimizer([torch.nn.Parameter(torch.ones(2))], cfg).lr_in_buffer is flag


def test_zero_weights_or_gradients_take_the_plain_step():
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    w.grad = torch.full((3,), 2.0, dtype=torch.float64)
    LARS([w], lr=0.5, momentum=0.9, weight_decay=0.0, lr_in_buffer=True).step()
    assert torch.allclose(w.detach(), torch.full((3,), -1.0, dtype=torch.float64))  # local_lr = 1
    assert math.isfinite(float(w.detach().sum()))


@pytest.mark.parametrize("in_buffer", [True, False])
def test_first_step_relative_change_is_lr_times_trust(in_buffer):
    w = torch.nn.Parameter(torch.randn(64, generator=torch.Generator().manual_seed(1)))
    before = w.detach().clone()
    w.grad = torch.randn(64, generator=torch.Generator().manual_seed(2))
    LARS([w], lr=5.0, momentum=0.9, weight_decay=0.0, trust_coef=1e-3, lr_in_buffer=in_buffer).step()
    assert float((w.detach() - before).norm() / before.norm()) == pytest.approx(5e-3, rel=1e-5)
