"""Data-parallel training on CPU with gloo: N processes train what one process trains, a killed
2-process job resumes, and a failing rank ends its job (bench.train.distributed, bench.executors.launch)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.errors import BenchError
from bench.executors.launch import rank_envs, run_group
from bench.train import distributed

TASK = Path(__file__).resolve().parent / "ddp_task.py"
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(TASK.parent))  # ddp_task: the task both the script and these tests build


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p), "BENCH_DIST_TIMEOUT_S": "120"}


def train(out: Path, processes: int, *args: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(TASK), str(out), *args]
    if processes == 1:
        code = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=600)
        assert code.returncode == 0, code.stdout[-2000:] + code.stderr[-2000:]
    else:
        code = run_group(command, env(), processes, out / "log.txt")
        assert code == 0, (out / "log.txt").read_text()[-3000:]
    return torch.load(out / "result.pt", weights_only=True)


def test_two_processes_with_synchronized_batchnorm_train_what_one_process_trains(tmp_path):
    """Same seed, same global batch (16; 43 images, so the last batch splits 6/5): the same loss
    curve and the same weights. float64 weights (the contrastive loss is float32 inside) so that
    the comparison is not drowned by float32 rounding, which this tiny ill-conditioned network
    amplifies to 1e-4 within a step in the single-process run itself."""
    one = train(tmp_path / "one", 1, "--double")
    two = train(tmp_path / "two", 2, "--double")
    assert two["run_info"]["world_size"] == 2 and two["run_info"]["backend"] == "gloo"
    assert two["run_info"]["batchnorm"] == "synchronized" and one["run_info"]["world_size"] == 1
    assert len(one["history"]) == len(two["history"]) == 2
    for a, b in zip(one["history"], two["history"]):
        for name in ("loss", "ce", "contrastive"):
            assert b[name] == pytest.approx(a[name], rel=1e-6), name
    for name, value in one["state"].items():
        assert torch.allclose(two["state"][name].double(), value.double(), rtol=0, atol=1e-6), name
    # only rank 0 wrote the checkpoint and the curves
    assert (tmp_path / "two" / "checkpoint.pt").is_file() and (tmp_path / "two" / "history.csv").is_file()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL data parallelism needs 2 CUDA GPUs "
                    "(docs/scaling.md lists the command for a GPU machine)")
def test_two_gpus_with_nccl_train_what_one_gpu_trains(tmp_path):
    one = train(tmp_path / "one", 1, "--double", "--device", "cuda")
    two = train(tmp_path / "two", 2, "--double", "--device", "cuda")
    assert two["run_info"]["backend"] == "nccl" and two["run_info"]["world_size"] == 2
    for a, b in zip(one["history"], two["history"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    for name, value in one["state"].items():
        assert torch.allclose(two["state"][name].double().cpu(), value.double().cpu(), rtol=0, atol=1e-5), name


@pytest.mark.slow
def test_fp16_loss_scaling_on_two_processes_follows_one_process(tmp_path):
    """The fp16 code path (autocast + GradScaler, gradients all-reduced before the scaler's
    unscale and inf check) on the CPU's fp16 kernels: the same scaler state, the same loss curve
    within fp16 precision. (`train.precision=fp16` itself is CUDA only: see the CUDA test.)"""
    one = train(tmp_path / "one", 1, "--precision", "fp16cpu", "--lr", "0.01")
    two = train(tmp_path / "two", 2, "--precision", "fp16cpu", "--lr", "0.01")
    scaler = [torch.load(tmp_path / w / "checkpoint.pt", weights_only=True)["scaler"] for w in ("one", "two")]
    assert scaler[0] == scaler[1] and scaler[0]["_growth_tracker"] == 6  # every step taken, on both
    for a, b in zip(one["history"], two["history"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)
    from ddp_task import TinyConfig, TinyTask

    start = TinyTask(TinyConfig(), torch.device("cpu")).model.state_dict()
    names = [k for k, v in start.items() if v.is_floating_point() and "running" not in k]
    moves = [torch.cat([(run["state"][k] - start[k]).flatten() for k in names]) for run in (one, two)]
    assert torch.nn.functional.cosine_similarity(*moves, dim=0) > 0.9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast with loss scaling runs on CUDA only "
                    "(docs/scaling.md lists the command for a GPU machine)")
def test_fp16_on_cuda_trains_within_tolerance_of_fp32(tmp_path):
    from ddp_task import TinyConfig, TinyTask, tiny_data

    from bench.train import fit

    results = {}
    for precision in ("fp32", "fp16"):
        task = TinyTask(TinyConfig(epochs=1, batch_size=16, lr=0.01, precision=precision, knn_every=0),
                        torch.device("cuda"))
        data = tiny_data()
        data = type(data)(data.x.cuda(), data.y.cuda(), data.classes, data.name)
        results[precision] = fit(task, data, seed=3, workdir=tmp_path / precision)
    assert results["fp16"][0]["loss"] == pytest.approx(results["fp32"][0]["loss"], rel=2e-2)


def test_per_device_batchnorm_needs_as_many_processes_as_it_names():
    from bench.config import TrainConfig
    from bench.train.loop import check_world

    with pytest.raises(BenchError, match="--gpus-per-job 2"):
        check_world(TrainConfig(bn_devices=2), distributed.SINGLE)
    check_world(TrainConfig(bn_devices=2), distributed.World(0, 2, 0, "gloo"))
    with pytest.raises(BenchError, match="bn_devices=2"):
        cfg = TrainConfig()
        cfg.bn_shards = 2  # AdvCL's one-device emulation of per-GPU statistics
        check_world(cfg, distributed.World(0, 2, 0, "gloo"))


@pytest.mark.slow
def test_per_device_batchnorm_on_two_processes_runs_and_is_recorded(tmp_path):
    two = train(tmp_path / "two", 2, "--bn-devices", "2", "--epochs", "1")
    assert two["run_info"]["batchnorm"] == "per device" and two["run_info"]["world_size"] == 2


def test_the_world_comes_from_the_launchers_variables_and_shards_split_the_batch():
    envs = rank_envs({}, 3, port=12345)
    assert [e["RANK"] for e in envs] == ["0", "1", "2"] and {e["MASTER_PORT"] for e in envs} == {"12345"}
    assert distributed.world_from_env(envs[2]) == distributed.World(2, 3, 2)
    assert distributed.world_from_env({}) == distributed.SINGLE
    with pytest.raises(BenchError):
        distributed.world_from_env({"RANK": "3", "WORLD_SIZE": "2"})
    assert distributed.shard_sizes(11, 2) == [6, 5] and distributed.shard_sizes(16, 4) == [4, 4, 4, 4]


def test_when_one_rank_fails_the_group_ends_every_rank_with_its_code(tmp_path):
    script = ("import os, sys, time\n"
              "if os.environ['RANK'] == '1': sys.exit(3)\n"
              "time.sleep(60)\n")
    code = run_group([sys.executable, "-c", script], dict(os.environ), 2, tmp_path / "log.txt")
    assert code == 3


@pytest.mark.slow
def test_a_killed_two_process_job_resumes_and_ends_as_an_uninterrupted_one(tmp_path):
    """`bench run --gpus-per-job 2` on CPU (gloo): SIGKILL the run after a checkpoint, run it again:
    both ranks resume from rank 0's checkpoint, and the job ends with the same history and the
    same encoder as a straight 2-process run."""
    import json
    import re
    import signal
    import time

    from bench.store import Store

    settings = ["encoder.width=4", "synthetic.n_train=200", "synthetic.n_test=32", "data.val_size=16",
                "simclr.epochs=4", "simclr.batch_size=32", "simclr.steps_per_epoch=2", "simclr.warmup_epochs=1"]
    grid = ["--methods", "simclr", "--datasets", "synthetic", "--seeds", "1", "--gpus", "none", "--slots", "2",
            "--gpus-per-job", "2"]

    def command(results: Path) -> list[str]:
        return [sys.executable, "-m", "bench", "run", *grid, "--results", str(results), *settings]

    killed, straight = Store(tmp_path / "killed"), Store(tmp_path / "straight")
    proc = subprocess.Popen(command(killed.root), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    checkpoints = []
    while not checkpoints and proc.poll() is None and time.time() < deadline:
        checkpoints = list(killed.root.glob("pretrain-*/checkpoint.pt"))
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before its first checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and both ranks at once
    proc.wait()
    (job,) = [p.parent for p in checkpoints]
    assert not (job / "record.json").exists(), "kill came too late: pretraining already finished"

    again = subprocess.run(command(killed.root), env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    log = (job / "log.txt").read_text()
    assert re.search(r"rank 1/2 .*resumed from \S+ at epoch [1-3]", log), log[-3000:]
    assert re.search(r"rank 0/2 .*resumed from \S+ at epoch [1-3]", log), log[-3000:]
    done = subprocess.run(command(straight.root), env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    a, b = killed.read(job.name), straight.read(job.name)
    assert a.metrics["training"]["world_size"] == 2 and a.provenance["run"]["processes"] == 2
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    enc = [torch.load(s.job_dir(job.name) / "encoder.pt", weights_only=True)["state"] for s in (killed, straight)]
    for name in enc[0]:
        assert torch.equal(enc[0][name], enc[1][name]), name
    rows = (job / "history.csv").read_text().splitlines()
    assert len(rows) == 1 + 4, rows  # one row per epoch, also across the resume
    assert json.loads((job / "record.json").read_text())["kind"] == "pretrain"
