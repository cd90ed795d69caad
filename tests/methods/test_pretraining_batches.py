"""Which pretrainers keep the last partial batch: those whose official loader does (no drop_last)."""

from __future__ import annotations

import math

import pytest

from bench.registry import METHODS
from bench.train.loop import epoch_steps

# official pretraining loaders: AdvCL pretraining_advCL.py, ACL train_simCLR.py, RoCL data_loader.py
# (DistributedSampler + DataLoader), AP-DPE ensemble_pretrain.py, PGD-AT/TRADES reference loaders
KEEP_LAST = ("advcl", "acl", "rocl", "apdpe", "supervised_at")


@pytest.mark.parametrize("name", KEEP_LAST)
def test_the_last_partial_batch_is_kept_as_in_the_official_loader(name):
    cls = METHODS.get(name)
    assert cls.drop_last is False
    batch = cls.Config().batch_size
    assert epoch_steps(50_000, batch, cls.drop_last) == math.ceil(50_000 / batch)  # 98 at batch 512


def test_a_final_batch_of_one_image_is_never_trained_on():
    assert epoch_steps(50_001, 512, drop_last=False) == 98  # 97 full batches and one of 337
    assert epoch_steps(512 * 3 + 1, 512, drop_last=False) == 3
