"""Feature inversion (bench.analysis.inversion): direction of the optimised coordinate, the budget,
the image box, untouched weights and BatchNorm statistics, seeding."""

from __future__ import annotations

import json

import pytest
import torch

from bench.analysis.inversion import InversionConfig, choose_seed_images, invert_feature
from bench.errors import BenchError
from bench.models import bn_state
from bench.models.resnet import ResNet18


def trained_bn_encoder(seed: int = 0) -> ResNet18:
    """A tiny encoder whose BatchNorm statistics are not the defaults (a few train-mode batches)."""
    torch.manual_seed(seed)
    enc = ResNet18(width=4)
    enc.train()
    with torch.no_grad():
        for _ in range(3):
            enc(torch.rand(8, 3, 16, 16))
    return enc


@pytest.fixture
def encoder():
    return trained_bn_encoder()


@pytest.fixture
def seeds():
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def active_coordinate(encoder, x) -> int:
    with torch.no_grad():
        encoder.eval()
        return int(encoder(x).min(0).values.argmax())


@pytest.mark.parametrize("direction", ["max", "min"])
def test_the_coordinate_moves_in_the_chosen_direction(encoder, seeds, direction):
    i = active_coordinate(encoder, seeds)
    out = invert_feature(encoder, seeds, coordinate=i, direction=direction, steps=12, step_size=0.25)
    assert out.values.shape == (13, 3)
    with torch.no_grad():
        first, last = encoder(seeds)[:, i], encoder(out.images)[:, i]
    assert torch.allclose(out.values[0], first, atol=1e-6) and torch.allclose(out.values[-1], last, atol=1e-6)
    moved = out.values[-1] - out.values[0]
    assert bool((moved > 0).all() if direction == "max" else (moved < 0).all()), out.values
    # mostly monotone: few steps go the wrong way (a minimised coordinate may sit at 0, the ReLU's floor)
    steps = out.values[1:] - out.values[:-1]
    share = ((steps >= 0) if direction == "max" else (steps <= 0)).float().mean()
    assert share > 0.7, out.values


@pytest.mark.parametrize("norm,eps,step", [("l2", 0.3, 0.2), ("linf", 4 / 255, 1 / 255)])
def test_delta_stays_in_its_budget_and_images_in_the_box(encoder, seeds, norm, eps, step):
    i = active_coordinate(encoder, seeds)
    out = invert_feature(encoder, seeds, coordinate=i, norm=norm, eps=eps, step_size=step, steps=8)
    delta = out.delta.flatten(1)
    size = delta.norm(dim=1) if norm == "l2" else delta.abs().max(dim=1).values
    assert (size <= eps + 1e-5).all(), size
    assert (size > 0.5 * eps).all(), "the budget should bind with these steps"
    assert out.images.min() >= 0 and out.images.max() <= 1


def test_default_budget_is_engstroms_large_l2_ball():
    cfg = InversionConfig()
    assert (cfg.direction, cfg.norm, cfg.eps, cfg.step_size, cfg.steps, cfg.coordinate) == ("max", "l2", 1000.0,
                                                                                             1.0, 200, 502)


def test_weights_bn_statistics_and_modes_are_untouched(encoder, seeds):
    encoder.train()
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    bn = bn_state(encoder)
    flags = [p.requires_grad for p in encoder.parameters()]
    invert_feature(encoder, seeds, coordinate=3, steps=3)
    assert encoder.training and all(m.training for m in encoder.modules())
    assert all(torch.equal(state[k], v) for k, v in encoder.state_dict().items())
    assert all(torch.equal(bn[k], v) for k, v in bn_state(encoder).items())
    assert [p.requires_grad for p in encoder.parameters()] == flags
    assert all(p.grad is None for p in encoder.parameters())


def test_seeded_and_recorded(encoder, seeds):
    a = invert_feature(encoder, seeds, coordinate=5, steps=4, seed_indices=[1, 2, 3])
    b = invert_feature(encoder, seeds, coordinate=5, steps=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.values, b.values)
    record = json.loads(json.dumps(a.to_record()))
    assert len(record["images"]) == 3 and len(record["images"][0]) == 16 and len(record["images"][0][0][0]) == 3
    assert len(record["values"]) == 5 and record["direction"] == "max" and record["coordinate"] == 5
    assert record["seed_indices"] == [1, 2, 3] and record["settings"]["steps"] == 4
    assert choose_seed_images(100, 5, 0) == choose_seed_images(100, 5, 0)
    assert len(set(choose_seed_images(100, 5, 0))) == 5 and choose_seed_images(100, 5, 0) != choose_seed_images(100, 5, 1)


def test_bad_settings_are_bench_errors(encoder, seeds):
    with pytest.raises(BenchError, match="outside this encoder's representation"):
        invert_feature(encoder, seeds, coordinate=502)  # width 4: 32 features
    with pytest.raises(BenchError, match="direction"):
        invert_feature(encoder, seeds, coordinate=0, direction="up")
    with pytest.raises(BenchError, match="seed images"):
        choose_seed_images(3, 5, 0)
