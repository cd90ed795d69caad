"""PGD invariants: eps ball and [0,1], BN statistics and mode untouched, seeding, per-input steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.attacks import attack_classifier, ce_objective, kl_objective, pgd
from bench.datasets import batches, load
from bench.datasets.synthetic import Synthetic
from bench.attacks.accuracy import Watch, clean_correct, image_batches, pgd_correct, tensor_batches
from bench.models import Classifier, ResNet18, bn_state
from bench.registry import ATTACKS

EPS, ALPHA = 8 / 255, 2 / 255


@pytest.fixture(scope="module")
def data():
    cfg = Synthetic.Config(n_train=512, n_test=128, num_classes=4, image_size=16)
    return load("synthetic", "train", cfg=cfg, val_size=0), load("synthetic", "test", cfg=cfg)


@pytest.fixture(scope="module")
def trained(data):
    """A tiny ResNet-18 trained with plain CE for a few epochs (clean accuracy ~ 100%)."""
    train, _ = data
    torch.manual_seed(0)
    model = Classifier(ResNet18(width=4), 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):  # 4 epochs land at 78-95% depending on the CPU's float rounding; 8 are safely above 80%
        for x, y, _ in batches(train, 64, shuffle=True, generator=generator):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def inputs(data, n=32):
    _, test = data
    return test.images(slice(0, n)), test.y[:n]


@pytest.mark.parametrize("random_start", ["uniform", "normal", None])
def test_pgd_stays_in_the_eps_ball_and_the_unit_cube(trained, random_start):
    x = torch.rand(16, 3, 16, 16)
    x[:4] = 0.0  # at the faces of the cube the projection onto [0,1] matters
    x[4:8] = 1.0
    y = torch.arange(16) % 4
    x_adv = pgd(ce_objective(trained, y), x, eps=EPS, alpha=ALPHA * 3, steps=5, random_start=random_start,
                generator=torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad


def test_unclamped_start_is_still_projected_after_the_first_step(trained):
    x = torch.zeros(4, 3, 16, 16)
    y = torch.arange(4)
    x_adv = pgd(ce_objective(trained, y), x, eps=EPS, alpha=ALPHA, steps=1, random_start="uniform", clamp_start=False)
    assert x_adv.min() >= 0 and (x_adv - x).abs().max() <= EPS + 1e-6


def test_attack_leaves_batchnorm_statistics_bit_identical_and_restores_the_mode(trained, data):
    x, y = inputs(data)
    before = bn_state(trained)
    trained.train()  # a model in train mode before the attack ...
    try:
        x_adv = attack_classifier(trained, x, y, eps=EPS, alpha=ALPHA, steps=3, seed=0)
        assert trained.training  # ... is in train mode after it
        after = bn_state(trained)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        watch = Watch()
        pgd_correct(trained, tensor_batches(x, y, 16), eps=EPS, alpha=ALPHA, steps=3, seed=0, watch=watch)
        assert trained.training and watch.train_forwards == 0 and not watch.bn_changed and watch.mode_restored
        assert all(torch.equal(before[k], v) for k, v in bn_state(trained).items())
    finally:
        trained.eval()
    assert (x_adv - x).abs().max() <= EPS + 1e-6


def test_attacks_take_input_gradients_only(trained, data):
    x, y = inputs(data)
    trained.zero_grad(set_to_none=True)
    attack_classifier(trained, x, y, eps=EPS, alpha=ALPHA, steps=2, seed=0)
    pgd_correct(trained, tensor_batches(x, y, 32), eps=EPS, alpha=ALPHA, steps=2, seed=0)
    assert all(p.grad is None for p in trained.parameters())
    assert all(p.requires_grad for p in trained.parameters())


def test_freeze_spares_weight_gradients_during_the_attack_and_restores_them(trained, data):
    x, y = inputs(data)
    seen = []

    def objective(advs):
        seen.append([p.requires_grad for p in trained.parameters()])
        return F.cross_entropy(trained(advs[0]), y, reduction="sum")

    torch.manual_seed(0)
    frozen = pgd(objective, x, eps=EPS, alpha=ALPHA, steps=2, freeze=trained)
    torch.manual_seed(0)
    plain = pgd(objective, x, eps=EPS, alpha=ALPHA, steps=2)
    assert len(seen) == 4 and not any(any(s) for s in seen[:2]) and all(all(s) for s in seen[2:])
    assert torch.equal(frozen, plain)  # the same attack, without the weight-gradient work
    assert all(p.requires_grad for p in trained.parameters())


def test_seeded_runs_are_identical_and_different_seeds_differ(trained, data):
    x, y = inputs(data)
    a = attack_classifier(trained, x, y, eps=EPS, alpha=ALPHA, steps=3, seed=0)
    b = attack_classifier(trained, x, y, eps=EPS, alpha=ALPHA, steps=3, seed=0)
    c = attack_classifier(trained, x, y, eps=EPS, alpha=ALPHA, steps=3, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    batches_ = tensor_batches(x, y, 8)
    f0 = pgd_correct(trained, batches_, eps=EPS, alpha=ALPHA, steps=3, seed=0)
    assert torch.equal(f0, pgd_correct(trained, batches_, eps=EPS, alpha=ALPHA, steps=3, seed=0))


def test_kl_attack_is_seeded_and_moves_the_prediction(trained, data):
    x, y = inputs(data)
    a = attack_classifier(trained, x, y, eps=EPS, alpha=ALPHA, steps=3, seed=0, objective="kl", random_start="normal")
    b = attack_classifier(trained, x, y, eps=EPS, alpha=ALPHA, steps=3, seed=0, objective="kl", random_start="normal")
    assert torch.equal(a, b) and (a - x).abs().max() <= EPS + 1e-6
    with torch.no_grad():
        kl = kl_objective(trained, trained(x))([a])
    assert kl > 0


def test_robust_accuracy_is_at_most_clean_accuracy_on_a_trained_model(trained, data):
    _, test = data
    sa = clean_correct(trained, image_batches(test, 64))
    ra = pgd_correct(trained, image_batches(test, 64), eps=EPS, alpha=ALPHA, steps=10, seed=0)
    assert sa.float().mean() > 0.8  # the model did learn
    assert ra.sum() <= sa.sum()
    assert ra.sum() < sa.sum()  # and PGD does find adversarial examples


def test_each_input_steps_along_its_own_gradient():
    torch.manual_seed(0)
    a, b = torch.full((2, 5), 0.5), torch.full((3, 5), 0.5)
    wa, wb = torch.randn(5), torch.randn(5)

    def objective(advs):
        return (advs[0] * wa).sum() + (advs[1] * wb).sum() ** 2  # (b . wb) > 0 at the start

    out_a, out_b = pgd(objective, [a, b], eps=0.1, alpha=0.01, steps=1, random_start=None)
    sign_b = torch.sign(wb * torch.sign((b * wb).sum()))
    assert torch.allclose(out_a - a, 0.01 * torch.sign(wa).expand_as(a))
    assert torch.allclose(out_b - b, 0.01 * sign_b.expand_as(b))
    many_a, many_b = pgd(objective, [a, b], eps=0.1, alpha=0.01, steps=50, random_start=None)
    assert torch.allclose(many_a - a, 0.1 * torch.sign(wa).expand_as(a))  # every coordinate at the eps face
    assert (many_b - b).abs().max() <= 0.1 + 1e-6


def test_registered_pgd_matches_the_evaluation_attack(trained, data):
    x, y = inputs(data)
    flags = ATTACKS.get("pgd")(trained, x, y, eps=EPS, alpha=ALPHA, steps=3, seed=0, batch_size=16)
    assert torch.equal(flags, pgd_correct(trained, tensor_batches(x, y, 16), eps=EPS, alpha=ALPHA, steps=3, seed=0))
