"""DynACL (dynacl.md): schedules at the spec's epochs, EMA key encoder, swap forward, loss, presets, resume."""

import math

import pytest
import torch
from torch import nn

import methods.dynacl as dyn
from bench.config import EncoderConfig, from_dict
from bench.datasets import load
from bench.datasets.synthetic import Synthetic
from bench.method import MethodContext
from bench.models import bn_state
from bench.models.blob import encoder_from_blob
from bench.train import StepInfo, build_optimizer, fit

T, K, LAMBDA = 1000, 50, 2 / 3


def make(name="dynacl", width=4, **settings):
    cls = dyn.METHODS.get(name)
    torch.manual_seed(0)
    ctx = MethodContext(EncoderConfig(width=width), 10, torch.device("cpu"), {})
    return cls(from_dict(cls.Config, settings, name), ctx)


def images(n=8, seed=1):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("e, s", [(1, 1.0), (50, 1.0), (51, 0.95), (100, 0.95), (101, 0.90), (500, 0.55),
                                  (951, 0.05), (1000, 0.05)])
def test_strength_is_piecewise_constant_from_one_to_005(e, s):
    assert dyn.strength(e - 1, T, K) == pytest.approx(s, abs=1e-12)


@pytest.mark.parametrize("e, omega", [(1, 0.0), (49, 0.0), (50, 1 / 30), (99, 1 / 30), (100, 2 / 30),
                                      (950, 19 / 30), (999, 19 / 30), (1000, 2 / 3)])
def test_loss_weight_runs_one_epoch_ahead_of_the_strength(e, omega):
    assert dyn.loss_omega(e - 1, T, K, LAMBDA) == pytest.approx(omega, abs=1e-12)
    # the code's offset: omega(e) = lambda (1 - s(e + 1)) wherever e + 1 is an epoch
    if e < T:
        assert dyn.loss_omega(e - 1, T, K, LAMBDA) == pytest.approx(LAMBDA * (1 - dyn.strength(e, T, K)), abs=1e-12)


@pytest.mark.parametrize("e, omega", [(1, 0.0), (50, 0.0), (51, 1 / 30), (100, 1 / 30), (951, 19 / 30),
                                      (1000, 19 / 30)])
def test_synced_loss_weight_follows_the_strength(e, omega):
    assert dyn.loss_omega(e - 1, T, K, LAMBDA, sync=True) == pytest.approx(omega, abs=1e-12)


@pytest.mark.parametrize("e, lr", [(1, 0.5), (2, 1.0), (9, 4.5), (10, 5.0), (11, 5.0), (500, 2.548), (1000, 1.36e-5)])
def test_per_epoch_learning_rate(e, lr):
    got = dyn.epoch_lr(5.0, 1e-6, 10, T, e - 1)
    assert got == pytest.approx(lr, rel=1e-3)


def test_method_lr_is_per_epoch_for_pku_and_per_iteration_for_the_rewrites():
    pku = make()
    assert pku.lr_at(499, 0, 98) == pku.lr_at(499, 97, 98) == dyn.epoch_lr(5.0, 1e-6, 10, 1000, 499)
    air = make(impl="air")
    # ACL's per-iteration warm-up, one iteration ahead (scheduler.step() before the forward)
    assert air.lr_at(0, 0, 100) == pytest.approx(5.0 * 1 / 1000)
    assert air.lr_at(5, 49, 100) == pytest.approx(5.0 * 5.5 / 10)
    assert air.lr_at(500, 0, 100) > air.lr_at(500, 50, 100)


def test_views_at_the_weakest_strength():
    r = dyn.strength_view(0.05, "bilinear")
    assert r.crop_scale == pytest.approx((0.955, 1.0)) and r.crop_interpolation == "bilinear" and r.flip
    assert r.jitter == pytest.approx((0.02, 0.02, 0.02, 0.005)) and r.jitter_p == pytest.approx(0.04)
    assert r.grayscale_p == pytest.approx(0.01)
    full = dyn.strength_view(1.0, "bicubic")
    assert full.crop_scale == pytest.approx((0.1, 1.0)) and full.jitter == pytest.approx((0.4, 0.4, 0.4, 0.1))
    assert (full.jitter_p, full.grayscale_p) == pytest.approx((0.8, 0.2))


# ---------------------------------------------------------------- presets and defaults


def test_defaults_follow_the_released_code():
    c = dyn.DynACL.Config()
    assert (c.optimizer, c.lr, c.momentum, c.weight_decay, c.trust_coef, c.batch_size, c.epochs) == (
        "lars", 5.0, 0.9, 1e-6, 1e-3, 512, 1000)
    assert (c.warmup_epochs, c.min_lr, c.ema_momentum, c.reload_frequency, c.swap_param) == (10, 1e-6, 0.99, 50, LAMBDA)
    assert c.lars_lr_in_buffer is True and c.precision == "fp32" and c.clamp_start is False and c.attack_steps == 5
    assert dyn.DynACL.drop_last is False and dyn.DynACL.encoder_branch == "pgd"
    assert (c.air_lambda1, c.air_lambda2) == (0.0, 0.0)


@pytest.mark.parametrize("impl, expected", [
    ("pku", (True, "bilinear", False, True, "epoch")),
    ("air", (False, "bicubic", True, False, "iteration")),
    ("rcs", (False, "bicubic", True, True, "iteration")),
])
def test_impl_presets(impl, expected):
    sw = dyn.resolve_switches(from_dict(dyn.DynACL.Config, {"impl": impl}, "dynacl"))
    assert (sw.ema, sw.crop_interpolation, sw.weight_sync, sw.loss_halved, sw.lr_schedule) == expected


def test_each_switch_overrides_its_preset():
    cfg = from_dict(dyn.DynACL.Config, {"impl": "air", "ema": "true", "crop_interpolation": "bilinear",
                                        "loss_halved": "true"}, "dynacl")
    sw = dyn.resolve_switches(cfg)
    assert (sw.ema, sw.crop_interpolation, sw.weight_sync, sw.loss_halved, sw.lr_schedule) == (
        True, "bilinear", True, True, "iteration")
    with pytest.raises(Exception, match="ema"):
        from_dict(dyn.DynACL.Config, {"ema": "maybe"}, "dynacl")


# ---------------------------------------------------------------- the EMA key encoder


def test_key_encoder_is_a_frozen_copy_outside_the_optimizer():
    method = make()
    model = method.model
    assert isinstance(model, dyn.MomentumDualBNModel) and method.encoder is model.encoder
    assert all(not p.requires_grad for p in list(model.encoder.parameters()) + list(model.head.parameters()))
    assert all(p.requires_grad for p in model.online.parameters())
    for k, q in model.key_pairs():
        assert torch.equal(k, q) and k is not q
    optimizer = build_optimizer(method.trainable_parameters(), method.cfg)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.online.parameters()}


def test_ema_update_of_parameters_only():
    method = make()
    model = method.model
    with torch.no_grad():  # make q differ from k
        for p in model.online.parameters():
            p.add_(torch.randn_like(p))
    before_k = [k.clone() for k, _ in model.key_pairs()]
    q = [q.clone() for _, q in model.key_pairs()]
    stats = bn_state(model)
    model.update_key(0.99)
    for (k, q_now), k0, q0 in zip(model.key_pairs(), before_k, q):
        assert torch.equal(k, k0 * 0.99 + q0 * 0.01)
        assert torch.equal(q_now, q0)
    assert all(torch.equal(v, bn_state(model)[n]) for n, v in stats.items())  # running statistics not averaged
    ref = make()  # m = 0.99 by hand on one scalar: 0.99 * 1 + 0.01 * 3 = 1.02
    k0, q0 = ref.model.key_pairs()[0]
    with torch.no_grad():
        k0.fill_(1.0), q0.fill_(3.0)
    ref.model.update_key(0.99)
    assert torch.allclose(k0, torch.full_like(k0, 1.02))


def test_step_updates_the_key_with_the_pre_step_weights_then_the_optimizer_moves_q():
    method = make(attack_steps=1)
    model = method.model
    with torch.no_grad():
        for p in model.online.parameters():
            p.mul_(1.5)
    k0 = [k.clone() for k, _ in model.key_pairs()]
    q0 = [q.clone() for _, q in model.key_pairs()]
    optimizer = build_optimizer(method.trainable_parameters(), method.cfg)
    method.train_mode()
    out = method.training_step(images(8), torch.zeros(8, dtype=torch.long), torch.arange(8),
                               StepInfo(0, 0, 0, 1, 0.5))
    for (k, _), a, b in zip(model.key_pairs(), k0, q0):
        assert torch.equal(k, a * 0.99 + b * 0.01)
    optimizer.zero_grad()
    out["loss"].backward()
    assert all(k.grad is None for k, _ in model.key_pairs())  # no gradient reaches the key encoder
    optimizer.step()
    for (k, q), a, b in zip(model.key_pairs(), k0, q0):
        assert torch.equal(k, a * 0.99 + b * 0.01)
    assert any(not torch.equal(q, b) for (_, q), b in zip(model.key_pairs(), q0))


def record_bn_calls(model: nn.Module):
    calls = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and ".bns." in name:
            owner = "online" if name.startswith("online.") else "key"
            branch = name.rsplit(".", 1)[1]
            module.register_forward_hook(
                lambda m, inp, out, o=owner, b=branch: calls.append((o, b, m.training, inp[0].shape[0])))
    return calls


def test_swap_forward_view1_through_q_view2_through_k_b_rows_each():
    method = make(attack_steps=2)
    calls = record_bn_calls(method.model)
    method.train_mode()
    method.training_step(images(8), torch.zeros(8, dtype=torch.long), torch.arange(8), StepInfo(0, 0, 0, 1, 0.5))
    n_bn = sum(1 for name, _ in method.model.online.named_modules() if name.endswith(".bns.normal"))
    assert {n for *_, n in calls} == {8}  # each encoder sees B = 8 rows, never 2B
    for owner in ("online", "key"):
        assert calls.count((owner, "pgd", False, 8)) == 2 * n_bn  # the attack, both encoders, eval mode
        assert calls.count((owner, "pgd", True, 8)) == n_bn
        assert calls.count((owner, "normal", True, 8)) == n_bn
    x = images(4)
    method.model.eval()
    with torch.no_grad():
        out = method.model(torch.cat([x, x]), "pgd")
        assert torch.equal(out[:4], method.model.online(x, "pgd"))
        assert torch.equal(out[4:], method.model.key(x, "pgd"))


def test_without_ema_both_views_go_through_one_model_with_2b_rows():
    method = make(impl="air", attack_steps=1)
    assert isinstance(method.model, dyn.DualBNModel) and method.online is method.model
    calls = []
    for name, m in method.model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    method.train_mode()
    method.training_step(images(8), torch.zeros(8, dtype=torch.long), torch.arange(8), StepInfo(0, 0, 0, 1, 0.1))
    assert set(calls) == {16}


def test_loss_reference_with_the_schedule_weight():
    eye2 = torch.cat([torch.eye(2), torch.eye(2)])  # NAT = 0.239545 (docs/methods.md reference)
    same = torch.ones(4, 3)                          # ADV: every row identical -> ln 3
    nat, rob = 0.239545, math.log(3)
    omega = dyn.loss_omega(999, T, K, LAMBDA)        # epoch 1000: 2/3
    out = dyn.acl_family_loss(eye2, same, temperature=0.5, omega=omega, halved=True)
    assert out["loss"].item() == pytest.approx(((1 - 2 / 3) * nat + (1 + 2 / 3) * rob) / 2, abs=1e-5)
    out = dyn.acl_family_loss(eye2, same, temperature=0.5, omega=1 / 30, halved=False)  # the AIR rewrite
    assert out["loss"].item() == pytest.approx((29 / 30) * nat + (31 / 30) * rob, abs=1e-5)


def test_training_step_logs_strength_and_weight_of_its_epoch():
    method = make(epochs=100, reload_frequency=10, attack_steps=1)
    method.train_mode()
    out = method.training_step(images(8), torch.zeros(8, dtype=torch.long), torch.arange(8),
                               StepInfo(19, 0, 0, 1, 1.0))  # e = 20: s = 0.9, omega = (2/3) 2 * 0.1
    assert out["strength"].item() == pytest.approx(0.9)
    assert out["omega"].item() == pytest.approx(LAMBDA * 0.2)


# ---------------------------------------------------------------- export, artifacts, resume


def test_export_is_the_ema_copys_pgd_branch_and_the_dual_artifact_keeps_both():
    method = make()
    with torch.no_grad():
        for p in method.model.online.parameters():
            p.add_(0.1)  # q differs from k: the export must follow k
    exported = method.export_encoder()
    x = images(4)
    method.model.eval()
    with torch.no_grad():
        assert torch.allclose(exported(x), method.model.encoder(x, "pgd"), atol=1e-6)
        assert not torch.allclose(exported(x), method.model.online.encoder(x, "pgd"), atol=1e-4)
    blob = method.extra_artifacts()[dyn.DUAL_ENCODER_FILE]
    dual = encoder_from_blob(blob)
    assert dual.branches == ("normal", "pgd")
    with torch.no_grad():
        for branch in ("normal", "pgd"):
            assert torch.allclose(dual(x, branch), method.model.encoder(x, branch), atol=1e-6)


def test_killed_and_resumed_run_ends_with_the_same_weights_and_ema_state(tmp_path):
    data = load("synthetic", "train", cfg=Synthetic.Config(n_train=24, n_test=4), val_size=0)
    settings = dict(epochs=3, batch_size=8, steps_per_epoch=2, warmup_epochs=1, attack_steps=1, reload_frequency=1)

    def run(workdir, stop=None):
        workdir.mkdir(exist_ok=True)
        method = make(**settings)
        fit(method, data, seed=5, workdir=workdir, stop_after_epoch=stop)
        return method

    straight = run(tmp_path / "a")
    run(tmp_path / "b", stop=1)
    resumed = run(tmp_path / "b")
    state_a, state_b = straight.model.state_dict(), resumed.model.state_dict()
    assert any(k.startswith("encoder.") for k in state_a)  # the EMA copy is part of the checkpointed model
    assert not torch.equal(state_a["encoder.conv1.weight"], state_a["online.encoder.conv1.weight"])
    for key, value in state_a.items():
        assert torch.equal(value, state_b[key]), key


def test_dynacl_pp_declares_its_lpaft_stage_and_pretrains_as_dynacl():
    stages = dyn.DynACLPP.post_stages(dyn.DynACLPP.Config())
    assert [name for name, _ in stages] == ["lpaft"]
    params = stages[0][1]
    assert params == {"k": "10", "trades_init": "x"}  # the rest is the lpaft stage's own section
    from bench.stages.lpaft import LPAFT

    assert (LPAFT.Config().lp_epochs, LPAFT.Config().aft_epochs) == (10, 25)
    assert dyn.DynACLPP.pretrain_as == "dynacl"
    settings = dyn.DynACLPP.pretrain_settings(dyn.DynACLPP.Config())
    assert "lpaft_k" not in settings and settings["impl"] == "pku"
    with pytest.raises(Exception, match="lpaft k"):
        dyn.DynACLPP.post_stages(from_dict(dyn.DynACLPP.Config, {"lpaft_k": "ten"}, "dynacl_pp"))
