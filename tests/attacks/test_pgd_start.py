"""The evaluation PGD's random start: unclipped by default (AdvCL's SLF script, ACL's `pgd_attack`),
clipped to [0, 1] as an option (`eval.clamp_start`), recorded in the protocol; both give the same
RA within noise on a trained model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.attacks import pgd
from bench.config import EvalConfig, apply
from bench.datasets import batches, load
from bench.datasets.synthetic import Synthetic
from bench.attacks.accuracy import clean_correct, image_batches, pgd_correct, pgd_protocol
from bench.evaluation import evaluate_classifier

EPS, ALPHA = 48 / 255, 12 / 255  # large for the tiny 8x8 model: RA about 0.23, a real mix


@pytest.fixture(scope="module")
def trained():
    cfg = Synthetic.Config(n_train=512, n_test=400, num_classes=4, image_size=8)
    train = load("synthetic", "train", cfg=cfg, val_size=0)
    test = load("synthetic", "test", cfg=cfg)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        for x, y, _ in batches(train, 64, shuffle=True, generator=generator):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), test


def test_the_default_start_is_not_clipped_and_the_option_clips_it():
    x = torch.tensor([[0.0, 0.5, 1.0]])
    torch.manual_seed(0)
    start = pgd(lambda a: a[0].sum(), x, eps=0.1, alpha=0.01, steps=0, clamp_start=False)
    assert float(start.min()) < 0 or float(start.max()) > 1
    torch.manual_seed(0)
    clipped = pgd(lambda a: a[0].sum(), x, eps=0.1, alpha=0.01, steps=0, clamp_start=True)
    assert torch.equal(clipped, start.clamp(0, 1))
    assert EvalConfig().clamp_start is False
    assert pgd_protocol(eps=EPS, alpha=ALPHA, steps=20, restarts=1, n=1, seed=0, batch_size=1,
                        images="x")["clamp_start"] is False


def test_clipped_and_unclipped_starts_give_the_same_ra_within_noise(trained):
    model, test = trained
    data = image_batches(test, 200)
    n = len(test)
    sa = int(clean_correct(model, data).sum())
    free = pgd_correct(model, data, eps=EPS, alpha=ALPHA, steps=20, seed=0, clamp_start=False)
    clip = pgd_correct(model, data, eps=EPS, alpha=ALPHA, steps=20, seed=0, clamp_start=True)
    ra_free, ra_clip = float(free.float().mean()), float(clip.float().mean())
    assert 0.05 * n < int(free.sum()) < sa  # a trained model with a mix of robust and broken samples
    p = (ra_free + ra_clip) / 2
    assert abs(ra_free - ra_clip) <= 3 * math.sqrt(2 * p * (1 - p) / n)
    # the only difference is where the first gradient is taken: after 20 steps few samples disagree
    assert int((free != clip).sum()) <= 0.05 * n


def test_the_evaluate_stage_uses_and_records_the_setting(trained):
    model, test = trained
    base = EvalConfig(n=64, aa_n=0, sweep_n=16, sweep_eps=(8,), sweep_steps=(2,), batch_size=64, steps=5,
                      eps=EPS, alpha=ALPHA)
    out = evaluate_classifier(model, test, base, seed=0)
    assert out.metrics.ra.protocol["clamp_start"] is False
    assert all(m.protocol["clamp_start"] is False for axis in out.metrics.sweeps.values() for m in axis)
    apply("eval", base, "clamp_start", "true")
    clipped = evaluate_classifier(model, test, base, seed=0)
    assert clipped.metrics.ra.protocol["clamp_start"] is True
    assert torch.equal(clipped.per_sample["pgd"], pgd_correct(model, image_batches(test.first(64), 64), eps=EPS,
                                                                 alpha=ALPHA, steps=5, seed=0, clamp_start=True))
