"""Training precision (bench.train.precision), the loop's use of it, and strict fp32 in evaluation attacks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.attacks.pgd import eval_guard
from bench.config import TrainConfig
from bench.datasets import load
from bench.datasets.synthetic import Synthetic
from bench.errors import BenchError
from bench.attacks.accuracy import pgd_correct, tensor_batches
from bench.train import Trainable, fit
from bench.train.loop import CHECKPOINT, load_checkpoint
from bench.train.precision import describe, precision_flag, resolve_precision, strict_fp32, tf32


def tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.fixture
def tf32_on():
    """TF32 allowed outside (cuDNN's own default is on): code under test must turn it off itself."""
    with tf32(True):
        yield


class Spy(nn.Module):
    """A linear classifier that records, at every forward, autocast and the TF32 flags."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 4)
        self.seen: list[tuple] = []

    def forward(self, x):
        out = self.fc(x.flatten(1))
        self.seen.append((torch.is_autocast_enabled(x.device.type), out.dtype, *tf32_flags()))
        return out


class SpyTask(Trainable):
    def __init__(self, **cfg):
        self.cfg = TrainConfig(**{"epochs": 1, "batch_size": 8, "lr": 0.1, **cfg})
        torch.manual_seed(0)
        self.model = Spy()

    def training_step(self, x, y, index, info):
        return {"loss": nn.functional.cross_entropy(self.model(x).float(), y)}


@pytest.fixture(scope="module")
def data():
    return load("synthetic", "train", cfg=Synthetic.Config(n_train=16, num_classes=4, image_size=8), val_size=0)


def test_what_runs_on_a_cpu():
    assert describe("cpu", "fp32") == {"asked": "fp32", "ran": "fp32", "device": "cpu", "autocast_dtype": None,
                                       "tf32": False, "grad_scaler": False}
    assert describe("cpu", "tf32")["ran"] == "fp32"  # no TF32 on a CPU: strict fp32, and the record says so
    assert describe("cpu", "bf16") == {"asked": "bf16", "ran": "bf16", "device": "cpu", "autocast_dtype": "bfloat16",
                                       "tf32": False, "grad_scaler": False}
    assert precision_flag("cpu", "fp32") is None and precision_flag("cpu", "tf32") is None
    assert precision_flag("cpu", "bf16") == "precision=bf16"
    with pytest.raises(BenchError, match="fp16 needs a CUDA GPU.*bf16 or fp32"):
        resolve_precision("cpu", "fp16")
    with pytest.raises(BenchError, match="not one of"):
        resolve_precision("cpu", "fp64")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_what_runs_on_a_gpu():
    assert describe("cuda", "fp32")["tf32"] is False
    assert describe("cuda", "tf32") == {"asked": "tf32", "ran": "tf32", "device": "cuda", "autocast_dtype": None,
                                        "tf32": True, "grad_scaler": False}
    assert precision_flag("cuda", "tf32") == "precision=tf32"
    cuda_data = load("synthetic", "train", cfg=Synthetic.Config(n_train=16, num_classes=4, image_size=8),
                     val_size=0, device=torch.device("cuda"))
    with tf32(False):
        task = SpyTask(precision="tf32")
        task.model.cuda()
        fit(task, cuda_data, seed=0)
        assert set(task.model.seen) == {(False, torch.float32, True, True)} and tf32_flags() == (False, False)
    fp16 = describe("cuda", "fp16")
    assert fp16["autocast_dtype"] == "float16" and fp16["grad_scaler"]
    assert precision_flag("cuda", "fp16") == "precision=fp16"


def test_tf32_switch_restores_the_flags():
    before = tf32_flags()
    with tf32(True):
        assert tf32_flags() == (True, True)
        with strict_fp32():
            assert tf32_flags() == (False, False)
        assert tf32_flags() == (True, True)
    assert tf32_flags() == before


def test_fp32_training_turns_tf32_off_and_bf16_autocasts(data, tf32_on):
    task = SpyTask()
    fit(task, data, seed=0)
    assert task.model.seen and set(task.model.seen) == {(False, torch.float32, False, False)}
    assert tf32_flags() == (True, True)  # restored after training
    task = SpyTask(precision="bf16")
    fit(task, data, seed=0)
    assert set(task.model.seen) == {(True, torch.bfloat16, False, False)}
    task = SpyTask(precision="tf32")  # on a CPU: strict fp32, as `describe` reports
    fit(task, data, seed=0)
    assert set(task.model.seen) == {(False, torch.float32, False, False)}


def test_fp16_on_a_cpu_is_refused_before_any_step(data):
    task = SpyTask(precision="fp16")
    with pytest.raises(BenchError, match="fp16 needs a CUDA GPU"):
        fit(task, data, seed=0)
    assert task.model.seen == []


def test_evaluation_attacks_run_in_strict_fp32_under_any_training_precision(data, tf32_on):
    model = Spy().eval()
    x, y = data.images(slice(0, 8)), data.y[:8]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # e.g. a finetuner's validation inside a bf16 run
        pgd_correct(model, tensor_batches(x, y, 8), eps=8 / 255, alpha=2 / 255, steps=2, seed=0)
        with eval_guard(model):
            model(x)
    assert model.seen and set(model.seen) == {(False, torch.float32, False, False)}
    assert tf32_flags() == (True, True)


def test_autoattack_runs_in_strict_fp32(data, tf32_on):
    pytest.importorskip("pyautoattack")
    from bench.attacks.autoattack import run_autoattack

    model = Spy().eval()
    x, y = data.images(slice(0, 8)), data.y[:8]
    run_autoattack(model, x, y, eps=8 / 255, num_classes=4, seed=0, batch_size=8, budget=0.01)
    assert model.seen and {s[2:] for s in model.seen} == {(False, False)}
    assert tf32_flags() == (True, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_training_scales_the_loss_and_resumes_exactly(tmp_path):
    cuda_data = load("synthetic", "train", cfg=Synthetic.Config(n_train=32, num_classes=4, image_size=8),
                     val_size=0, device=torch.device("cuda"))

    def task():
        t = SpyTask(precision="fp16", epochs=3)
        t.model.cuda()
        return t

    straight = task()
    fit(straight, cuda_data, seed=1, workdir=tmp_path / "a")
    state = load_checkpoint(tmp_path / "a" / CHECKPOINT)
    assert state["scaler"] and state["scaler"]["scale"] > 0
    assert {s[:2] for s in straight.model.seen} == {(True, torch.float16)}
    first = task()
    fit(first, cuda_data, seed=1, workdir=tmp_path / "b", stop_after_epoch=2)
    resumed = task()
    fit(resumed, cuda_data, seed=1, workdir=tmp_path / "b")
    for a, b in zip(straight.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
