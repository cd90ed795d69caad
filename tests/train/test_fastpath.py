"""GPU fast paths behind settings: channels-last, cudnn.benchmark, torch.compile (bench.train.fastpath)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from bench.attacks.compiled import attack_step, attack_steps_compiled
from bench.train import fastpath, fit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_task import TinyConfig, TinyTask, tiny_data  # noqa: E402


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU "
                                                     "(docs/scaling.md lists the command for a GPU machine)"))


def on(device: str):
    data = tiny_data()
    return type(data)(data.x.to(device), data.y.to(device), data.classes, data.name)


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_channels_last_converts_the_weights_trains_the_same_and_is_recorded(device):
    plain = TinyTask(TinyConfig(epochs=1, batch_size=16, steps_per_epoch=2, knn_every=0), torch.device(device))
    fast = TinyTask(TinyConfig(epochs=1, batch_size=16, steps_per_epoch=2, knn_every=0, channels_last=True,
                               cudnn_benchmark=True), torch.device(device))
    a, b = fit(plain, on(device), seed=0), fit(fast, on(device), seed=0)
    assert fast.run_info["channels_last"] and not fast.run_info["compile"]
    # cudnn.benchmark runs on CUDA only: on the CPU it does not, and the record says so
    assert fast.run_info["cudnn_benchmark"] == (device == "cuda")
    assert fast.model.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.model.encoder.channels_last and not plain.model.encoder.channels_last
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-5 if device == "cpu" else 1e-3)


def test_cudnn_benchmark_is_set_for_the_run_and_restored():
    seen = []
    with fastpath.cudnn_benchmark(True):
        seen.append(torch.backends.cudnn.benchmark)
    assert seen == [True] and torch.backends.cudnn.benchmark is False


def test_the_fast_paths_are_not_part_of_a_jobs_key():
    from bench.grid import key_settings

    base = {"simclr": {"epochs": 2, "bn_devices": 0}}
    fast = {"simclr": {"epochs": 2, "bn_devices": 0, "compile": True, "channels_last": True,
                       "cudnn_benchmark": True, "knn_every": 5, "knn_images": 100}}
    assert key_settings(base) == key_settings(fast) == {"simclr": {"epochs": 2}}
    assert key_settings({"simclr": {"bn_devices": 2}}) == {"simclr": {"bn_devices": 2}}  # results differ: in it


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_a_compiled_training_step_gives_the_eager_loss_and_gradients(device):
    """`train.compile`: the encoder compiled in place (torch.compile, inductor) gives the eager
    loss and gradients of a training step; the compiled attack step update gives the eager
    adversarial images; an adversarial step end to end stays within the float tolerance that a
    sign step allows (a gradient entry near 0 may flip its sign, moving that pixel by 2 alpha)."""
    ok, why = fastpath.compile_available()
    if not ok:
        pytest.skip(why)
    import torch.nn.functional as F

    import importlib

    pgd_module = importlib.import_module("bench.attacks.pgd")  # the module (bench.attacks.pgd is also its function)

    eager = TinyTask(TinyConfig(), torch.device(device))
    compiled = copy.deepcopy(eager)
    x, y = tiny_data(16).images(slice(None)).to(device), tiny_data(16).y.to(device)

    def clean_step(task):
        loss = F.cross_entropy(task.model.head(task.model.encoder(x)), y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None}
        task.model.zero_grad()
        return float(loss.detach()), grads

    def adversarial_step(task):
        model = task.model
        adv = pgd_module.pgd(lambda advs: F.cross_entropy(model.head(model.encoder(advs[0])), y), x, eps=8 / 255,
                             alpha=2 / 255, steps=2, random_start=None, freeze=model)
        return float(F.cross_entropy(model.head(model.encoder(adv)), y).detach())

    for task in (eager, compiled):
        task.model.train()
    try:
        fastpath.compile_encoder(compiled.model)
        loss_c, grads_c = clean_step(compiled)
    except Exception as exc:  # noqa: BLE001 - a compiler that cannot build here (no C++ toolchain, ...)
        pytest.skip(f"torch.compile cannot run on this build: {type(exc).__name__}: {exc}"[:300])
    loss_e, grads_e = clean_step(eager)
    assert loss_c == pytest.approx(loss_e, rel=1e-5)
    assert grads_e.keys() == grads_c.keys()
    # the yardstick: how far eager float32 itself is from float64
    exact = copy.deepcopy(eager)
    exact.model.double()
    x64 = x.double()
    loss = F.cross_entropy(exact.model.head(exact.model.encoder(x64)), y)
    loss.backward()
    grads_64 = {n: p.grad for n, p in exact.model.named_parameters() if p.grad is not None}
    for name in grads_e:
        scale = grads_64[name].norm()
        eager_error = float((grads_e[name].double() - grads_64[name]).norm() / scale)
        compiled_error = float((grads_c[name].double() - grads_64[name]).norm() / scale)
        # measured on the CPU's inductor: up to 2.5e-3 relative (conv1, the far end of the backward)
        # where eager float32 is within 1e-5 of float64: the fused BatchNorm backward rounds otherwise
        assert compiled_error <= max(4 * eager_error, 1e-2), (name, compiled_error, eager_error)

    g = torch.randn_like(x)
    with attack_steps_compiled(True):
        step = attack_step(pgd_module._linf_step)
        assert step is not pgd_module._linf_step
        assert torch.equal(step(x + 0.01, g, x, 8 / 255, 2 / 255), pgd_module._linf_step(x + 0.01, g, x, 8 / 255, 2 / 255))
        adv_c = adversarial_step(compiled)
    assert adversarial_step(eager) == pytest.approx(adv_c, rel=1e-2)
