import pytest
import torch
import torch.nn.functional as F

import methods.supervised_at as sat
from bench.augment import WEAK_VIEW
from bench.config import EncoderConfig
from bench.method import MethodContext
from bench.models import Classifier, ResNet18
from bench.train import lr_at

EPS = 8 / 255


def make(**cfg):
    torch.manual_seed(0)
    ctx = MethodContext(EncoderConfig(width=4), 10, torch.device("cpu"), {})
    return sat.SupervisedAT(sat.SupervisedAT.Config(**cfg), ctx)


def batch(n=8):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(10, (n,), generator=g), torch.arange(n)


def test_paper_defaults_and_labels():
    c = sat.SupervisedAT.Config()
    assert (c.lr, c.momentum, c.weight_decay, c.batch_size, c.epochs) == (0.1, 0.9, 2e-4, 128, 100)
    assert (c.schedule, c.decay_at, c.gamma) == ("step", (0.5, 0.75), 0.1)
    assert (c.eps, c.alpha, c.attack_steps) == (EPS, 2 / 255, 10)
    assert sat.SupervisedAT.uses_labels


def test_step_decay_at_half_and_three_quarters():
    c = sat.SupervisedAT.Config()
    assert [lr_at(c, e, 0, 10) for e in (0, 49, 50, 74, 75, 99)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_model_is_encoder_plus_linear_classifier_and_export_drops_it():
    method = make()
    assert isinstance(method.model, Classifier) and method.model.head.out_features == 10
    exported = method.export_encoder()
    assert isinstance(exported, ResNet18)
    assert not any(k.startswith("head") for k in exported.state_dict())


def test_attack_crafts_in_train_mode_inside_the_eps_ball(monkeypatch):
    method = make()
    record = {}
    real_pgd, real_view = sat.pgd, sat.make_view

    def spy_view(x, recipe, generator=None):
        record["recipe"] = recipe
        record["view"] = real_view(x, recipe, generator)
        return record["view"]

    def spy_pgd(objective, x, **kw):
        record["training"] = method.model.training
        record["kw"] = kw
        record["adv"] = real_pgd(objective, x, **kw)
        return record["adv"]

    monkeypatch.setattr(sat, "make_view", spy_view)
    monkeypatch.setattr(sat, "pgd", spy_pgd)
    method.train_mode()
    x, y, index = batch()
    out = method.training_step(x, y, index, None)
    assert record["recipe"] == WEAK_VIEW and record["training"]
    assert record["kw"]["steps"] == 10 and record["kw"]["eps"] == EPS and record["kw"]["alpha"] == 2 / 255
    adv, view = record["adv"], record["view"]
    assert (adv - view).abs().max() <= EPS + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert (adv - view).abs().max() > EPS / 2  # it moved
    assert torch.isfinite(out["loss"]) and 0 <= out["adv_accuracy"] <= 1
    # the outer loss is CE on the adversarial examples only (train mode: batch statistics)
    with torch.no_grad():
        on_adv, on_clean = (F.cross_entropy(method.model(v), y).item() for v in (adv, view))
    assert out["loss"].item() == pytest.approx(on_adv, rel=1e-5) and on_adv != pytest.approx(on_clean, rel=1e-3)


def test_attack_raises_the_loss():
    method = make()
    method.model.eval()  # fixed statistics so both losses see the same function
    x, y, _ = batch(16)
    torch.manual_seed(0)
    from bench.attacks import ce_objective

    adv = sat.pgd(ce_objective(method.model, y), x, eps=EPS, alpha=2 / 255, steps=5)
    with torch.no_grad():
        assert F.cross_entropy(method.model(adv), y) > F.cross_entropy(method.model(x), y)
