"""RCS (air_rcs.md B.3): its pieces against hand values, the greedy search on a toy problem with a
known answer, and the selector on a tiny ACL: right size, validation excluded, model untouched."""

import math

import pytest
import torch

import methods.acl as acl
from bench.config import EncoderConfig, SelectConfig, from_dict
from bench.datasets import load
from bench.datasets.synthetic import Synthetic
from bench.method import MethodContext
from bench.selection import RCSSelector, budget_batches
from bench.selection.rcs import greedy_coreset, minmax_rows, rcs_divergence, sketch, validation_rows
from bench.train import build_optimizer


def test_minmax_rows_and_divergence_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 2.0]])
    assert torch.allclose(minmax_rows(x), torch.tensor([[0.0, 0.5, 1.0], [1.0, 0.0, 0.5]]))
    adv, clean = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 1.0]])
    # Q = (e, 1/2 + e, 1 + e), e = 1e-8, against (1 + e, 1/2 + e, e): mean of Q (log Q - log P)
    e = 1e-8
    expected = (e * (math.log(e) - math.log(1 + e)) + 0.0 + (1 + e) * (math.log(1 + e) - math.log(e))) / 3
    assert rcs_divergence(adv, clean).item() == pytest.approx(expected, rel=1e-5)
    assert rcs_divergence(clean, clean).item() == pytest.approx(0.0, abs=1e-6)


def test_sketch_averages_each_gradient_over_output_units():
    w = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])
    b = torch.tensor([1.0, 3.0])
    assert torch.equal(sketch([w, b, w]), torch.tensor([2.0, 3.0, 4.0, 2.0, 2.0, 3.0, 4.0]))


def test_budget_matches_the_spec_counts():
    assert [budget_batches(49_500, f, 512) for f in (0.05, 0.1, 0.2)] == [4, 9, 19]
    assert budget_batches(10, 0.2, 512) == 1  # less than one batch: one batch (logged)


def test_validation_rows_code_duplicates_the_first_half_of_each_batch():
    positions = torch.tensor([10, 11, 12, 13, 14])
    assert validation_rows(positions, 4, "code").tolist() == [10, 10, 11, 11, 14]
    assert validation_rows(positions, 4, "all").tolist() == [10, 11, 12, 13, 14]


def toy_problem():
    """theta = w (1 x 2); the validation loss is |w - w*|^2 / 2, so v = w - w* = (w1 - 1, w2);
    candidate b has the constant gradient G_b. Gains are s_b . v."""
    target = torch.tensor([[1.0, 0.0]])
    grads = [[torch.tensor([[-1.0, 0.0]])], [torch.tensor([[1.0, 0.0]])], [torch.tensor([[0.0, -1.0]])],
             [torch.tensor([[-0.5, 0.0]])]]
    sketches = torch.stack([sketch(g) for g in grads])
    calls = []

    def val_sketch(theta):
        calls.append(theta[0].clone())
        return sketch([theta[0] - target])

    return sketches, grads, [torch.zeros(1, 2)], val_sketch, calls


def test_greedy_picks_what_the_validation_gradient_asks_for():
    sketches, grads, theta, val_sketch, calls = toy_problem()
    # w = 0: v = (-1, 0), gains (1, -1, 0, 0.5): candidate 0; w -= 2 * 0.25 * G_0 -> (0.5, 0), v = (-0.5, 0):
    # gains of 1, 2, 3 = (-0.5, 0, 0.25): candidate 3; w -> (0.75, 0): gains of 1, 2 = (-0.25, 0): candidate 2
    assert greedy_coreset(sketches, grads, theta, val_sketch, picks=3, lr=0.25, double_step=True) == [0, 3, 2]
    assert [c.tolist() for c in calls] == [[[0.0, 0.0]], [[0.5, 0.0]], [[0.75, 0.0]]]  # none after the last pick
    assert torch.equal(theta[0], torch.zeros(1, 2))  # the caller's theta is not modified
    sketches, grads, theta, val_sketch, calls = toy_problem()
    greedy_coreset(sketches, grads, theta, val_sketch, picks=2, lr=0.25, double_step=False)
    assert calls[1].tolist() == [[0.25, 0.0]]  # a single step


def test_greedy_prefers_the_mirrored_candidate_when_the_target_moves():
    sketches, grads, theta, _, _ = toy_problem()
    away = torch.tensor([[-1.0, 0.0]])
    picks = greedy_coreset(sketches, grads, theta, lambda t: sketch([t[0] - away]), picks=1, lr=0.1)
    assert picks == [1]


@pytest.fixture(scope="module")
def pool():
    return load("synthetic", "train", cfg=Synthetic.Config(n_train=30, n_test=4), val_size=0)


def tiny_acl():
    torch.manual_seed(0)
    ctx = MethodContext(EncoderConfig(width=4), 10, torch.device("cpu"), {})
    return acl.ACL(from_dict(acl.ACL.Config, {"batch_size": 4, "attack_steps": 1}, "acl"), ctx)


def select_cfg(**kw):
    return SelectConfig(**{"method": "rcs", "fraction": 0.3, "warmup": 0, "every": 1, "val_fraction": 0.2,
                           "val_attack_steps": 1, **kw})


def snapshot(method, optimizer):
    model = method.model
    return ({k: v.clone() for k, v in model.state_dict().items()}, [p.requires_grad for p in model.parameters()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            [m.training for m in model.modules()], optimizer.state_dict())


def test_rcs_selection_size_validation_excluded_deterministic_and_model_untouched(pool):
    method = tiny_acl()
    optimizer = build_optimizer(method.trainable_parameters(), method.cfg)
    x = pool.images(slice(0, 4))
    loss = method.training_step(x, pool.y[:4], pool.indices[:4], None)["loss"]  # momentum state and .grad exist
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    method.train_mode()
    before = snapshot(method, optimizer)
    selector = RCSSelector(select_cfg(), seed=3, batch=4)
    rng = torch.get_rng_state()
    chosen = selector.select(method, 0, pool)
    assert torch.equal(torch.get_rng_state(), rng)  # the training's random stream is not consumed
    after = snapshot(method, optimizer)
    assert all(torch.equal(v, after[0][k]) for k, v in before[0].items())  # parameters and BN statistics
    assert before[1] == after[1] and before[3] == after[3]                # requires_grad, train/eval modes
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(before[2], after[2]))
    assert str(before[4]) == str(after[4])                               # optimizer state
    val = selector.val
    assert len(val) == 30 - int(30 * 0.8) == 6
    train = 30 - len(val)
    assert len(chosen) == budget_batches(train, 0.3, 4) * 4 == 4 and len(set(chosen.tolist())) == len(chosen)
    assert not set(chosen.tolist()) & set(val.tolist())
    again = RCSSelector(select_cfg(), seed=3, batch=4).select(method, 0, pool)
    assert torch.equal(chosen, again)
    warm = RCSSelector(select_cfg(warmup=5), seed=3, batch=4)
    assert sorted(warm.select(method, 0, pool).tolist()) == sorted(set(range(30)) - set(val.tolist()))
    assert RCSSelector(select_cfg(warmup=5, val_in_pool=True), seed=3, batch=4).select(method, 0, pool) is None


def test_rcs_on_dynacl_uses_the_online_model_and_leaves_the_ema_copy_untouched(pool):
    import methods.dynacl as dyn

    torch.manual_seed(0)
    ctx = MethodContext(EncoderConfig(width=4), 10, torch.device("cpu"), {})
    method = dyn.DynACL(from_dict(dyn.DynACL.Config, {"batch_size": 4, "attack_steps": 1}, "dynacl"), ctx)
    parts = method.rcs_parts(0)
    assert parts.encoder is method.model.online.encoder and parts.head is method.model.online.head
    before = {k: v.clone() for k, v in method.model.state_dict().items()}
    chosen = RCSSelector(select_cfg(), seed=0, batch=4).select(method, 0, pool)
    assert len(chosen) == 4
    assert all(torch.equal(v, method.model.state_dict()[k]) for k, v in before.items())
    assert all(not p.requires_grad for p in method.model.encoder.parameters())
