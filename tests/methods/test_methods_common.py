"""Every registered method (built-in or third-party) gets these tests by being registered.

A method may declare `test_settings` (config overrides, e.g. fewer attack steps) to stay fast.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from bench.config import EncoderConfig, TrainConfig, from_dict, resolve, to_dict
from bench.datasets import load
from bench.datasets.synthetic import Synthetic
from bench.method import Method, MethodContext
from bench.models import BranchedBatchNorm2d, ResNet18
from bench.models.norm import BranchedBatchNorm1d
from bench.pretraining import placeholder_inputs
from bench.registry import METHODS
from bench.train import StepInfo, build_optimizer, fit

WIDTH, BATCH = 4, 8
FALL_STEPS = 30
NAMES = METHODS.names()


@pytest.fixture(scope="module")
def data():
    return load("synthetic", "train", cfg=Synthetic.Config(n_train=32, n_test=8), val_size=0)


def make(name: str, data, **overrides) -> Method:
    cls = METHODS.get(name)
    settings = {"batch_size": BATCH, "epochs": 1, "warmup_epochs": 0, "steps_per_epoch": 1,
                **getattr(cls, "test_settings", {}), **overrides}
    cfg = from_dict(cls.Config, settings, name)
    ctx = MethodContext(EncoderConfig(width=WIDTH), data.num_classes, torch.device("cpu"),
                        placeholder_inputs(cls, cfg, data, EncoderConfig(width=WIDTH)))
    torch.manual_seed(0)
    return cls(cfg, ctx)


def fixed_batch(data):
    return data.images(slice(0, BATCH)), data.y[:BATCH], data.indices[:BATCH]


@pytest.mark.parametrize("name", NAMES)
def test_config_defaults_validate(name):
    cls = METHODS.get(name)
    assert issubclass(cls, Method) and issubclass(cls.Config, TrainConfig)
    defaults = cls.Config()
    again = from_dict(cls.Config, to_dict(defaults), name)  # every default passes its own rules
    assert dataclasses.asdict(again) == dataclasses.asdict(defaults)
    assert name in resolve({}, [name]).sections
    assert cls.encoder_branch in cls.branches


@pytest.mark.parametrize("name", NAMES)
def test_one_step_trains_and_export_matches_the_encoder_branch(name, data):
    method = make(name, data)
    before = {k: v.clone() for k, v in method.model.state_dict().items()}
    history = fit(method, data, seed=0)
    assert len(history) == 1 and torch.isfinite(torch.tensor(history[0]["loss"]))
    changed = [k for k, v in method.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("encoder.") and k.endswith("weight") for k in changed), "encoder weights did not move"

    exported = method.export_encoder()
    assert isinstance(exported, ResNet18) and not exported.training
    assert exported.branches == (method.encoder_branch,)
    assert not any(isinstance(m, (BranchedBatchNorm2d, BranchedBatchNorm1d)) for m in exported.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in exported.modules()) == 1 + 8 * 2 + 3
    assert exported.normalize.kind == method.normalize
    x = data.images(slice(0, 4))
    method.model.eval()
    with torch.no_grad():
        expected = method.encoder(x, branch=method.encoder_branch)
        assert torch.allclose(exported(x), expected, atol=1e-5)
    assert method.model.encoder is not exported  # a copy: later training cannot change it


@pytest.mark.parametrize("name", [n for n in NAMES if not METHODS.get(n).uses_labels])
def test_self_supervised_methods_never_read_labels(name, data):
    x, y, index = fixed_batch(data)
    losses = []
    for labels in (y, torch.full_like(y, -1)):  # -1 would break any use of the labels
        method = make(name, data)  # same initial weights and statistics each time
        method.train_mode()
        torch.manual_seed(0)
        losses.append(method.training_step(x, labels, index, StepInfo(0, 0, 0, 1, method.cfg.lr))["loss"].detach())
    assert torch.equal(losses[0], losses[1])


@pytest.mark.parametrize("name", NAMES)
def test_loss_falls_on_a_fixed_batch(name, data):
    """FALL_STEPS steps on one batch, the views' randomness fixed: the last losses beat the first."""
    method = make(name, data)
    optimizer = build_optimizer(method.trainable_parameters(), method.cfg)
    x, y, index = fixed_batch(data)
    method.train_mode()
    losses = []
    for step in range(FALL_STEPS):
        torch.manual_seed(0)
        out = method.training_step(x, y, index, StepInfo(0, step, step, FALL_STEPS, method.cfg.lr))
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        losses.append(float(out["loss"].detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses


def test_profile_command_times_a_method_and_rejects_unknown_names():
    from click.testing import CliRunner

    from bench.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["profile", "--methods", NAMES[0], "--device", "cpu", "--steps", "1",
                                  "--batch-size", "8", "--width", "4"])
    assert result.exit_code == 0, result.output
    assert NAMES[0] in result.output and "images/s" in result.output
    bad = runner.invoke(main, ["profile", "--methods", "simclrr", "--device", "cpu"])
    assert bad.exit_code == 2 and "Did you mean 'simclr'" in bad.output
