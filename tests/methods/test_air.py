"""AIR (air_rcs.md A): SIR/AIR against closed forms, the total, the step's originals, the variants' defaults."""

import math

import pytest
import torch
from torch import nn

import methods.acl as acl
import methods.air as air
from bench.config import EncoderConfig, from_dict
from bench.method import MethodContext
from methods.air_loss import acl_family_loss, invariance_terms

E2 = math.exp(2)  # a matched cosine of 1 at t = 0.5
Q1, Q2 = E2 / (E2 + 1), 1 / (E2 + 1)  # softmax over the batch of (2, 0)
NEG_ENTROPY_Q = Q1 * math.log(Q1) + Q2 * math.log(Q2)


def rows(*vectors):
    return torch.tensor(vectors, dtype=torch.float32)


def test_identical_embeddings_code_form_is_not_zero_textbook_is():
    z = rows([1, 0], [0, 1])  # a = b = o = a~ = b~: every matched cosine is 1
    sir, air_term = invariance_terms(z, z, z, z, z, 0.5, "code")
    # p = q = (1/2, 1/2): SIR = sum q (log q - p) = log(1/2) - 1/2; P = Q = (1/4, 1/4): AIR = log(1/4) / 2 - 1/8 * 2
    assert sir.item() == pytest.approx(math.log(0.5) - 0.5, abs=1e-6)
    assert air_term.item() == pytest.approx(0.5 * (math.log(0.25) - 0.25), abs=1e-6)
    sir, air_term = invariance_terms(z, z, z, z, z, 0.5, "textbook")
    assert sir.item() == pytest.approx(0.0, abs=1e-6) and air_term.item() == pytest.approx(0.0, abs=1e-6)


def test_asymmetric_case_against_closed_forms():
    o = rows([1, 0], [0, 1])
    a = rows([1, 0], [0, 1])     # a.o = (1, 1): p = (1/2, 1/2)
    b = rows([1, 0], [1, 0])     # b.o = (1, 0): q = softmax(2, 0)
    sir, air_term = invariance_terms(a, b, o, a, b, 0.5, "code")   # adversarial views = clean views
    # code: SIR = sum q log q - sum q p = -H(q) - 1/2; P = (1/4, 1/4), Q = q / 2
    assert sir.item() == pytest.approx(NEG_ENTROPY_Q - 0.5, abs=1e-6)
    assert air_term.item() == pytest.approx(0.5 * (NEG_ENTROPY_Q - math.log(2) - 0.25), abs=1e-6)
    sir, air_term = invariance_terms(a, b, o, a, b, 0.5, "textbook")
    # textbook: KL(q || uniform) for both (Q^ = q, P^ = uniform)
    assert sir.item() == pytest.approx(NEG_ENTROPY_Q + math.log(2), abs=1e-6)
    assert air_term.item() == pytest.approx(NEG_ENTROPY_Q + math.log(2), abs=1e-6)


def test_scale_of_the_embeddings_does_not_matter_and_kl_form_is_checked():
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(6, 5, generator=g) for _ in range(5)]
    ref = invariance_terms(*z)
    scaled = invariance_terms(*(3 * t for t in z))
    assert torch.allclose(torch.stack(ref), torch.stack(scaled), atol=1e-5)
    with pytest.raises(ValueError, match="kl"):
        invariance_terms(*z, kl="log")


def test_gradients_sir_ignores_adversarial_views_air_reaches_all_five():
    g = torch.Generator().manual_seed(1)
    z = [torch.randn(4, 3, generator=g).requires_grad_() for _ in range(5)]
    sir, air_term = invariance_terms(*z)
    grads = torch.autograd.grad(sir, z, allow_unused=True, retain_graph=True)
    assert grads[3] is None and grads[4] is None and all(g is not None for g in grads[:3])
    grads = torch.autograd.grad(air_term, z)
    assert all(g.abs().sum() > 0 for g in grads)


def test_total_combines_the_four_terms_with_kappa_and_omega():
    g = torch.Generator().manual_seed(2)
    clean, adv, orig = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g), torch.randn(4, 5, generator=g)
    base = acl_family_loss(clean, adv)  # ACL: (NAT + ADV) / 2
    assert base["loss"].item() == pytest.approx((base["clean_loss"] + base["adv_loss"]).item() / 2, abs=1e-6)
    assert set(base) == {"loss", "clean_loss", "adv_loss"}
    with_air = acl_family_loss(clean, adv, omega=0.2, halved=False, original=orig, lambda1=0.5, lambda2=0.25)
    c1, c2 = clean.chunk(2)
    a1, a2 = adv.chunk(2)
    sir, air_term = invariance_terms(c1, c2, orig, a1, a2)
    expected = 0.8 * base["clean_loss"] + 1.2 * base["adv_loss"] + 0.5 * sir + 0.25 * air_term
    assert with_air["loss"].item() == pytest.approx(expected.item(), abs=1e-5)
    assert with_air["sir"].item() == pytest.approx(sir.item()) and with_air["air"].item() == pytest.approx(
        air_term.item())
    halved = acl_family_loss(clean, adv, omega=0.2, halved=True, original=orig, lambda1=0.5, lambda2=0.25)
    assert halved["loss"].item() == pytest.approx(expected.item() / 2, abs=1e-5)
    only_sir = acl_family_loss(clean, adv, halved=False, original=orig, lambda1=1.0)
    assert only_sir["loss"].item() == pytest.approx((base["clean_loss"] + base["adv_loss"] + sir).item(), abs=1e-5)
    with pytest.raises(ValueError, match="originals"):
        acl_family_loss(clean, adv, lambda2=0.5)


def make(cls, **settings):
    torch.manual_seed(0)
    ctx = MethodContext(EncoderConfig(width=4), 10, torch.device("cpu"), {})
    return cls(from_dict(cls.Config, settings, cls.registered_name), ctx)


def images(n=8, seed=1):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_acl_air_forwards_the_originals_as_their_own_normal_batch():
    method = make(air.ACLAIR, attack_steps=1)
    calls = []
    for name, m in method.model.named_modules():
        if isinstance(m, nn.BatchNorm2d) and ".bns." in name:
            m.register_forward_hook(lambda mod, inp, out, b=name.rsplit(".", 1)[1]: calls.append(
                (b, mod.training, inp[0].shape[0])))
    method.train_mode()
    out = method.training_step(images(8), torch.zeros(8, dtype=torch.long), torch.arange(8), None)
    train_calls = [c for c in calls if c[1]]
    assert ("normal", True, 8) in train_calls and ("normal", True, 16) in train_calls  # originals: B rows alone
    assert {"sir", "air", "clean_loss", "adv_loss"} <= set(out)


def test_variants_defaults():
    c = air.ACLAIR.Config()
    assert (c.air_lambda1, c.air_lambda2, c.loss_halved, c.air_kl) == (0.5, 0.5, False, "code")
    assert (c.clamp_start, c.lars_lr_in_buffer, c.lr_step_first) == (False, True, True)
    assert air.ACLAIR.drop_last is False and air.ACLAIR.supports_rcs
    d = air.DynACLAIR.Config()
    assert (d.impl, d.air_lambda1, d.air_lambda2) == ("air", 0.5, 0.5)
    method = make(air.DynACLAIR)
    assert not method.switches.ema and not method.switches.loss_halved and method.switches.weight_sync
    pp = air.DynACLAIRPP
    assert pp.pretrain_as == "dynacl_air" and [s for s, _ in pp.post_stages(pp.Config())] == ["lpaft"]
    # acl itself: no AIR, halved, and the released ACL code's attack start, LARS and schedule
    a = acl.ACL.Config()
    assert (a.air_lambda1, a.air_lambda2, a.loss_halved, a.clamp_start, a.lars_lr_in_buffer, a.lr_step_first) == (
        0.0, 0.0, True, False, True, True)


def test_acl_air_step_is_first_iteration_of_the_schedule():
    method = make(air.ACLAIR)
    assert method.lr_at(0, 0, 100) == pytest.approx(5.0 * 1 / 1000)  # (i + 1) / L of a 10-epoch warm-up
    assert make(acl.ACL).lr_at(0, 0, 100) == pytest.approx(5.0 * 1 / 1000)  # ACL's own loop steps first too


def test_dynacl_air_on_the_pku_impl_sends_originals_through_the_online_encoder():
    method = make(air.DynACLAIR, impl="pku", attack_steps=1)
    seen = []
    method.model.online.encoder.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    method.train_mode()
    from bench.train import StepInfo

    out = method.training_step(images(8), torch.zeros(8, dtype=torch.long), torch.arange(8), StepInfo(0, 0, 0, 1, 0.5))
    assert seen.count(8) >= 3 and torch.isfinite(out["loss"]) and "air" in out  # attack, adv, clean, originals
