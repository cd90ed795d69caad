"""Adversarial loss landscape (bench.analysis.landscape): filter normalisation per filter, the loss at
the origin against the classifier's adversarial loss computed directly, BN statistics and weights."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from bench.analysis.landscape import (LandscapeConfig, adversarial_loss, directions, filter_normalized_direction,
                                      loss_landscape, perturbed_weights)
from bench.attacks.pgd import attack_classifier
from bench.models import bn_state
from bench.models.resnet import Classifier, ResNet18

ATTACK = {"eps_255": 8.0, "alpha_255": 2.0, "steps": 2}


@pytest.fixture
def classifier():
    torch.manual_seed(0)
    model = Classifier(ResNet18(width=4), 3)
    model.train()
    with torch.no_grad():  # BatchNorm statistics that are not the defaults
        for _ in range(3):
            model(torch.rand(8, 3, 16, 16))
    return model


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(2)
    return torch.rand(12, 3, 16, 16, generator=g), torch.randint(0, 3, (12,), generator=g)


def test_directions_are_filter_normalised_per_filter(classifier):
    d = filter_normalized_direction(classifier, torch.Generator().manual_seed(0))
    names = [n for n, _ in classifier.named_parameters()]
    params = list(classifier.parameters())
    assert len(d) == len(params)
    checked = 0
    for name, p, dp in zip(names, params, d):
        assert dp.shape == p.shape
        if p.dim() <= 1:  # biases and BatchNorm weights/biases: left at zero
            assert torch.count_nonzero(dp) == 0, name
            continue
        for k in range(p.shape[0]):  # every filter: a conv output channel, a row of the linear head
            assert float(dp[k].norm()) == pytest.approx(float(p[k].detach().norm()), rel=1e-5, abs=1e-7), (name, k)
            checked += 1
        assert not torch.allclose(dp, p)  # random, not the weights themselves
    assert "head.weight" in names and checked > 3 + 4  # the head's 3 rows and the convs' filters


def test_directions_are_seeded(classifier):
    a1, a2 = directions(classifier, 0)
    b1, _ = directions(classifier, 0)
    c1, _ = directions(classifier, 1)
    assert all(torch.equal(x, y) for x, y in zip(a1, b1))
    assert not all(torch.equal(x, y) for x, y in zip(a1, c1))
    assert not all(torch.equal(x, y) for x, y in zip(a1, a2))


def test_perturbed_weights_move_and_are_restored_bit_for_bit(classifier):
    state = {k: v.clone() for k, v in classifier.state_dict().items()}
    d1, d2 = directions(classifier, 0)
    with perturbed_weights(classifier) as move:
        move((0.5, -0.25), (d1, d2))
        w = classifier.encoder.conv1.weight
        expected = state["encoder.conv1.weight"] + 0.5 * d1[0] - 0.25 * d2[0]
        assert torch.allclose(w, expected, atol=1e-6)
        move((0.0, 0.0), (d1, d2))
        assert torch.equal(w, state["encoder.conv1.weight"])
    assert all(torch.equal(state[k], v) for k, v in classifier.state_dict().items())


def test_origin_is_the_classifiers_adversarial_loss_and_nothing_changes(classifier, data):
    x, y = data
    classifier.train()
    state = {k: v.clone() for k, v in classifier.state_dict().items()}
    bn = bn_state(classifier)
    out = loss_landscape(classifier, x, y, n=12, span=1.0, points_1d=3, points_2d=3, seed=4, batch_size=12, **ATTACK)
    # directly: PGD against the classifier itself (same seed, eval mode), then the mean CE
    classifier.eval()
    x_adv = attack_classifier(classifier, x, y, eps=8 / 255, alpha=2 / 255, steps=2, seed=4)
    with torch.no_grad():
        direct = float(F.cross_entropy(classifier(x_adv), y))
        direct_acc = float((classifier(x_adv).argmax(1) == y).float().mean())
    classifier.train()
    assert out.alphas == [-1.0, 0.0, 1.0] and out.surface_alphas == out.surface_betas == [-1.0, 0.0, 1.0]
    assert out.loss[1] == pytest.approx(direct, rel=1e-6)
    assert out.surface_loss[1][1] == pytest.approx(direct, rel=1e-6)
    assert out.accuracy[1] == pytest.approx(direct_acc)
    assert adversarial_loss(classifier.eval(), x, y, eps=8 / 255, alpha=2 / 255, steps=2, seed=4,
                            batch_size=12)[0] == pytest.approx(direct, rel=1e-6)
    classifier.train()
    # the 1-D curve is the surface's beta = 0 row; moving the weights changes the loss
    assert out.loss == out.surface_loss[1]
    assert out.loss[0] != pytest.approx(direct) and out.surface_loss[0][1] != pytest.approx(direct)
    # weights restored, BN statistics and modes untouched
    assert all(torch.equal(state[k], v) for k, v in classifier.state_dict().items())
    assert all(torch.equal(bn[k], v) for k, v in bn_state(classifier).items())
    assert classifier.training and all(m.training for m in classifier.modules())
    assert all(p.requires_grad for p in classifier.parameters())


def test_batches_and_record(classifier, data):
    x, y = data
    one = loss_landscape(classifier, x, y, n=12, points_1d=2, points_2d=0, batch_size=12, **ATTACK)
    record = json.loads(json.dumps(one.to_record()))
    assert record["surface"] is None and record["alphas"] == [-1.0, 1.0] and len(record["loss"]) == 2
    assert record["settings"]["steps"] == 2 and record["settings"]["n"] == 12 and record["n_images"] == 12
    # n caps the images; batch size changes the random starts' draws but not the model's point
    two = loss_landscape(classifier, x, y, n=5, points_1d=1, points_2d=2, batch_size=2, **ATTACK)
    assert two.alphas == [0.0] and len(two.surface_loss) == 2 and len(two.surface_loss[0]) == 2
    assert two.n_images == 5 and loss_landscape(classifier, x, y, n=50, points_1d=1, points_2d=0,
                                                **ATTACK).n_images == 12  # the split is smaller than n
    assert LandscapeConfig().span == 1.0
