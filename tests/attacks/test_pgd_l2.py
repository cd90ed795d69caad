"""The L2 threat model: PGD-L2 stays in the ball, L-inf is unchanged, RA(L2, eps) falls with eps,
AutoAttack runs with norm="L2" through pyautoattack, and the norm reaches the protocol dicts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.attacks import ce_objective, pgd
from bench.attacks.pgd import l2_norms, perturbation_size
from bench.attacks.threat import STANDARD_ALPHA, STANDARD_EPS, sweep_points, threat_of
from bench.config import EvalConfig, from_dict
from bench.datasets import batches, load
from bench.datasets.synthetic import Synthetic
from bench.errors import BenchError
from bench.attacks.accuracy import Watch, pgd_correct, tensor_batches
from bench.evaluation import evaluate_classifier
from bench.models import Classifier, ResNet18, bn_state


@pytest.fixture(scope="module")
def data():
    cfg = Synthetic.Config(n_train=512, n_test=128, num_classes=4, image_size=16)
    return load("synthetic", "train", cfg=cfg, val_size=0), load("synthetic", "test", cfg=cfg)


@pytest.fixture(scope="module")
def trained(data):
    """A tiny ResNet-18 trained with plain CE on the synthetic data (clean accuracy well above chance)."""
    train, _ = data
    torch.manual_seed(0)
    model = Classifier(ResNet18(width=4), 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        for x, y, _ in batches(train, 64, shuffle=True, generator=generator):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.mark.parametrize("random_start", ["uniform", "normal", None])
@pytest.mark.parametrize("eps", [0.05, 0.5, 2.0])
def test_pgd_l2_perturbations_stay_in_the_l2_ball_and_the_unit_cube(trained, random_start, eps):
    x = torch.rand(12, 3, 16, 16)
    x[:3] = 0.0  # on a face of the cube the [0,1] clamp matters
    y = torch.randint(0, 4, (12,))
    g = torch.Generator().manual_seed(1)
    adv = pgd(ce_objective(trained, y), x, eps=eps, alpha=eps / 4, steps=5, random_start=random_start,
              generator=g, freeze=trained, norm="L2")
    norms = l2_norms(adv - x)
    assert norms.shape == (12,)
    assert bool((norms <= eps * (1 + 1e-6)).all()), norms.max()
    assert adv.min() >= 0 and adv.max() <= 1
    assert float(norms.max()) > 0.5 * eps  # it did move (5 steps of eps/4 from the start)
    assert perturbation_size(adv, x, "L2") == pytest.approx(float(norms.max()), rel=1e-6)


def test_pgd_l2_start_is_inside_the_ball_and_seeded():
    x = torch.full((64, 3, 8, 8), 0.5)
    starts = [pgd(lambda a: a[0].sum(), x, eps=0.3, alpha=0.1, steps=0, generator=torch.Generator().manual_seed(3),
                  norm="L2") for _ in range(2)]
    assert torch.equal(starts[0], starts[1])
    norms = l2_norms(starts[0] - x)
    assert bool((norms <= 0.3 * (1 + 1e-6)).all()) and float(norms.min()) > 0.25  # uniform in a 192-d ball


def test_pgd_l2_step_is_the_normalized_gradient():
    """One step from no start on a linear objective: x + alpha * w / ||w||, per sample."""
    x = torch.full((2, 3, 4, 4), 0.5)
    w = torch.randn(2, 3, 4, 4)
    adv = pgd(lambda a: (a[0] * w).sum(), x, eps=10.0, alpha=0.01, steps=1, random_start=None, norm="L2")
    expected = x + 0.01 * w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(adv, expected.clamp(0, 1), atol=1e-7)


def test_linf_is_still_the_default_and_unchanged(trained):
    """norm="Linf" (and no norm) computes exactly the pre-L2 formula, bit for bit."""
    x = torch.rand(8, 3, 16, 16)
    y = torch.randint(0, 4, (8,))
    eps, alpha = 8 / 255, 2 / 255
    ref = x + eps * (torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) * 2 - 1)
    ref = ref.clamp(0, 1)
    for _ in range(3):
        a = ref.detach().requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(trained(a), y, reduction="sum"), [a])
        ref = torch.min(torch.max(a.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    for kwargs in ({}, {"norm": "Linf"}):
        adv = pgd(ce_objective(trained, y), x, eps=eps, alpha=alpha, steps=3,
                  generator=torch.Generator().manual_seed(5), freeze=trained, **kwargs)
        assert torch.equal(adv, ref)


def test_unknown_norm_is_refused():
    with pytest.raises(ValueError, match="norm"):
        pgd(lambda a: a[0].sum(), torch.rand(1, 3, 4, 4), eps=0.1, alpha=0.1, steps=1, norm="L1")
    with pytest.raises(BenchError, match="eval.norm"):
        from_dict(EvalConfig, {"norm": "Linfinity"}, "eval")


def test_threat_of_picks_the_norms_standard_values():
    assert threat_of(EvalConfig()) == threat_of(EvalConfig(norm="Linf"))
    assert (threat_of(EvalConfig()).eps, threat_of(EvalConfig()).alpha) == (8 / 255, 2 / 255)
    l2 = threat_of(from_dict(EvalConfig, {"norm": "L2"}, "eval"))
    assert (l2.norm, l2.eps, l2.alpha) == ("L2", STANDARD_EPS["L2"], STANDARD_ALPHA["L2"]) == ("L2", 0.5, 0.125)
    assert sweep_points(EvalConfig()) == [(e / 255, (2 / 255) / (8 / 255) * e / 255) for e in (2, 4, 6, 8, 10, 12, 16)]
    assert [e for e, _ in sweep_points(EvalConfig(norm="L2"))] == [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 1.0]


def test_ra_l2_decreases_with_eps_and_bn_is_untouched(trained, data):
    _, test = data
    x, y = test.images(slice(0, 96)), test.y[:96]
    before = bn_state(trained)
    watch = Watch()
    ra = [float(pgd_correct(trained, tensor_batches(x, y, 48), eps=e, alpha=e / 4, steps=10, seed=0, watch=watch,
                            norm="L2").float().mean()) for e in (0.0, 0.25, 0.5, 1.0, 2.0)]
    clean = float((trained(x).argmax(1) == y).float().mean())
    assert ra[0] == pytest.approx(clean)
    assert all(a >= b for a, b in zip(ra, ra[1:])), ra
    assert ra[-1] < ra[0] - 0.2, ra  # a large L2 ball breaks a plain CE model
    assert watch.violations == [] and watch.train_forwards == 0
    assert all(torch.equal(before[k], v) for k, v in bn_state(trained).items())


def test_evaluate_classifier_under_l2_records_the_norm(trained, data):
    _, test = data
    cfg = from_dict(EvalConfig, {"norm": "L2", "n": 32, "aa_n": 0, "sweep_n": 16, "batch_size": 16, "steps": 3,
                                 "sweep_steps": [1, 3], "l2_sweep_eps": [0.25, 0.5, 1.0]}, "eval")
    result = evaluate_classifier(trained, test, cfg, seed=0)
    ra = result.metrics.ra.protocol
    assert (ra["norm"], ra["eps"], ra["alpha"]) == ("L2", 0.5, 0.125)
    eps_axis = result.metrics.sweeps["eps"]
    assert [m.protocol["eps"] for m in eps_axis] == [0.25, 0.5, 1.0]
    assert all(m.protocol["norm"] == "L2" for m in eps_axis + result.metrics.sweeps["steps"])
    assert [m.value for m in eps_axis] == sorted((m.value for m in eps_axis), reverse=True)
    assert not [w for w in result.warnings if "exceeds" in w]
    # the default stays L-inf, with its historical protocol
    linf = evaluate_classifier(trained, test, from_dict(EvalConfig, {"n": 16, "aa_n": 0, "sweep_n": 0,
                                                                     "batch_size": 16, "steps": 2}, "eval"), seed=0)
    assert (linf.metrics.ra.protocol["norm"], linf.metrics.ra.protocol["eps"]) == ("Linf", 8 / 255)


def test_autoattack_l2_runs_through_pyautoattack(trained, data):
    """Standard AutoAttack with norm="L2" (reduced budget): pyautoattack's own L2 attacks, per-sample
    L2 perturbations within eps, robust <= clean, and the norm in the protocol."""
    from bench.attacks.autoattack import build_autoattack

    aa, _, _ = build_autoattack(trained, eps=0.5, num_classes=4, seed=0, norm="L2")
    assert aa.norm == "L2" and aa.apgd.norm == "L2" and aa.fab.norm == "L2" and aa.square.norm == "L2"
    _, test = data
    cfg = from_dict(EvalConfig, {"norm": "L2", "n": 16, "aa_n": 16, "sweep_n": 0, "batch_size": 16, "steps": 2,
                                 "aa_budget": 0.02}, "eval")
    result = evaluate_classifier(trained, test, cfg, seed=0)
    aa_result = result.aa_result
    assert result.metrics.aa.protocol["norm"] == "L2" and result.metrics.aa.protocol["eps"] == 0.5
    assert aa_result.max_perturbation <= 0.5 + 1e-5
    assert aa_result.correct <= int(aa_result.clean.sum())
    assert not [w for w in result.warnings if "exceeds" in w]
