"""bench.losses: the weighted multi-view NT-Xent and its hard-negative terms against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bench.losses import HardNegatives, multiview_nt_xent, pair_losses, weighted_multiview_nt_xent


def views(m=3, b=3, d=5, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(b, d, generator=g) for _ in range(m)]
    return [v.requires_grad_(grad) for v in out]


def sims(vs, t, detach_keys=False):
    """Rows view-major (row = view * b + image), as the loss stacks them."""
    z = F.normalize(torch.cat(vs), dim=1)
    return z @ (z.detach() if detach_keys else z).T / t


def plain_term(s, r, p):
    """l(r -> p) = -[s_rp - log sum_{k != r} exp(s_rk)], by hand."""
    denom = sum(torch.exp(s[r, k]) for k in range(s.shape[0]) if k != r)
    return -(s[r, p] - torch.log(denom))


def positives_of(r, m, b):
    return [v * b + r % b for v in range(m) if v * b + r % b != r]


def old_multiview_nt_xent(vs, t, sum_positives=False, detach_keys=False):
    """The implementation before the generalisation (kept here to pin its behaviour bit for bit)."""
    m, b = len(vs), vs[0].shape[0]
    z = F.normalize(torch.cat(list(vs)).float(), dim=1)
    keys = z.detach() if detach_keys else z
    sim = z @ keys.T / t
    n = m * b
    eye = torch.eye(n, dtype=torch.bool)
    log_prob = sim.masked_fill(eye, float("-inf")).log_softmax(dim=1)
    image = torch.arange(n) % b
    positives = (image[:, None] == image[None, :]) & ~eye
    per_anchor = -(log_prob.masked_fill(~positives, 0.0)).sum(dim=1)
    if not sum_positives:
        per_anchor = per_anchor / (m - 1)
    return per_anchor.mean()


@pytest.mark.parametrize("sum_positives", [False, True])
@pytest.mark.parametrize("detach_keys", [False, True])
def test_multiview_nt_xent_is_unchanged_bit_for_bit(sum_positives, detach_keys):
    for m in (2, 3, 4):
        a, b = views(m, grad=True), views(m, grad=True)
        new = multiview_nt_xent(a, 0.5, sum_positives=sum_positives, detach_keys=detach_keys)
        old = old_multiview_nt_xent(b, 0.5, sum_positives=sum_positives, detach_keys=detach_keys)
        assert torch.equal(new, old)
        new.backward(), old.backward()
        assert all(torch.equal(x.grad, y.grad) for x, y in zip(a, b))


def test_pair_terms_and_per_view_weights_by_hand():
    m, b, t = 3, 2, 0.5
    vs = views(m, b)
    w = torch.tensor([[1.0, 2.0, 0.5], [0.0, 1.0, 3.0], [1.5, 0.25, 1.0]])
    s = sims(vs, t)
    expected = 0.0
    for r in range(m * b):
        expected += sum(w[r // b, p // b] * plain_term(s, r, p) for p in positives_of(r, m, b)) / (m - 1)
    expected /= m * b
    value = weighted_multiview_nt_xent(vs, t, weights=w)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    terms = pair_losses(F.normalize(torch.cat(vs), dim=1), F.normalize(torch.cat(vs), dim=1), b, t)
    assert terms[0, b].item() == pytest.approx(plain_term(s, 0, b).item(), rel=1e-6)
    assert terms[0, 1].item() == 0.0  # not a positive pair
    # all-ones weights are the plain loss; sum_positives skips the 1/(m-1)
    assert torch.allclose(weighted_multiview_nt_xent(vs, t, weights=torch.ones(m, m)), multiview_nt_xent(vs, t))
    assert torch.allclose(weighted_multiview_nt_xent(vs, t, sum_positives=True), (m - 1) * multiview_nt_xent(vs, t))


def test_stopped_terms_have_the_same_value_and_reach_only_their_anchor():
    m, b, t = 3, 2, 0.5
    full, stopped = views(m, b, grad=True), views(m, b, grad=True)
    only_view0 = torch.zeros(m, m)
    only_view0[0, :] = 1.0  # anchors in view 0 only
    a = weighted_multiview_nt_xent(full, t, weights=only_view0)
    s = weighted_multiview_nt_xent(stopped, t, weights=torch.zeros(m, m), stopped_weights=only_view0)
    assert a.item() == pytest.approx(s.item(), rel=1e-6)
    s.backward()
    assert stopped[0].grad.abs().sum() > 0
    assert all(torch.count_nonzero(v.grad) == 0 for v in stopped[1:])  # keys detached
    a.backward()
    assert all(v.grad.abs().sum() > 0 for v in full[1:])  # full terms reach their keys


def hcl_by_hand(s, r, p, m, b, tau, beta, bound_t):
    """HCL's l(r -> p) over r's negatives in unshifted units (ainfonce.md section 4)."""
    n = m * b
    neg = [k for k in range(n) if k % b != r % b]
    pos = [k for k in positives_of(r, m, b)]
    e = torch.exp(s[r])
    pos_mean = sum(e[k] for k in pos) / len(pos)
    imp = {k: (e[k] + 1e-9) ** beta for k in neg}
    mean_imp = sum(imp.values()) / len(neg)
    ng = (sum(imp[k] * e[k] for k in neg) / mean_imp - tau * len(neg) * pos_mean) / (1 - tau)
    ng = torch.clamp(ng, min=len(neg) * math.exp(-1 / bound_t))
    return -torch.log(e[p] / (pos_mean + ng))


@pytest.mark.parametrize("tau, beta", [(0.1, 1.0), (0.01, 0.5), (0.0, 0.0), (0.12, 2.0)])
def test_hcl_hard_negatives_by_hand(tau, beta):
    m, b, t = 3, 3, 0.5
    vs = views(m, b, seed=2)
    s = sims(vs, t)
    hn = HardNegatives(tau, beta)
    expected = sum(hcl_by_hand(s, r, p, m, b, tau, beta, t) for r in range(m * b) for p in positives_of(r, m, b))
    expected = expected / (m - 1) / (m * b)
    assert weighted_multiview_nt_xent(vs, t, hard_negatives=hn).item() == pytest.approx(expected.item(), rel=1e-5)


def test_hcl_without_reweighting_is_positives_mean_plus_negatives_sum():
    """tau+ = 0, beta = 0, bound inactive: the denominator is mean(positives) + sum(negatives)."""
    m, b, t = 4, 3, 0.5
    vs = views(m, b, seed=3)
    s = sims(vs, t)
    n = m * b
    expected = 0.0
    for r in range(n):
        e = torch.exp(s[r])
        pos = positives_of(r, m, b)
        denom = sum(e[k] for k in pos) / len(pos) + sum(e[k] for k in range(n) if k % b != r % b)
        assert denom > (n - m) * math.exp(-1 / t)  # the bound is inactive
        expected += sum(-torch.log(e[p] / denom) for p in pos) / (m - 1)
    value = weighted_multiview_nt_xent(vs, t, hard_negatives=HardNegatives(0.0, 0.0))
    assert value.item() == pytest.approx((expected / n).item(), rel=1e-5)


def test_hcl_bound_applies_in_unshifted_units():
    m, b, t = 2, 3, 0.5
    n_neg, e_pos = m * b - m, math.exp(1 / t)
    # identical features: every exponential is e^2, Ng = (N e^2 - 0.9 N e^2) / 0.1 = N e^2 (bound inactive)
    same = [torch.ones(b, 4), torch.ones(b, 4)]
    value = weighted_multiview_nt_xent(same, t, hard_negatives=HardNegatives(0.9, 1.0))
    assert value.item() == pytest.approx(math.log(1 + n_neg), rel=1e-5)
    # orthogonal images: negatives e^0 = 1, Ng = (N - 0.5 N e^2) / 0.5 < 0, clamped at N e^(-1/t)
    orthogonal = [F.one_hot(torch.arange(b), 8).float()] * 2
    value = weighted_multiview_nt_xent(orthogonal, t, hard_negatives=HardNegatives(0.5, 1.0))
    assert value.item() == pytest.approx(-math.log(e_pos / (e_pos + n_neg * math.exp(-1 / t))), rel=1e-5)


def released_by_hand(s, r, p, m, b, tau, beta, *, key_rows, positive_row, shifted, bound_t=0.5):
    """A-InfoNCE's released HN term (ainfonce.md sections 3 and 7), element by element."""
    n = m * b
    is_pos = lambda i, k: i != k and i % b == k % b  # noqa: E731
    is_neg = lambda i, k: i % b != k % b  # noqa: E731
    shift = [max(s[i]) if shifted else torch.tensor(0.0) for i in range(n)]
    e = [[torch.exp(s[i, k] - shift[i]) for k in range(n)] for i in range(n)]
    neg = [[e[i][k] if is_neg(i, k) else torch.tensor(0.0) for k in range(n)] for i in range(n)]
    imp = [[(neg[i][k] + 1e-9) ** beta for k in range(n)] for i in range(n)]
    pos = [sum(e[i][k] for k in range(n) if is_pos(i, k)) / (m - 1) for i in range(n)]

    def ng(i):
        total = 0.0
        for k in range(n):
            norm = sum(imp[k]) / n if key_rows else sum(imp[i][j] for j in range(n) if is_neg(i, j)) / (n - m)
            total = total + imp[i][k] * neg[i][k] / norm
        return torch.clamp((total - tau * (n - m) * pos[i]) / (1 - tau), min=(n - m) * math.exp(-1 / bound_t))

    row = p if positive_row else r
    return -torch.log(e[r][p] / (pos[row] + ng(row)))


@pytest.mark.parametrize("flags", [dict(key_rows=True, positive_row=True, shifted=True),    # AdvCL side
                                   dict(key_rows=True, positive_row=False, shifted=False),  # RoCL side
                                   dict(key_rows=False, positive_row=True, shifted=False)])
def test_released_hard_negative_forms_by_hand(flags):
    m, b, t, tau, beta = 3, 2, 0.5, 0.1, 1.0
    vs = views(m, b, seed=4)
    s = sims(vs, t)
    hn = HardNegatives(tau, beta, bound_temperature=0.5, key_row_importance=flags["key_rows"],
                       positive_row_denominator=flags["positive_row"], shifted=flags["shifted"])
    expected = sum(released_by_hand(s, r, p, m, b, tau, beta, **flags) for r in range(m * b)
                   for p in positives_of(r, m, b)) / (m - 1) / (m * b)
    assert weighted_multiview_nt_xent(vs, t, hard_negatives=hn).item() == pytest.approx(expected.item(), rel=1e-5)


def test_weights_must_match_the_views():
    with pytest.raises(ValueError, match="3 x 3"):
        weighted_multiview_nt_xent(views(3), 0.5, weights=torch.ones(2, 2))
