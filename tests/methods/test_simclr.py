import math

import pytest
import torch
from torch import nn

import methods.simclr as simclr
from bench.augment import SIMCLR_VIEW
from bench.config import EncoderConfig
from bench.method import MethodContext
from bench.models import ResNet18
from bench.registry import METHODS


def make(width=4, **cfg):
    torch.manual_seed(0)
    ctx = MethodContext(EncoderConfig(width=width), 10, torch.device("cpu"), {})
    return simclr.SimCLR(simclr.SimCLR.Config(**cfg), ctx)


@pytest.mark.parametrize("n, expected", [(2, 0.239545), (4, 0.594438), (8, 1.062879)])
def test_nt_xent_reference_values(n, expected):
    z = torch.eye(n)  # identical positives, orthogonal negatives
    assert simclr.simclr_loss(z, z.clone(), 0.5).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(-math.log(math.e ** 2 / (math.e ** 2 + 2 * n - 2)), abs=1e-6)


def test_registered_with_paper_defaults():
    assert METHODS.get("simclr") is simclr.SimCLR
    c = simclr.SimCLR.Config()
    assert (c.lr, c.momentum, c.weight_decay, c.batch_size, c.epochs) == (0.5, 0.9, 1e-4, 512, 1000)
    assert (c.warmup_epochs, c.warmup_from, c.min_lr, c.temperature, c.optimizer) == (10, 0.01, 5e-4, 0.5, "sgd")
    assert not simclr.SimCLR.uses_labels and simclr.SimCLR.dependencies(None) == {}


def test_model_single_bn_no_normalization_and_projection_head():
    method = make(width=64)
    enc = method.model.encoder
    assert isinstance(enc, ResNet18) and enc.branches == ("normal",) and enc.normalize.kind == "none"
    head = method.model.head
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[3].out_features) == (512, 512, 128)
    assert method.model(torch.rand(2, 3, 32, 32)).shape == (2, 128)


def test_schedule_is_advcls_warmup_then_per_epoch_cosine():
    c = simclr.SimCLR.Config()
    lr = lambda e, s=0, steps=100: simclr.supcon_lr(c, e, s, steps)  # noqa: E731
    official = lambda e: 5e-4 + (0.5 - 5e-4) * (1 + math.cos(math.pi * (e + 1) / 1000)) / 2  # noqa: E731
    assert lr(0) == pytest.approx(0.01)
    assert lr(5) == pytest.approx(0.01 + 0.5 * (official(9) - 0.01))  # linear, per iteration
    assert lr(9, 99) < official(9) and lr(9, 99) > lr(9, 50)
    for e in (10, 500, 999):
        assert lr(e) == lr(e, 99) == pytest.approx(official(e))  # constant within an epoch
    assert lr(999) == pytest.approx(5e-4)


def test_training_step_uses_two_independent_advcl_views(monkeypatch):
    method = make()
    seen = []
    real = simclr.make_view

    def spy(x, recipe, generator=None):
        out = real(x, recipe, generator)
        seen.append((recipe, out))
        return out

    monkeypatch.setattr(simclr, "make_view", spy)
    x = torch.rand(8, 3, 32, 32)
    out = method.training_step(x, torch.zeros(8, dtype=torch.long), torch.arange(8), None)
    assert [r for r, _ in seen] == [SIMCLR_VIEW, SIMCLR_VIEW]
    assert not torch.equal(seen[0][1], seen[1][1])
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])


# ---------------------------------------------------------------- recipe = solo (deacl.md §1)


def make_solo(width=4, **overrides):
    from bench.config import from_dict

    torch.manual_seed(0)
    cfg = from_dict(simclr.SimCLR.Config, {**simclr.SOLO_RECIPE, **overrides}, "simclr")
    return simclr.SimCLR(cfg, MethodContext(EncoderConfig(width=width), 10, torch.device("cpu"), {}))


def test_solo_recipe_settings_model_and_architecture():
    assert simclr.SimCLR.Config().recipe == "advcl"  # the default recipe is unchanged
    method = make_solo(width=64)
    c = method.cfg
    assert (c.lr, c.weight_decay, c.temperature, c.batch_size, c.epochs, c.optimizer, c.trust_coef) == \
        (0.4, 1e-5, 0.2, 256, 1000, "solo_lars", 0.02)
    assert (c.warmup_epochs, c.warmup_from, c.min_lr) == (10, 0.003, 0.0)
    head = method.model.head
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[2].out_features) == (512, 2048, 256)
    enc = method.model.encoder
    assert enc.stem_padding == 2 and enc.normalize.kind == "cifar10" and method.normalize == "cifar10"
    assert simclr.SOLO_VIEW.crop_scale == (0.08, 1.0) and simclr.SOLO_VIEW.crop_interpolation == "bicubic"
    assert (simclr.SOLO_VIEW.jitter, simclr.SOLO_VIEW.jitter_p, simclr.SOLO_VIEW.grayscale_p) == \
        ((0.8, 0.8, 0.8, 0.2), 0.8, 0.2)
    from bench.train import build_optimizer
    from bench.train.optim import SoloLARS

    opt = build_optimizer(method.trainable_parameters(), c)
    assert isinstance(opt, SoloLARS) and opt.defaults["eta"] == 0.02 and opt.defaults["weight_decay"] == 1e-5


def test_solo_schedule_is_per_epoch_linear_warmup_cosine():
    method = make_solo()
    lr = lambda e, s=0: method.lr_at(e, s, 195)  # noqa: E731
    assert lr(0) == pytest.approx(0.003) and lr(9) == pytest.approx(0.4) == lr(10)
    assert lr(4) == pytest.approx(0.003 + 4 * (0.4 - 0.003) / 9) == lr(4, 150)
    assert lr(505) == pytest.approx(0.4 * (1 + math.cos(math.pi * 495 / 990)) / 2)
    assert lr(999) == pytest.approx(0.4 * (1 + math.cos(math.pi * 989 / 990)) / 2)


def test_solo_step_forwards_each_view_alone(monkeypatch):
    method = make_solo()
    seen, sizes = [], []
    real = simclr.make_view
    monkeypatch.setattr(simclr, "make_view", lambda x, recipe, generator=None: seen.append(recipe) or real(x, recipe))
    method.model.encoder.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))
    out = method.training_step(torch.rand(8, 3, 32, 32), None, None, None)
    assert seen == [simclr.SOLO_VIEW, simclr.SOLO_VIEW] and sizes == [8, 8]  # BatchNorm statistics per view
    assert torch.isfinite(out["loss"])


def test_solo_lars_by_hand():
    from bench.train.optim import SoloLARS

    w = torch.tensor([[3.0, 4.0]], requires_grad=True)        # |w| = 5
    bias = torch.tensor([1.0, -1.0], requires_grad=True)      # ndim 1: no scaling, no weight decay
    small = torch.tensor([[0.6, 0.8]], requires_grad=True)    # |w| = 1: local lr below lr, not clipped
    lr, wd, eta = 0.4, 1e-2, 0.02
    opt = SoloLARS([w, bias, small], lr=lr, momentum=0.9, weight_decay=wd, eta=eta)
    grads = {id(w): torch.tensor([[0.0, 0.01]]), id(bias): torch.tensor([0.5, 0.5]),
             id(small): torch.tensor([[10.0, 0.0]])}
    expected = {}
    for p in (w, bias, small):
        p.grad = grads[id(p)].clone()
        g = grads[id(p)]
        if p.ndim == 1:
            update = g
        else:
            local = eta * p.detach().norm() / (g.norm() + wd * p.detach().norm() + 1e-8)
            update = (g + wd * p.detach()) * min(float(local) / lr, 1.0)
        expected[id(p)] = (p.detach() - lr * update, update)
    assert eta * 5 / (0.01 + wd * 5) / lr > 1 > eta * 1 / (10 + wd) / lr  # w's local lr is clipped, small's is not
    opt.step()
    for p in (w, bias, small):
        assert torch.allclose(p.detach(), expected[id(p)][0], atol=1e-7)
    for p in (w, bias, small):  # momentum: buf = 0.9 buf + update
        p.grad = grads[id(p)].clone()
    before = {id(p): p.detach().clone() for p in (w, bias, small)}
    opt.step()
    g = grads[id(bias)]
    assert torch.allclose(bias.detach(), before[id(bias)] - lr * (0.9 * g + g), atol=1e-7)


def test_last_partial_batch_as_each_official_loader():
    from bench.train.loop import drops_last, epoch_steps

    # AdvCL's SimCLR (SupCon's loader) trains on 50,000 % 512 = 336 last images; solo-learn drops them
    assert epoch_steps(50_000, 512, make().drop_last) == 98
    assert epoch_steps(50_000, 256, make_solo().drop_last) == 195
    # `last_batch` overrides the official choice either way
    assert drops_last(make(last_batch="drop")) and not drops_last(make_solo(last_batch="keep"))
    assert not drops_last(make()) and drops_last(make_solo())
