"""A-InfoNCE (ainfonce.md): every loss and variant against hand-computed references, the checks of
its section 12, the adaptive stop degree, the registered `ainfonce` and the options on advcl/rocl."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import methods.advcl as advcl
from bench.attacks import pgd
from bench.config import EncoderConfig, from_dict
from bench.datasets import load
from bench.datasets.synthetic import Synthetic
from bench.errors import BenchError
from bench.losses import weighted_multiview_nt_xent
from bench.method import MethodContext
from bench.models import bn_state
from bench.registry import METHODS
from bench.train import fit
from methods.advcl import ADV_BRANCH, CLEAN_BRANCH, VIEWS, AdvCL, advcl_contrastive, pseudo_label_ce
from methods.ainfonce import PRESETS, AInfoNCE
from methods.asymmetric_infonce import (AdaptiveStopDegree, advcl_ainfonce_loss, hard_negatives, ip_weights,
                                        plain_weights, rocl_ainfonce_loss)
from methods.rocl import RoCL, rocl_loss

C, T, B, M = 0.5 / 0.07, 0.5, 3, 4
WIDTH, BATCH, KS = 4, 8, (2, 3)


def settings(**kw):
    base = dict(ainfonce_variant="base", ainfonce_impl="code", ainfonce_adv_weight=1.0, ainfonce_stop_degree=0.2,
                ainfonce_tau_plus=0.1, ainfonce_beta=1.0, ainfonce_attack_loss="plain")
    return SimpleNamespace(**{**base, **kw})


def features(seed=0, m=M, b=B, d=6):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, d, generator=g).requires_grad_(True) for _ in range(m)]


# ---------------------------------------------------------------- hand references (ainfonce.md §2-§4)


class Terms:
    """Pair terms of rows [a, v1, v2, v3] (row = view * B + image), by hand from the spec's formulas."""

    def __init__(self, views, t=T, tau=0.1, beta=1.0):
        self.m, self.b = len(views), views[0].shape[0]
        self.z = F.normalize(torch.cat(views), dim=1)
        self.t, self.tau, self.beta = t, tau, beta
        self.n = self.m * self.b

    def row(self, v, i):
        return v * self.b + i

    def s(self, r, k, stopped=False):
        key = self.z[k].detach() if stopped else self.z[k]
        return self.z[r] @ key / self.t

    def plain(self, r, p, stopped=False):
        denom = sum(torch.exp(self.s(r, k, stopped)) for k in range(self.n) if k != r)
        return -(self.s(r, p, stopped) - torch.log(denom))

    def _row_hn(self, r, stopped):
        """(shifted exponentials of row r, pos_r, Ng_r) of the released AdvCL-side HN (A2a, A3)."""
        n, b = self.n, self.b
        s = torch.stack([self.s(r, k, stopped) for k in range(n)])
        e = torch.exp(s - s.max().detach())
        neg = torch.stack([e[k] if k % b != r % b else torch.tensor(0.0) for k in range(n)])
        pos = sum(e[k] for k in range(n) if k != r and k % b == r % b) / (self.m - 1)
        return e, neg, pos

    def hn_code(self, r, p, stopped=False):
        n, n_neg = self.n, self.n - self.m
        rows = {k: self._row_hn(k, stopped) for k in range(n)}
        imp = {k: (rows[k][1] + 1e-9) ** self.beta for k in range(n)}
        key_mean = {k: imp[k].mean() for k in range(n)}  # A2a: row k's mean over all columns

        def ng(q):
            e, neg, pos = rows[q]
            total = sum(imp[q][k] * neg[k] / key_mean[k] for k in range(n))
            return torch.clamp((total - self.tau * n_neg * pos) / (1 - self.tau), min=n_neg * math.exp(-2))

        e_r = rows[r][0]
        return -torch.log(e_r[p] / (rows[p][2] + ng(p)))  # A2b: the positive's row

    def hn_fixed(self, r, p):
        n, b = self.n, self.b
        e = torch.stack([torch.exp(self.s(r, k)) for k in range(n)])
        negs = [k for k in range(n) if k % b != r % b]
        pos = sum(e[k] for k in range(n) if k != r and k % b == r % b) / (self.m - 1)
        imp = torch.stack([e[k] ** self.beta for k in negs])
        total = (imp * e[negs]).sum() / imp.mean()
        ng = torch.clamp((total - self.tau * len(negs) * pos) / (1 - self.tau), min=len(negs) * math.exp(-1 / self.t))
        return -torch.log(e[p] / (pos + ng))


def sum_over_images(terms: Terms, fn):
    return sum(fn(i) for i in range(terms.b))


def clean_clean(terms, l):
    cl = range(1, terms.m)
    return lambda i: sum(l(terms.row(v, i), terms.row(u, i)) for v in cl for u in cl if u != v)


def plain_code_ref(terms, w, l):
    """C/(12B) sum_i [(w + w^2) sum_v l(a->v) + sum_{v != v'} l(v->v')] (A1)."""
    cc = clean_clean(terms, l)
    total = sum_over_images(terms, lambda i: (w + w * w) * sum(l(terms.row(0, i), terms.row(v, i))
                                                               for v in range(1, terms.m)) + cc(i))
    return C * total / (terms.m * (terms.m - 1) * terms.b)


def plain_fixed_ref(terms, w, l):
    cc = clean_clean(terms, l)
    total = sum_over_images(terms, lambda i: w * sum(l(terms.row(0, i), terms.row(v, i)) +
                                                     l(terms.row(v, i), terms.row(0, i)) for v in range(1, terms.m))
                            + cc(i))
    return C * total / (terms.m * (terms.m - 1) * terms.b)


def ip_ref(terms, w, sd, l, l_sg):
    cc = clean_clean(terms, l)
    total = sum_over_images(terms, lambda i: 2 * w * sum(sd * l_sg(terms.row(v, i), terms.row(0, i)) +
                                                         (1 - sd) * l_sg(terms.row(0, i), terms.row(v, i))
                                                         for v in range(1, terms.m)) + cc(i))
    return C * total / (terms.m * (terms.m - 1) * terms.b)


def ours(views, **kw):
    return advcl_ainfonce_loss(views, settings(**kw), stop_degree=kw.get("ainfonce_stop_degree"))


def grads(value, views):
    return torch.autograd.grad(value, views, allow_unused=True)


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a), torch.as_tensor(b), rtol=tol, atol=tol)


# ---------------------------------------------------------------- each variant against its reference


@pytest.mark.parametrize("w", [1.0, 0.7, 1.5])
def test_plain_released_and_fixed(w):
    for impl, ref in (("code", plain_code_ref), ("fixed", plain_fixed_ref)):
        vs = features()
        terms = Terms(vs)
        expected = ref(terms, w, terms.plain)
        value = ours(vs, ainfonce_impl=impl, ainfonce_adv_weight=w)
        assert close(value, expected)
        assert all(close(g1, g2) for g1, g2 in zip(grads(value, vs), grads(expected, vs)))


@pytest.mark.parametrize("sd", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("impl", ["code", "fixed"])  # IP has no alias: both impls agree
def test_ip(sd, impl):
    vs = features(1)
    terms = Terms(vs)
    l_sg = lambda r, p: terms.plain(r, p, stopped=True)  # noqa: E731
    expected = ip_ref(terms, 1.2, sd, terms.plain, l_sg)
    value = ours(vs, ainfonce_variant="ip", ainfonce_impl=impl, ainfonce_adv_weight=1.2, ainfonce_stop_degree=sd)
    assert close(value, expected)
    assert all(close(g1, g2) for g1, g2 in zip(grads(value, vs), grads(expected, vs)))


def test_hn_released_code():
    vs = features(2)
    terms = Terms(vs, tau=0.12, beta=1.0)
    expected = plain_code_ref(terms, 0.9, terms.hn_code)
    value = ours(vs, ainfonce_variant="hn", ainfonce_adv_weight=0.9, ainfonce_tau_plus=0.12)
    assert close(value, expected)
    assert all(close(g1, g2, 1e-4) for g1, g2 in zip(grads(value, vs), grads(expected, vs)))


def test_hn_fixed():
    vs = features(3)
    terms = Terms(vs, tau=0.1, beta=1.0)
    expected = plain_fixed_ref(terms, 0.9, terms.hn_fixed)
    value = ours(vs, ainfonce_variant="hn", ainfonce_impl="fixed", ainfonce_adv_weight=0.9)
    assert close(value, expected)
    assert all(close(g1, g2, 1e-4) for g1, g2 in zip(grads(value, vs), grads(expected, vs)))


def test_iphn_released_code_and_its_leaking_stop_gradient():
    vs = features(4)
    terms = Terms(vs, tau=0.1, beta=1.0)
    l_sg = lambda r, p: terms.hn_code(r, p, stopped=True)  # noqa: E731
    expected = ip_ref(terms, 0.7, 0.0, terms.hn_code, l_sg)
    value = ours(vs, ainfonce_variant="iphn", ainfonce_adv_weight=0.7, ainfonce_stop_degree=0.0)
    assert close(value, expected)
    # A4: even at sd = 0 the "stopped" adversarial-pair terms send gradient to the clean rows,
    # through the denominator of the positive's row; the fixed form sends none
    weights, stopped = ip_weights(M, 0.7, 0.0)
    for impl, leaks in (("code", True), ("fixed", False)):
        vs = features(4)
        hn = hard_negatives(settings(ainfonce_impl=impl), "advcl")
        pull = weighted_multiview_nt_xent(vs, T, weights=torch.zeros(M, M), stopped_weights=stopped, hard_negatives=hn)
        clean_grad = sum(g.abs().sum() for g in grads(pull, vs)[1:])
        assert (clean_grad > 0) == leaks


def test_iphn_fixed():
    vs = features(5)
    terms = Terms(vs)

    hn_fixed_sg = lambda r, p: _hn_fixed_detached(terms, r, p)  # noqa: E731
    expected = ip_ref(terms, 0.7, 0.3, terms.hn_fixed, hn_fixed_sg)
    value = ours(vs, ainfonce_variant="iphn", ainfonce_impl="fixed", ainfonce_adv_weight=0.7, ainfonce_stop_degree=0.3)
    assert close(value, expected)
    assert all(close(g1, g2, 1e-4) for g1, g2 in zip(grads(value, vs), grads(expected, vs)))


def _hn_fixed_detached(terms, r, p):
    n, b = terms.n, terms.b
    e = torch.stack([torch.exp(terms.s(r, k, stopped=True)) for k in range(n)])
    negs = [k for k in range(n) if k % b != r % b]
    pos = sum(e[k] for k in range(n) if k != r and k % b == r % b) / (terms.m - 1)
    imp = torch.stack([e[k] ** terms.beta for k in negs])
    ng = torch.clamp(((imp * e[negs]).sum() / imp.mean() - terms.tau * len(negs) * pos) / (1 - terms.tau),
                     min=len(negs) * math.exp(-1 / terms.t))
    return -torch.log(e[p] / (pos + ng))


# ---------------------------------------------------------------- ainfonce.md §12


def test_fixed_base_at_w1_is_advcls_loss_value_and_gradient():
    vs, again = features(6), features(6)
    value = ours(vs, ainfonce_impl="fixed")
    advcl_value = advcl_contrastive(again, T, C)
    assert close(value, advcl_value)
    assert all(close(g1, g2) for g1, g2 in zip(grads(value, vs), grads(advcl_value, again)))


def test_code_base_at_w1_replaces_clean_anchored_adversarial_terms():
    vs = features(7)
    terms = Terms(vs)
    swapped = lambda r, p: terms.plain(p, r) if (p < B <= r) else terms.plain(r, p)  # noqa: E731  l(v->a) -> l(a->v)
    expected = C * sum(swapped(r, p) for r in range(terms.n) for p in range(terms.n)
                       if r != p and r % B == p % B) / (M - 1) / terms.n
    assert close(ours(vs), expected)
    assert not close(ours(vs), advcl_contrastive(vs, T, C))


def test_ip_stop_degree_limits():
    vs = features(8)
    plain_w1 = ours(vs)
    assert close(ours(vs, ainfonce_variant="ip", ainfonce_stop_degree=0.0), plain_w1)  # sd 0: L_plain(code, w=1)
    assert close(ours(vs, ainfonce_variant="ip", ainfonce_stop_degree=0.5), advcl_contrastive(vs, T, C))
    sd05 = grads(ours(vs, ainfonce_variant="ip", ainfonce_stop_degree=0.5), vs)
    full = grads(advcl_contrastive(vs, T, C), vs)
    assert not all(close(a, b) for a, b in zip(sd05, full))  # same value, not the same gradient
    terms = Terms(vs)
    clean_anchored = C * sum_over_images(terms, lambda i: 2 * sum(terms.plain(terms.row(v, i), terms.row(0, i))
                                                                  for v in range(1, M))
                                         + clean_clean(terms, terms.plain)(i)) / (M * (M - 1) * B)
    assert close(ours(vs, ainfonce_variant="ip", ainfonce_stop_degree=1.0), clean_anchored)


@pytest.mark.parametrize("sd, silent", [(0.0, "clean"), (1.0, "adversarial")])
def test_ip_gradients_are_one_sided(sd, silent):
    vs = features(9)
    _, stopped = ip_weights(M, 1.0, sd)
    pull = weighted_multiview_nt_xent(vs, T, weights=torch.zeros(M, M), stopped_weights=stopped)
    g = grads(pull, vs)
    quiet = g[1:] if silent == "clean" else g[:1]
    loud = g[:1] if silent == "clean" else g[1:]
    assert all(x is None or torch.count_nonzero(x) == 0 for x in quiet)
    assert all(x.abs().sum() > 0 for x in loud)
    # the clean-clean terms still reach every row (their denominators include the adversarial row)
    weights, _ = ip_weights(M, 1.0, sd)
    cc = weighted_multiview_nt_xent(vs, T, weights=weights)
    assert all(x.abs().sum() > 0 for x in grads(cc, vs))


def test_plain_and_ip_weight_tables():
    code = plain_weights(4, 0.7, "code")
    assert code[0, 1:].tolist() == [pytest.approx(0.7 + 0.49)] * 3 and code[1:, 0].tolist() == [0, 0, 0]
    fixed = plain_weights(4, 0.7, "fixed")
    assert fixed[0, 1:].tolist() == fixed[1:, 0].tolist() == [pytest.approx(0.7)] * 3
    w, sg = ip_weights(4, 0.7, 0.2)
    assert w[0].sum() == w[:, 0].sum() == 0 and sg[1:, 0].tolist() == [pytest.approx(0.28)] * 3
    assert sg[0, 1:].tolist() == [pytest.approx(1.12)] * 3 and sg[1:, 1:].sum() == 0


# ---------------------------------------------------------------- adaptive stop degree (§5)


def test_stop_degree_schedule_at_the_listed_epochs():
    """A = 30: epochs 0..29 accumulate the batch-weighted mean (sd = 0.2); from epoch 30 it is frozen."""
    sched = AdaptiveStopDegree(0.2, adaptive_epochs=30, d_min=0.4)
    for epoch in range(30):
        assert sched(epoch, 1.0 + epoch / 29, 512 if epoch % 2 else 256) == 0.2
    weights = [512 if e % 2 else 256 for e in range(30)]
    mean = sum((1.0 + e / 29) * w for e, w in zip(range(30), weights)) / sum(weights)
    assert sched.mean == pytest.approx(mean) and sched.count == sum(weights)
    for epoch in (30, 31, 100, 399):
        assert sched(epoch, mean + 0.01, 512) == 0.2              # d > mean: keep sd
        assert sched(epoch, 0.39, 512) == 0.5                     # d < d_min: symmetric
        d = 0.4 + 0.25 * (mean - 0.4)
        assert sched(epoch, d, 512) == pytest.approx(0.2 + 0.75 * (0.5 - 0.2))
        assert sched(epoch, 0.4, 512) == pytest.approx(0.5)
    assert sched.mean == pytest.approx(mean)  # frozen after the warm-up
    off = AdaptiveStopDegree(0.3, adaptive_epochs=-1)
    assert off(0, 5.0, 8) == off(500, 0.0, 8) == 0.3 and off.count == 0
    at_zero = AdaptiveStopDegree(0.3, adaptive_epochs=0)  # adaptive from the start with mean 0: d > 0 keeps sd
    assert at_zero(0, 0.7, 8) == 0.3
    again = AdaptiveStopDegree(0.2, 30, 0.4)
    again.load_state_dict(sched.state_dict())
    assert again.mean == sched.mean


# ---------------------------------------------------------------- on AdvCL


@pytest.fixture(scope="module")
def data():
    return load("synthetic", "train", cfg=Synthetic.Config(n_train=32, n_test=8), val_size=0)


def labels_for(data, seed=0):
    size = int(data.indices.max()) + 1
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randint(k, (size,), generator=g) for k in KS}


def make(data, cls=AdvCL, **overrides):
    s = {"batch_size": BATCH, "attack_steps": 2, "cluster_ks": list(KS), **overrides}
    cfg = from_dict(cls.Config, s, cls.__name__.lower())
    ctx = MethodContext(EncoderConfig(width=WIDTH), data.num_classes, torch.device("cpu"),
                        {"pseudo_labels": labels_for(data)})
    torch.manual_seed(0)
    method = cls(cfg, ctx)
    method.train_mode()
    return method


def fake_inputs(data, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = data.images(slice(0, BATCH))
    inputs = {"x_org": x, "tau1": torch.rand(x.shape, generator=g), "tau2": torch.rand(x.shape, generator=g)}
    inputs["x_hfc"] = x - x.mean(dim=(2, 3), keepdim=True)
    return inputs, data.indices[:BATCH]


def naive_ainfonce_step(method, inputs, index, epoch=0):
    """Every view re-forwarded at every attack step (the official schedule), A-InfoNCE losses."""
    c, model = method.cfg, method.model
    labels = method.batch_labels(index)
    adv_view = next(v for v in method.views if VIEWS[v][1])

    def project(adv):
        return [model.project(adv, ADV_BRANCH) if v == adv_view else model.project(inputs[VIEWS[v][0]], CLEAN_BRANCH)
                for v in method.views]

    def contrastive(z, **kw):
        i = method.views.index(adv_view)
        return advcl_ainfonce_loss([z[i]] + z[:i] + z[i + 1:], c, temperature=c.temperature,
                                   scale=c.contrastive_scale, **kw)

    def objective(advs):
        ce = pseudo_label_ce(model.cluster_logits(advs[1]), labels, "sum")
        return contrastive(project(advs[0]), attack=True) + ce

    x_cl, x_ce = pgd(objective, [inputs["x_org"], inputs["x_org"]], eps=c.eps, alpha=c.alpha, steps=c.attack_steps,
                     random_start="uniform", clamp_start=False)
    z = project(x_cl)  # the final forwards, then the adaptive ones (official order)
    sd = None
    if method.stop_degrees.enabled:
        with torch.no_grad():
            d = F.pairwise_distance(model.encoder(inputs["x_org"], CLEAN_BRANCH), model.encoder(x_cl, CLEAN_BRANCH))
        sd = method.stop_degrees(epoch, float(d.mean()), BATCH)
    cl = contrastive(z, stop_degree=sd)
    return {"loss": cl + c.ce_weight * pseudo_label_ce(model.cluster_logits(x_ce), labels)}


@pytest.mark.parametrize("variant", ["base", "ip", "hn", "iphn"])
def test_fast_step_equals_the_official_schedule(variant, data):
    """The compute-once schedule stays exact under A-InfoNCE: loss, gradients, BatchNorm statistics."""
    method = make(data, ainfonce_variant=variant, ainfonce_adv_weight=0.7, ainfonce_sd_adaptive_epochs=1)
    inputs, index = fake_inputs(data)
    state = copy.deepcopy(method.model.state_dict())
    results = []
    for schedule in (lambda m, i, x: m.step(i, x), naive_ainfonce_step):
        method.model.load_state_dict(state)
        method.stop_degrees.total, method.stop_degrees.count = 0.0, 0
        method.model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        out = schedule(method, inputs, index)
        out["loss"].backward()
        results.append((out["loss"].detach(), {n: p.grad.clone() for n, p in method.model.named_parameters()
                                               if p.grad is not None}, bn_state(method.model)))
    (fast, fast_g, fast_bn), (slow, slow_g, slow_bn) = results
    assert torch.allclose(fast, slow, rtol=1e-6, atol=1e-6)
    assert fast_g.keys() == slow_g.keys()
    assert all(torch.allclose(fast_g[k], slow_g[k], rtol=1e-4, atol=1e-6) for k in fast_g)
    assert all(torch.allclose(fast_bn[k].float(), slow_bn[k].float(), rtol=1e-5, atol=1e-6) for k in fast_bn)


def test_the_attack_uses_the_plain_form(data, monkeypatch):
    """All shells attack with --attack_ori: iphn's adversarial examples are base's (same w); with
    attack_loss = train the HN terms change them."""
    seen = {}
    real = advcl.pgd

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen["advs"] = [a.clone() for a in out]
        return out

    monkeypatch.setattr(advcl, "pgd", spy)
    inputs, index = fake_inputs(data)
    advs = {}
    for name, kw in {"base": dict(ainfonce_variant="base"), "iphn": dict(ainfonce_variant="iphn"),
                     "iphn_train": dict(ainfonce_variant="iphn", ainfonce_attack_loss="train")}.items():
        method = make(data, ainfonce_adv_weight=0.7, attack_steps=3, **kw)
        torch.manual_seed(5)
        method.step(inputs, index)
        advs[name] = seen["advs"]
    assert all(torch.equal(a, b) for a, b in zip(advs["base"], advs["iphn"]))
    assert not torch.equal(advs["base"][0], advs["iphn_train"][0])


def test_variant_none_is_advcl_and_variants_need_one_adversarial_view(data):
    inputs, index = fake_inputs(data)
    results = []
    for kw in ({}, {"ainfonce_variant": "none", "ainfonce_adv_weight": 3.0}):
        method = make(data, **kw)
        torch.manual_seed(2)
        results.append(method.step(inputs, index)["loss"])
    assert torch.equal(results[0], results[1])
    with pytest.raises(BenchError, match="one adversarial view"):
        make(data, ainfonce_variant="ip", views=["adv_tau1", "adv_tau2"])
    with pytest.raises(BenchError, match="not one of"):
        from_dict(AdvCL.Config, {"ainfonce_variant": "iphnn"}, "advcl")


def test_adaptive_forwards_use_the_normal_branch_and_report_the_stop_degree(data):
    method = make(data, ainfonce_variant="ip", ainfonce_sd_adaptive_epochs=1)
    inputs, index = fake_inputs(data)
    seen = []
    method.model.encoder.register_forward_pre_hook(lambda mod, args: seen.append(args[1]))
    out = method.step(inputs, index, epoch=0)
    last_pgd = max(i for i, b in enumerate(seen) if b == "pgd")  # the final x_cl forward
    assert [b for b in seen[last_pgd + 1:] if b != "pgd_ce"] == ["normal", "normal"]
    assert float(out["stop_degree"]) == pytest.approx(0.2)
    assert method.stop_degrees.count == BATCH
    assert method.stop_degrees.mean == pytest.approx(float(out["feature_distance"]))
    assert method.extra_state() == {"ainfonce_stop_degree": method.stop_degrees.state_dict()}
    out = method.step(inputs, index, epoch=1)  # after the warm-up: the adaptive value, the mean frozen
    assert method.stop_degrees.count == BATCH and 0.2 <= float(out["stop_degree"]) <= 0.5


def test_registered_ainfonce_is_advcl_with_the_cifar10_iphn_shell():
    assert METHODS.get("ainfonce") is AInfoNCE and issubclass(AInfoNCE, AdvCL)
    c = AInfoNCE.Config()
    assert (c.epochs, c.lr, c.batch_size, c.weight_decay, c.momentum) == (400, 2.0, 512, 1e-4, 0.9)
    assert (c.ainfonce_variant, c.ainfonce_impl, c.ainfonce_attack_loss) == ("iphn", "code", "plain")
    assert (c.ainfonce_adv_weight, c.ainfonce_stop_degree, c.ainfonce_sd_adaptive_epochs, c.ainfonce_d_min) == \
        (0.7, 0.2, 30, 0.4)
    assert (c.ainfonce_tau_plus, c.ainfonce_beta) == (0.1, 1.0)
    assert AInfoNCE.encoder_branch == "pgd" and AInfoNCE.dependencies(c) == AdvCL.dependencies(AdvCL.Config())
    for (variant, dataset), preset in PRESETS.items():
        cfg = from_dict(AInfoNCE.Config, preset, "ainfonce")  # every official shell is a valid setting
        assert cfg.ainfonce_variant == variant and dataset in ("cifar10", "cifar100")
    # eta_min = 1e-3 lr (tied to lr), warm-up from 0.01 to the cosine at epoch 10, cosine over 400
    m = AInfoNCE.__new__(AInfoNCE)
    m.cfg = c
    cosine = lambda e, lr=2.0, n=400: 1e-3 * lr + (lr - 1e-3 * lr) * (1 + math.cos(math.pi * e / n)) / 2  # noqa: E731
    assert m.lr_at(0, 0, 10) == pytest.approx(0.01)
    assert m.lr_at(10, 0, 10) == pytest.approx(cosine(11)) and m.lr_at(399, 0, 10) == pytest.approx(cosine(400))
    m.cfg = from_dict(AInfoNCE.Config, {"lr": 1.0, "epochs": 401, "schedule_epochs": 400}, "ainfonce")
    assert m.lr_at(400, 0, 10) == pytest.approx(cosine(401, lr=1.0))


def tiny_settings(**kw):
    return {"batch_size": BATCH, "attack_steps": 1, "cluster_ks": list(KS), "epochs": 3, "steps_per_epoch": 2,
            "warmup_epochs": 1, "lr": 0.5, "ainfonce_sd_adaptive_epochs": 1, **kw}


def test_killed_and_resumed_run_ends_with_the_same_weights(data, tmp_path):
    """Resume across the adaptive warm-up boundary (A = 1): the stop-degree state is in the checkpoint."""
    finals = []
    for stop in (None, 1, 2):
        workdir = tmp_path / f"run{stop}"
        workdir.mkdir()
        method = make(data, AInfoNCE, **tiny_settings())
        if stop is not None:
            fit(method, data, seed=0, workdir=workdir, stop_after_epoch=stop)
            method = make(data, AInfoNCE, **tiny_settings())  # a fresh process: state only from the checkpoint
        history = fit(method, data, seed=0, workdir=workdir)
        finals.append((method.model.state_dict(), history, method.stop_degrees.state_dict()))
    ref_state, ref_history, ref_sd = finals[0]
    assert ref_sd["count"] == 2 * BATCH  # the warm-up epoch's two steps, frozen afterwards
    for state, history, sd in finals[1:]:
        assert sd == ref_sd
        assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)
        assert [h["stop_degree"] for h in history] == [h["stop_degree"] for h in ref_history]
        assert [h["loss"] for h in history] == [h["loss"] for h in ref_history]


# ---------------------------------------------------------------- on RoCL (§7)


def rocl_ref(vs, weights, term):
    """1/(3N) sum over anchors of the weighted sum of their two positive terms."""
    n = vs[0].shape[0]
    total = 0.0
    for a in range(3):
        for p in range(3):
            if a != p:
                total = total + weights[a][p] * sum(term(a * n + i, p * n + i) for i in range(n))
    return total / (3 * n)


def rocl_terms(vs, t=T):
    z = F.normalize(torch.cat(vs), dim=1)
    s = z @ z.detach().T / t  # RoCL's detached keys
    n = z.shape[0]
    b = vs[0].shape[0]
    return s, n, b


def test_rocl_base_is_rocls_loss_and_ip_by_hand():
    vs = features(10, m=3)
    cfg = settings(ainfonce_variant="base")
    assert close(rocl_ainfonce_loss(*vs, cfg), rocl_loss(*vs, T))
    s, n, b = rocl_terms(vs)
    term = lambda r, p: -(s[r, p] - torch.log(sum(torch.exp(s[r, k]) for k in range(n) if k != r)))  # noqa: E731
    w, sd = 1.0, 0.2
    weights = [[1, 1, w * sd], [1, 1, w * sd], [w * (1 - sd), w * (1 - sd), 1]]
    ip = rocl_ainfonce_loss(*vs, settings(ainfonce_variant="ip", ainfonce_stop_degree=sd))
    assert close(ip, rocl_ref(vs, weights, term))
    # with RoCL's detach the split is one-sided: at sd = 0 the adversarial pairs pull only x_adv
    adversarial_pairs = torch.zeros(3, 3)
    adversarial_pairs[2, :2] = w
    pull = weighted_multiview_nt_xent(vs, T, weights=adversarial_pairs, sum_positives=True, detach_keys=True)
    g = grads(pull, vs)
    assert all(x is None or torch.count_nonzero(x) == 0 for x in g[:2]) and g[2].abs().sum() > 0


@pytest.mark.parametrize("impl", ["code", "fixed"])
def test_rocl_hard_negatives_by_hand(impl):
    vs = features(11, m=3)
    s, n, b = rocl_terms(vs)
    tau, beta = 0.12, 1.0
    e = torch.exp(s)
    is_neg = lambda r, k: r % b != k % b  # noqa: E731
    n_neg = n - 3
    imp = torch.stack([torch.stack([(e[r, k] if is_neg(r, k) else torch.tensor(0.0)) + 1e-9 for k in range(n)]) ** beta
                       for r in range(n)])

    def ng(r):
        pos = sum(e[r, k] for k in range(n) if k != r and not is_neg(r, k)) / 2
        if impl == "code":  # A2a: column k normalized by row k's mean over every column
            total = sum(imp[r, k] * e[r, k] / imp[k].mean() for k in range(n) if is_neg(r, k))
        else:
            mean = sum(imp[r, k] for k in range(n) if is_neg(r, k)) / n_neg
            total = sum(imp[r, k] * e[r, k] / mean for k in range(n) if is_neg(r, k))
        return pos, torch.clamp((total - tau * n_neg * pos) / (1 - tau), min=n_neg * math.exp(-2))

    def term(r, p):
        pos, neg = ng(r)
        return -torch.log(e[r, p] / (pos + neg))  # row-wise denominator

    cfg = settings(ainfonce_variant="hn", ainfonce_impl=impl, ainfonce_tau_plus=tau)
    expected = rocl_ref(vs, [[1, 1, 1]] * 3, term)
    assert close(rocl_ainfonce_loss(*vs, cfg), expected)


def test_rocl_options_validate_and_train(data):
    cfg = from_dict(RoCL.Config, {"ainfonce_variant": "iphn", "batch_size": BATCH, "attack_steps": 1}, "rocl")
    assert not hasattr(cfg, "ainfonce_sd_adaptive_epochs")  # RoCL's IP has no adaptive schedule
    torch.manual_seed(0)
    method = RoCL(cfg, MethodContext(EncoderConfig(width=WIDTH), 10, torch.device("cpu"), {}))
    method.train_mode()
    x = data.images(slice(0, BATCH))
    out = method.step(x, x.flip(-1))
    assert torch.isfinite(out["loss"])
    assert RoCL.Config().ainfonce_variant == "none"
