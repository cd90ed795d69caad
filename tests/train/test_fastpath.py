"""GPU fast paths behind settings: channels-last, cudnn.benchmark, torch.compile (bench.train.fastpath)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from bench.train import fastpath, fit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_task import TinyConfig, TinyTask, tiny_data  # noqa: E402


def test_channels_last_converts_the_weights_trains_the_same_and_is_recorded():
    plain = TinyTask(TinyConfig(epochs=1, batch_size=16, steps_per_epoch=2, knn_every=0), torch.device("cpu"))
    fast = TinyTask(TinyConfig(epochs=1, batch_size=16, steps_per_epoch=2, knn_every=0, channels_last=True,
                               cudnn_benchmark=True), torch.device("cpu"))
    a, b = fit(plain, tiny_data(), seed=0), fit(fast, tiny_data(), seed=0)
    assert fast.run_info["channels_last"] and not fast.run_info["compile"]
    assert not fast.run_info["cudnn_benchmark"]  # CUDA only: on the CPU it does not run, and says so
    assert fast.model.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.model.encoder.channels_last and not plain.model.encoder.channels_last
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-5)


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
def test_a_compiled_training_step_gives_the_eager_loss_and_gradients():
    """The encoder compiled in place and the attack's step update compiled (torch.compile on the
    CPU's inductor backend): one adversarial training step, same loss and gradients as eager."""
    ok, why = fastpath.compile_available()
    if not ok:
        pytest.skip(why)
    from bench.attacks.pgd import pgd
    import torch.nn.functional as F

    eager = TinyTask(TinyConfig(), torch.device("cpu"))
    compiled = copy.deepcopy(eager)
    x, y = tiny_data(16).images(slice(None)), tiny_data(16).y

    def step(task):
        model = task.model
        with torch.no_grad():
            pass
        adv = pgd(lambda advs: F.cross_entropy(model.head(model.encoder(advs[0])), y), x, eps=8 / 255,
                  alpha=2 / 255, steps=2, random_start=None, freeze=model)
        loss = F.cross_entropy(model.head(model.encoder(adv)), y)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for task in (eager, compiled):
        task.model.train()
    loss_e, grads_e = step(eager)
    try:
        fastpath.compile_encoder(compiled.model)
        with fastpath.attack_steps_compiled(True):
            loss_c, grads_c = step(compiled)
    except Exception as exc:  # noqa: BLE001 - a compiler that cannot build here (no C++ toolchain, ...)
        if "compile" in type(exc).__module__ or "inductor" in str(exc).lower():
            pytest.skip(f"torch.compile cannot run on this CPU build: {exc}")
        raise
    assert loss_c == pytest.approx(float(loss_e), rel=1e-5)
    assert grads_e.keys() == grads_c.keys()
    for name in grads_e:
        assert torch.allclose(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6), name
