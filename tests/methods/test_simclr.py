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
