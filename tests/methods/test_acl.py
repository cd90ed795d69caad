import math

import pytest
import torch
from torch import nn

import methods.acl as acl
from bench.augment import ACL_VIEW
from bench.config import EncoderConfig
from bench.method import MethodContext
from bench.models import bn_state
from bench.models.norm import BranchedBatchNorm1d, BranchedBatchNorm2d
from bench.train import LARS, build_optimizer, lr_at

EPS = 8 / 255


def make(width=4, **cfg):
    torch.manual_seed(0)
    ctx = MethodContext(EncoderConfig(width=width), 10, torch.device("cpu"), {})
    return acl.ACL(acl.ACL.Config(**cfg), ctx)


def images(n=8, seed=1):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def record_bn_calls(model: nn.Module) -> list[tuple[str, bool, int]]:
    """(branch, training, batch size) for every BatchNorm call, backbone and head."""
    calls = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and ".bns." in name:
            branch = name.rsplit(".", 1)[1]
            module.register_forward_hook(lambda m, inp, out, b=branch: calls.append((b, m.training, inp[0].shape[0])))
    return calls


@pytest.mark.parametrize("n, expected", [(2, 0.239545), (4, 0.594438), (8, 1.062879)])
def test_loss_reference_values(n, expected):
    pair = torch.cat([torch.eye(n), torch.eye(n)])  # identical positives, orthogonal negatives
    out = acl.acl_loss(pair, pair.clone(), 0.5)
    assert out["loss"].item() == pytest.approx(expected, abs=1e-6)
    other = torch.randn(2 * n, 16, generator=torch.Generator().manual_seed(n))
    mixed = acl.acl_loss(pair, other)
    assert mixed["clean_loss"].item() == pytest.approx(expected, abs=1e-6)
    assert mixed["loss"] == pytest.approx((mixed["clean_loss"] + mixed["adv_loss"]) / 2)
    # cosine taken in the loss: the scale of the projections does not matter
    assert acl.acl_loss(3 * other, other)["loss"].item() == pytest.approx(mixed["adv_loss"].item(), abs=1e-5)


def test_paper_defaults():
    c = acl.ACL.Config()
    assert (c.optimizer, c.lr, c.momentum, c.weight_decay, c.trust_coef) == ("lars", 5.0, 0.9, 1e-6, 1e-3)
    assert (c.warmup_epochs, c.warmup_from, c.min_lr, c.schedule, c.batch_size, c.epochs) == (10, 0.0, 1e-6, "cosine", 512, 1000)
    assert (c.eps, c.alpha, c.attack_steps, c.temperature) == (EPS, 2 / 255, 5, 0.5)
    assert acl.ACL.encoder_branch == "pgd" and acl.ACL.branches == ("normal", "pgd")


def test_model_dual_bn_everywhere_imagenet_normalization_and_head():
    method = make(width=64)
    enc, head = method.model.encoder, method.model.head
    assert enc.normalize.kind == "imagenet" and enc.branches == ("normal", "pgd")
    assert sum(isinstance(m, BranchedBatchNorm2d) for m in enc.modules()) == 1 + 8 * 2 + 3
    assert [m.bias is not None for m in (head.fc1, head.fc2, head.fc3)] == [True, False, False]
    assert all(isinstance(bn, BranchedBatchNorm1d) and bn.branches == ("normal", "pgd")
               for bn in (head.bn1, head.bn2, head.bn3))
    assert (head.fc1.in_features, head.fc3.out_features) == (512, 512)
    out = method.model.eval()(images(2), "pgd")
    assert out.shape == (2, 512)
    assert not torch.allclose(out.norm(dim=1), torch.ones(2))  # no L2 normalization in the model


def test_attack_eval_mode_pgd_branch_bn_untouched_and_inside_the_ball():
    method = make()
    model = method.model.train()
    v1, v2 = images(8, 1), images(8, 2)
    calls = record_bn_calls(model)
    before = bn_state(model)
    torch.manual_seed(0)
    a1, a2 = acl.acl_attack(model, v1, v2, eps=EPS, alpha=2 / 255, steps=3)
    assert model.training  # restored
    assert all(torch.equal(before[k], v) for k, v in bn_state(model).items())
    assert calls and {(b, t, n) for b, t, n in calls} == {("pgd", False, 16)}  # both views in one eval forward
    for adv, clean in ((a1, v1), (a2, v2)):
        assert (adv - clean).abs().max() <= EPS + 1e-6 and adv.min() >= 0 and adv.max() <= 1
        assert (adv - clean).abs().max() > EPS / 2
    with torch.no_grad():
        model.eval()
        attacked = acl.pair_nt_xent(model(torch.cat([a1, a2]), "pgd"), 0.5)
        clean = acl.pair_nt_xent(model(torch.cat([v1, v2]), "pgd"), 0.5)
    assert attacked > clean


def test_training_step_routes_clean_views_to_normal_and_adversarial_to_pgd(monkeypatch):
    method = make(attack_steps=2)
    method.train_mode()
    recipes = []
    real = acl.make_view
    monkeypatch.setattr(acl, "make_view", lambda x, r, generator=None: recipes.append(r) or real(x, r, generator))
    calls = record_bn_calls(method.model)
    n_bn = sum(1 for name, m in method.model.named_modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))) // 2
    out = method.training_step(images(8), torch.zeros(8, dtype=torch.long), torch.arange(8), None)
    assert recipes == [ACL_VIEW, ACL_VIEW]
    assert calls.count(("pgd", False, 16)) == 2 * n_bn  # the attack's two steps
    assert calls.count(("normal", True, 16)) == n_bn    # clean pair, train mode
    assert calls.count(("pgd", True, 16)) == n_bn       # adversarial pair, train mode
    assert len(calls) == 4 * n_bn
    assert set(out) == {"loss", "clean_loss", "adv_loss"} and torch.isfinite(out["loss"])


def test_lars_first_step_relative_change_is_lr_times_trust():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(64, 64))
    w.grad = 1e3 * torch.randn(64, 64)  # a big gradient: weight decay is negligible beside it
    start = w.detach().clone()
    optimizer = build_optimizer([w], acl.ACL.Config())
    assert isinstance(optimizer, LARS)
    optimizer.step()
    assert ((w.detach() - start).norm() / start.norm()).item() == pytest.approx(0.005, rel=1e-4)


def test_lars_relative_change_does_not_depend_on_the_gradient_scale():
    for scale in (1e-2, 1.0, 1e4):
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(32))
        w.grad = scale * w.detach().clone()  # aligned with w: |g + wd w| = |g| + wd |w| exactly
        start = w.detach().clone()
        LARS([w], lr=5.0, momentum=0.9, weight_decay=1e-6, trust_coef=1e-3).step()
        assert ((w.detach() - start).norm() / start.norm()).item() == pytest.approx(0.005, rel=1e-5)


def test_warmup_then_per_iteration_cosine_to_1e_6():
    c = acl.ACL.Config()
    assert lr_at(c, 0, 0, 100) == 0.0
    assert lr_at(c, 5, 0, 100) == pytest.approx(2.5)
    assert lr_at(c, 10, 0, 100) == pytest.approx(5.0)
    assert lr_at(c, 500, 0, 100) > lr_at(c, 500, 50, 100) > lr_at(c, 501, 0, 100)  # per iteration
    assert lr_at(c, 999, 99, 100) == pytest.approx(1e-6, abs=1e-5)


def test_acl_trains_at_the_schedule_value_of_the_next_iteration():
    """The official LambdaLR is stepped before each iteration: global iteration i trains at lambda(i + 1)."""
    method = make()
    c, steps = method.cfg, 98  # 50,000 images at batch 512, the last batch kept

    def official(i: int) -> float:  # train_simCLR.py's cosine_annealing(i, total, 1, 1e-6 / lr, warmup) * lr
        total, warm = c.epochs * steps, 10 * steps
        if i < warm:
            return c.lr * i / warm
        return c.lr * (1e-6 / c.lr + (1 - 1e-6 / c.lr) * 0.5 * (1 + math.cos((i - warm) / (total - warm) * math.pi)))

    for epoch, step in [(0, 0), (0, 97), (9, 97), (10, 0), (500, 13), (999, 97)]:
        expected = official(epoch * steps + step + 1)
        assert method.lr_at(epoch, step, steps) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert method.lr_at(0, 0, steps) > 0  # the first step is not wasted at lr 0


def test_attack_random_start_is_not_clamped_as_in_the_official_pgd_contrastive():
    """acl_attack against the official PGD_contrastive written out, from the same uniform noise."""
    method = make()
    model = method.model
    x1, x2 = images(6, 1), images(6, 2)
    x1[:, :, :8] = 0.0  # pixels at the box edges, where clamping the start matters
    x2[:, :, :8] = 1.0
    steps, alpha = 2, 2 / 255
    torch.manual_seed(7)
    ours = acl.acl_attack(model, x1, x2, eps=EPS, alpha=alpha, steps=steps)
    torch.manual_seed(7)  # the same draws: U(-eps, eps) for view 1 then view 2
    deltas = [(torch.rand(x.shape) * 2 - 1) * EPS for x in (x1, x2)]  # official: no clamp of x + delta
    model.eval()
    for _ in range(steps):
        deltas = [d.detach().requires_grad_(True) for d in deltas]
        z = model(torch.cat([x1 + deltas[0], x2 + deltas[1]]), "pgd")
        grads = torch.autograd.grad(acl.pair_nt_xent(z, 0.5), deltas)
        deltas = [torch.clamp(d.detach() + alpha * g.sign(), -EPS, EPS) for d, g in zip(deltas, grads)]
        deltas = [torch.clamp(x + d, 0, 1) - x for x, d in zip((x1, x2), deltas)]
    model.train()
    for a, x, d in zip(ours, (x1, x2), deltas):
        assert torch.allclose(a, x + d, atol=1e-6)
    torch.manual_seed(7)
    starts = [acl.pgd(lambda advs: advs[0].sum(), [x1, x2], eps=EPS, alpha=alpha, steps=0, clamp_start=False)]
    assert float(starts[0][0].min()) < 0 and float(starts[0][1].max()) > 1  # the start leaves [0, 1]
    torch.manual_seed(7)
    with acl.eval_mode(model):  # the same attack with a clamped start
        clamped = acl.pgd(lambda advs: acl.pair_nt_xent(model(torch.cat(advs), "pgd"), 0.5), [x1, x2], eps=EPS,
                          alpha=alpha, steps=steps, clamp_start=True, freeze=model)
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ours, clamped))  # the test can tell
