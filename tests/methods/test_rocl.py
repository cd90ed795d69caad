"""RoCL (docs/methods.md §3): loss reference values, the detached similarity, the attack, the schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bench.attacks import eval_mode
from bench.config import EncoderConfig, from_dict
from bench.method import MethodContext
from bench.models import ResNet18, bn_state
from bench.registry import METHODS
from bench.train import build_optimizer
from methods.rocl import RoCL, gradual_warmup_cosine_lr, rocl_loss, rocl_regularizer

WIDTH, BATCH = 4, 8


def make(**overrides) -> RoCL:
    settings = {"batch_size": BATCH, "attack_steps": 2, **overrides}
    cfg = from_dict(RoCL.Config, settings, "rocl")
    torch.manual_seed(0)
    return RoCL(cfg, MethodContext(EncoderConfig(width=WIDTH), 10, torch.device("cpu"), {}))


def images(n: int = BATCH, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_registered_with_the_paper_defaults():
    assert METHODS.get("rocl") is RoCL
    c = RoCL.Config()
    assert (c.epochs, c.batch_size, c.optimizer, c.lr, c.momentum, c.weight_decay, c.trust_coef) == \
        (1000, 512, "lars", 0.1, 0.9, 1e-6, 1e-3)
    assert (c.eps, c.alpha, c.attack_steps, c.temperature) == (0.0314, 0.007, 7, 0.5)
    assert c.reg_weight == 1 / 256 and c.detach_keys and (c.warmup_epochs, c.warmup_multiplier) == (10, 15.0)
    assert RoCL.normalize == "none" and RoCL.branches == ("normal",)


@pytest.mark.parametrize("n, expected", [(2, 1.755936), (4, 2.337531)])
@pytest.mark.parametrize("detach_keys", [True, False])
def test_rep_loss_reference_values(n, expected, detach_keys):
    z = torch.eye(n)  # 3 identical views, orthogonal samples
    value = rocl_loss(z, z.clone(), z.clone(), 0.5, detach_keys=detach_keys)
    assert value.item() == pytest.approx(expected, abs=1e-5)
    # closed form: 2 * -log(e^2 / (2 e^2 + 3N - 3))
    assert value.item() == pytest.approx(-2 * math.log(math.e ** 2 / (2 * math.e ** 2 + 3 * n - 3)), abs=1e-5)


@pytest.mark.parametrize("n, expected", [(2, 0.239545), (4, 0.594438), (8, 1.062879)])
def test_regularizer_reference_values(n, expected):
    # docs/methods.md §0: 2-view NT-Xent, t = 0.5, identical positives, orthogonal negatives.
    values, grads = {}, {}
    for detach_keys in (False, True):
        z_adv, z2 = torch.eye(n).requires_grad_(True), torch.eye(n).requires_grad_(True)
        value = rocl_regularizer(z_adv, z2, 0.5, detach_keys=detach_keys)
        assert value.item() == pytest.approx(expected, abs=1e-5)
        assert value.item() == pytest.approx(-math.log(math.e ** 2 / (math.e ** 2 + 2 * n - 2)), abs=1e-5)
        values[detach_keys], grads[detach_keys] = value.detach(), torch.autograd.grad(value, [z_adv, z2])
    assert torch.equal(values[True], values[False])  # detaching the keys changes only the gradient
    for gd, ge in zip(grads[True], grads[False]):
        assert gd.abs().max() > 1e-3  # symmetric input: the key side equals the query side, so half
        torch.testing.assert_close(ge, 2 * gd, rtol=1e-5, atol=1e-7)


def _grads(views, detach_keys):
    leaves = [v.clone().requires_grad_(True) for v in views]
    loss = rocl_loss(*leaves, 0.5, detach_keys=detach_keys)
    return loss.detach(), torch.autograd.grad(loss, leaves)


def test_detached_keys_halve_the_gradient_of_a_symmetric_input():
    # Every anchor sees the same similarity pattern, so dL/dS is symmetric and the key side of
    # the exact gradient equals the query side: the official z @ z.T.detach() gives exactly half.
    z = torch.eye(4) * 3.0 + 0.1
    loss_d, g_detached = _grads([z, z, z], True)
    loss_e, g_exact = _grads([z, z, z], False)
    assert torch.equal(loss_d, loss_e)  # same values, different gradients
    for gd, ge in zip(g_detached, g_exact):
        assert gd.abs().max() > 1e-3
        torch.testing.assert_close(ge, 2 * gd, rtol=1e-5, atol=1e-7)
    # on a generic input the two are not proportional
    views = list(torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0)))
    _, g_detached = _grads(views, True)
    _, g_exact = _grads(views, False)
    assert not torch.allclose(g_exact[0], 2 * g_detached[0], rtol=1e-3)


def test_the_method_uses_the_configured_similarity():
    t1, t2 = images(seed=1), images(seed=2)
    grads = {}
    for detach in (True, False):
        method = make(detach_keys=detach, attack_steps=0)
        method.train_mode()
        torch.manual_seed(0)
        loss = method.step(t1, t2)["loss"]
        grads[detach] = torch.autograd.grad(loss, method.model.projector[2].weight)[0]
    assert not torch.allclose(grads[True], grads[False])


def test_model_shapes_and_export():
    method = make()
    model = method.model
    assert isinstance(model.encoder, ResNet18) and model.encoder.normalize.kind == "none"
    linears = [m for m in model.projector if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(8 * WIDTH, 2048), (2048, 128)]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.projector.modules())
    exported = method.export_encoder()
    assert exported.branches == ("normal",) and exported is not model.encoder


def test_attack_stays_in_the_ball_runs_in_eval_mode_and_keeps_bn_statistics():
    method = make(attack_steps=3)
    model = method.model
    model.train()
    model.projector[0].eval()  # a mixed state must come back exactly as it was
    before_modes = {name: m.training for name, m in model.named_modules()}
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
             for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.Linear))]
    before = bn_state(model)
    t1, t2 = images(seed=1), images(seed=2)
    x_adv = method.attack(t1, t2)
    for h in hooks:
        h.remove()
    assert seen and not any(seen)  # encoder BN and projector linears all ran in eval mode
    after = bn_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {name: m.training for name, m in model.named_modules()} == before_modes
    eps = method.cfg.eps
    assert (x_adv - t1).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - t1).abs().max() > eps / 2  # it moved


def test_attack_increases_the_attack_loss():
    method = make(attack_steps=5)
    model = method.model
    t1, t2 = images(seed=1), images(seed=2)
    torch.manual_seed(0)
    x_adv = method.attack(t1, t2)
    with eval_mode(model), torch.no_grad():
        z2 = model(t2)
        clean = rocl_regularizer(model(t1), z2).item()
        adv = rocl_regularizer(model(x_adv), z2).item()
    assert adv > clean


def test_one_step_is_finite_and_moves_the_weights():
    method = make()
    optimizer = build_optimizer(method.trainable_parameters(), method.cfg)
    before = {k: v.clone() for k, v in method.model.state_dict().items()}
    method.train_mode()
    out = method.training_step(images(), None, None, None)
    assert set(out) == {"loss", "cl_loss", "reg_loss"}
    assert torch.isfinite(out["loss"])
    assert out["loss"].item() == pytest.approx(out["cl_loss"].item() + out["reg_loss"].item() / 256, rel=1e-6)
    optimizer.zero_grad()
    out["loss"].backward()
    optimizer.step()
    changed = [k for k, v in method.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("encoder.") and k.endswith("weight") for k in changed)
    assert any(k.startswith("projector.") for k in changed)


def test_loss_falls_on_a_fixed_batch():
    method = make(lr=1.5)
    optimizer = build_optimizer(method.trainable_parameters(), method.cfg)
    x = images()
    method.train_mode()
    losses = []
    for _ in range(30):
        torch.manual_seed(0)
        out = method.training_step(x, None, None, None)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) < sum(losses[:5]), losses


def test_schedule_is_stepped_at_the_start_of_each_epoch_as_the_official_loop():
    """rocl_train.py calls scheduler_warmup.step() first thing in train(epoch), after the schedulers'
    constructors already made their initial step: epoch e of the warm-up trains at
    0.1 (1 + 14 (e + 1) / 10); from epoch 10 the cosine (T_max = epochs) starts at the 15x peak."""
    lr = lambda e: gradual_warmup_cosine_lr(0.1, 15.0, 10, 1000, e)  # noqa: E731
    assert lr(0) == pytest.approx(0.24)
    assert lr(4) == pytest.approx(0.1 * (1 + 1.4 * 5))
    assert lr(9) == pytest.approx(1.5)
    assert lr(10) == pytest.approx(1.5)  # the cosine's first value: the peak again
    assert lr(11) == pytest.approx(1.5 * (1 + math.cos(math.pi / 1000)) / 2)
    assert lr(510) == pytest.approx(0.75)
    assert lr(999) == pytest.approx(1.5 * (1 + math.cos(math.pi * 989 / 1000)) / 2)
    # the tail against torch's own CosineAnnealingLR (recursive form), started from the peak
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.5)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
    for e in range(10, 40):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr(e), rel=1e-9)
        opt.step()  # (no gradients: a no-op that keeps torch's step-order check quiet)
        cosine.step()
    method = make(epochs=1000, warmup_epochs=10)
    assert method.lr_at(0, 0, 50) == method.lr_at(0, 49, 50) == pytest.approx(0.24)  # per epoch
    assert method.lr_at(9, 3, 50) == method.lr_at(10, 3, 50) == pytest.approx(1.5)
    assert make(warmup_epochs=0, epochs=3).lr_at(0, 0, 1) == pytest.approx(1.5)


def test_views_follow_the_official_order_and_lars_keeps_the_lr_outside_the_buffer():
    from bench.augment import ROCL_VIEW

    assert ROCL_VIEW.order == ("jitter", "grayscale", "flip", "crop") and ROCL_VIEW.crop_scale == (0.08, 1.0)
    assert RoCL.Config().lars_lr_in_buffer is False and not build_optimizer(make().model.parameters(),
                                                                              make().cfg).lr_in_buffer
    assert RoCL.drop_last is False
