"""bench.models.bn_replay: skipped and deferred forwards leave the statistics of the real ones."""

from __future__ import annotations

import copy

import torch
from torch import nn

from bench.models.bn_replay import StatsLedger, branch_batchnorms, replayed_rounds
from bench.models.norm import BranchedBatchNorm2d


def test_replayed_rounds_equal_repeated_forwards():
    torch.manual_seed(0)
    bns = [nn.BatchNorm2d(3), nn.BatchNorm2d(3)]
    batches = [torch.randn(4, 3, 5, 5) * 2 + 1, torch.randn(6, 3, 5, 5) - 3]
    reference = copy.deepcopy(bns)
    rounds = 4
    for _ in range(rounds):  # the official schedule: every forward in every round
        for bn, x in zip(reference, batches):
            bn(x)
            bn(x * 0.5)  # two forwards per round through each BN
    with replayed_rounds(bns, per_round=2, rounds=rounds):
        for bn, x in zip(bns, batches):
            bn(x)
            bn(x * 0.5)
    for ours, ref in zip(bns, reference):
        assert torch.allclose(ours.running_mean, ref.running_mean, atol=1e-6)
        assert torch.allclose(ours.running_var, ref.running_var, atol=1e-6)
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 2 * rounds


def test_replay_leaves_eval_mode_batchnorms_alone():
    bn = nn.BatchNorm2d(2).eval()
    before = bn.running_mean.clone()
    with replayed_rounds([bn], per_round=1, rounds=5):
        bn(torch.randn(3, 2, 4, 4))
    assert torch.equal(bn.running_mean, before) and int(bn.num_batches_tracked) == 0


def test_ledger_normalizes_like_batchnorm_and_defers_the_updates_in_any_order():
    torch.manual_seed(0)
    bn, ref = nn.BatchNorm1d(5), nn.BatchNorm1d(5)
    ref.load_state_dict(bn.state_dict())
    a, b = torch.randn(8, 5) + 2, torch.randn(8, 5) * 3
    ledger = StatsLedger()
    with ledger.record() as entries:
        out_a, out_b = ledger.forward(bn, a), ledger.forward(bn, b)
        assert torch.equal(bn.running_mean, torch.zeros(5))  # nothing updated yet
    assert torch.allclose(out_a, ref(a), atol=1e-6) and torch.allclose(out_b, ref(b), atol=1e-6)
    ref_bn = nn.BatchNorm1d(5)
    ref_bn.load_state_dict(bn.state_dict())
    for x in (b, a, b):  # replay in another order, one stats entry twice
        ref_bn(x)
    StatsLedger.apply(bn, [entries[1], entries[0], entries[1]])
    assert torch.allclose(bn.running_mean, ref_bn.running_mean, atol=1e-6)
    assert torch.allclose(bn.running_var, ref_bn.running_var, atol=1e-5)
    assert int(bn.num_batches_tracked) == 3
    assert not ledger.recording and torch.allclose(ledger.forward(bn, a), bn(a))  # outside: a plain BN


def test_branch_batchnorms_finds_one_branch():
    model = nn.Sequential(BranchedBatchNorm2d(3, ("normal", "pgd")), BranchedBatchNorm2d(4, ("normal", "pgd")))
    found = branch_batchnorms(model, "pgd")
    assert found == [model[0].bns["pgd"], model[1].bns["pgd"]]
