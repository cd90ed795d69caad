"""Pretraining resumes exactly, and the pretrain job writes its encoder and record."""

import pytest
import torch

from bench.jobs import Job
from bench.models import load_encoder
from bench.pretraining import pretrain
from bench.stages.base import get_stage, run_stage
from bench.stages.pretrain import ENCODER
from bench.store import Store


def settings(method: str) -> dict:
    return {"encoder.width": 4, "synthetic.n_train": 48, "data.val_size": 0,
            f"{method}.epochs": 4, f"{method}.batch_size": 16, f"{method}.warmup_epochs": 1,
            **({f"{method}.attack_steps": 1} if method != "simclr" else {})}


# AdvCL replays BatchNorm updates and reads pseudo-labels (random stand-ins here); RoCL runs LARS
# and an eval-mode attack: each has state a resume must restore exactly.
@pytest.mark.parametrize("method", ["simclr", "acl", "advcl", "rocl", "supervised_at"])
def test_resume_is_bit_identical_to_a_straight_run(method, tmp_path):
    straight, history = pretrain(method, "synthetic", settings(method), seed=7, workdir=tmp_path / "a")
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    _, partial = pretrain(method, "synthetic", settings(method), seed=7, workdir=tmp_path / "b", stop_after_epoch=2)
    assert len(partial) == 2
    resumed, history_b = pretrain(method, "synthetic", settings(method), seed=7, workdir=tmp_path / "b")
    assert history_b == history
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_pretrain_job_writes_encoder_and_returns_its_record(tmp_path):
    config = {"encoder": {"width": 4}, "data": {"val_size": 0}, "synthetic": {"n_train": 32},
              "simclr": {"epochs": 1, "batch_size": 16, "warmup_epochs": 0}}
    job = Job(kind="pretrain", key="pretrain-simclr-test", seed=0, method="simclr", source="synthetic", config=config)
    store = Store(tmp_path)
    record = run_stage(job, store, "cpu")
    assert (record.kind, record.key, record.method, record.source, record.config) == (
        "pretrain", job.key, "simclr", "synthetic", config)
    assert record.metrics["epochs"] == 1 and record.metrics["train_images_per_s"] > 0
    assert record.metrics["train_images"] == 32 and record.metrics["pretrain_split"] == "train+val"
    assert len(record.history) == 1 and record.provenance["device"].startswith("cpu")
    assert set(record.artifacts) == {ENCODER} and record.artifacts[ENCODER]["size"] > 0
    encoder = load_encoder(store.job_dir(job.key) / ENCODER)
    assert encoder.width == 4 and encoder.branches == ("normal",) and encoder.meta["image_size"] == 32
    assert not store.has(job.key)  # done only once its record is written
    store.write(record)
    assert store.read(job.key).metrics["epochs"] == 1
    loaded = get_stage("pretrain").load(store.job(job.key), "cpu")  # what a downstream job receives
    assert torch.equal(loaded.conv1.weight, encoder.conv1.weight)
