"""The one training loop: NaN guard, schedules, checkpoints."""

import math

import pytest
import torch
from torch import nn

from bench.config import TrainConfig
from bench.datasets import load
from bench.datasets.synthetic import Synthetic
from bench.errors import NonFiniteLoss
from bench.train import Trainable, fit, lr_at
from bench.train.loop import CHECKPOINT


class Linear(Trainable):
    """A tiny classifier on flattened 8x8 images; `poison` makes its loss NaN."""

    def __init__(self, poison: bool = False, **cfg):
        self.cfg = TrainConfig(**{"epochs": 2, "batch_size": 8, "lr": 0.1, **cfg})
        torch.manual_seed(0)
        self.model = nn.Linear(3 * 8 * 8, 4)
        self.poison = poison

    def training_step(self, x, y, index, info):
        loss = nn.functional.cross_entropy(self.model(x.flatten(1)), y)
        return {"loss": loss * float("nan") if self.poison else loss}


@pytest.fixture(scope="module")
def data():
    return load("synthetic", "train", cfg=Synthetic.Config(n_train=32, num_classes=4, image_size=8), val_size=0)


def test_nan_loss_stops_with_a_clear_message(data, tmp_path):
    with pytest.raises(NonFiniteLoss, match=r"loss became nan at epoch 1, step 1 .*lower the learning rate"):
        fit(Linear(poison=True), data, seed=0, workdir=tmp_path)
    assert not (tmp_path / CHECKPOINT).exists()  # nothing written from a diverged run


def test_a_healthy_run_writes_history_and_checkpoint(data, tmp_path):
    history = fit(Linear(), data, seed=0, workdir=tmp_path)
    assert [h["epoch"] for h in history] == [1, 2] and all(math.isfinite(h["loss"]) for h in history)
    assert (tmp_path / CHECKPOINT).is_file()


def test_warmup_then_cosine():
    c = TrainConfig(epochs=10, lr=1.0, warmup_epochs=2, warmup_from=0.1, min_lr=0.0)
    assert lr_at(c, 0, 0, 10) == pytest.approx(0.1)
    assert lr_at(c, 1, 0, 10) == pytest.approx(0.55)       # linear, per iteration
    assert lr_at(c, 1, 5, 10) == pytest.approx(0.775)
    assert lr_at(c, 2, 0, 10) == pytest.approx(1.0)
    assert lr_at(c, 6, 0, 10) == pytest.approx(0.5)        # cosine midpoint of epochs 2..10
    assert lr_at(c, 9, 9, 10) == pytest.approx((1 + math.cos(math.pi * 7.9 / 8)) / 2)
    assert lr_at(TrainConfig(epochs=10, lr=1.0, min_lr=0.2), 5, 0, 10) == pytest.approx(0.6)


def test_step_decay_and_constant():
    c = TrainConfig(epochs=10, lr=0.1, schedule="step", decay_at=(0.3, 0.6), gamma=0.1)
    assert [lr_at(c, e, 0, 10) for e in range(8)] == pytest.approx([0.1] * 3 + [0.01] * 3 + [0.001] * 2)
    short = TrainConfig(epochs=10, lr=0.1, schedule="step", decay_at=(0.6, 0.8))  # SLF's 15/25, 20/25 at 10 epochs
    assert [lr_at(short, e, 0, 10) for e in (5, 6, 7, 8)] == pytest.approx([0.1, 0.01, 0.01, 0.001])
    assert lr_at(TrainConfig(lr=0.3, schedule="constant", epochs=5), 4, 9, 10) == 0.3


def test_a_damaged_checkpoint_restarts_training_instead_of_failing(data, tmp_path, caplog):
    straight = Linear(epochs=2)
    expected = fit(straight, data, seed=0)
    (tmp_path / CHECKPOINT).write_bytes(b"not a checkpoint")  # e.g. truncated by a full disk
    history = fit(Linear(epochs=2), data, seed=0, workdir=tmp_path)
    assert "damaged checkpoint" in caplog.text and [h["epoch"] for h in history] == [1, 2]
    assert history == expected


def test_resume_continues_exactly(data, tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    straight = Linear(epochs=4)
    fit(straight, data, seed=3, workdir=tmp_path / "a")
    first = Linear(epochs=4)
    fit(first, data, seed=3, workdir=tmp_path / "b", stop_after_epoch=2)
    resumed = Linear(epochs=4)
    history = fit(resumed, data, seed=3, workdir=tmp_path / "b")
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key])


def test_a_final_batch_too_small_for_batchnorm_is_dropped():
    from bench.train.loop import epoch_steps

    assert epoch_steps(50_000, 512, drop_last=False) == 98   # the official loaders' last batch of 336 is kept
    assert epoch_steps(50_000, 512, drop_last=True) == 97
    assert epoch_steps(17, 8, drop_last=False) == 2          # 8, 8 and a last image alone: dropped
    assert epoch_steps(18, 8, drop_last=False) == 3
    assert epoch_steps(19, 8, drop_last=False, min_batch=4) == 2  # a last batch of 3 < 4
    assert epoch_steps(20, 8, drop_last=False, min_batch=4) == 3
    assert epoch_steps(1, 8, drop_last=False) == 0 and epoch_steps(26, 8, drop_last=False, max_steps=2) == 2


class BatchNormNet(Linear):
    drop_last = False

    def __init__(self, **cfg):
        super().__init__(**cfg)
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6), nn.BatchNorm1d(6), nn.Linear(6, 4))
        self.sizes: list[int] = []

    def training_step(self, x, y, index, info):
        self.sizes.append(len(x))
        return {"loss": nn.functional.cross_entropy(self.model(x), y)}


def test_the_last_partial_batch_is_trained_on_unless_it_is_one_image():
    data = load("synthetic", "train", cfg=Synthetic.Config(n_train=17, num_classes=4, image_size=8), val_size=0)
    task = BatchNormNet(epochs=1, batch_size=8)
    fit(task, data, seed=0)  # a train-mode BatchNorm1d would fail on the 17th image alone
    assert task.sizes == [8, 8]
    data = load("synthetic", "train", cfg=Synthetic.Config(n_train=19, num_classes=4, image_size=8), val_size=0)
    task = BatchNormNet(epochs=1, batch_size=8)
    fit(task, data, seed=0)
    assert task.sizes == [8, 8, 3]
