"""Per-shard BatchNorm (bench.train.bn_shards): what nn.DataParallel's replicas compute, on one device."""

from __future__ import annotations

import copy

import torch
from torch import nn

from bench.models import ResNet18
from bench.train.bn_shards import per_shard, shard_sizes, sharded_batchnorm


def test_shard_sizes_are_equal_where_the_batch_divides():
    assert shard_sizes(512, 2) == [256, 256] and shard_sizes(336, 2) == [168, 168]
    assert shard_sizes(7, 2) == [4, 3] and shard_sizes(9, 4) == [3, 2, 2, 2] and shard_sizes(5, 1) == [5]


def test_each_shard_is_normalized_alone_and_the_first_one_updates_the_running_statistics():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(6)
    nn.init.normal_(bn.weight), nn.init.normal_(bn.bias)
    x = torch.randn(10, 6) * 3 + 1
    first, second = copy.deepcopy(bn), copy.deepcopy(bn)  # "GPU 0" and "GPU 1" replicas
    expected = torch.cat([first(x[:5]), second(x[5:])])
    out = per_shard(bn, x, 2)
    assert torch.allclose(out, expected, atol=1e-6)
    assert not torch.allclose(out, copy.deepcopy(bn)(x), atol=1e-3)  # not the whole-batch statistics
    for name in ("running_mean", "running_var", "num_batches_tracked"):  # GPU 0's in-place update is kept
        assert torch.equal(getattr(bn, name), getattr(first, name))
    bn.eval()
    assert torch.equal(per_shard(bn, x, 2), bn(x))  # eval mode: running statistics, no sharding


def test_a_sharded_resnet_equals_its_forwards_on_each_shard():
    torch.manual_seed(0)
    model = ResNet18(width=4, branches=("normal", "pgd")).train()
    x = torch.rand(8, 3, 16, 16)
    replicas = [copy.deepcopy(model) for _ in range(2)]
    expected = torch.cat([replicas[0](x[:4], branch="pgd"), replicas[1](x[4:], branch="pgd")])
    with sharded_batchnorm(model, 2):
        out = model(x, branch="pgd")
    assert torch.allclose(out, expected, atol=1e-5)
    for k, v in model.state_dict().items():  # running statistics: those of the first shard's replica
        assert torch.equal(v, replicas[0].state_dict()[k]), k
    # outside the block every BatchNorm is its plain self again: whole-batch statistics
    assert all("forward" not in vars(m) for m in model.modules())
    plain = copy.deepcopy(model)
    assert torch.allclose(model(x, branch="pgd"), plain(x, branch="pgd"))
    assert not torch.allclose(model(x, branch="pgd"), expected, atol=1e-3)
