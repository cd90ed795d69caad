"""The whole finetune + evaluate path on real CIFAR-10 (../shared/data, via BENCH_DATA_DIR).

A tiny ResNet-18 (width 8) is pretrained for under a minute of CPU by a registered pretrainer
(supervised_at, PGD-1, through the real pretrain job) on the (JPEG-decoded) training set; its
encoder goes through the real finetune job (SLF) and the real evaluate job (SA, PGD-20,
AutoAttack from pyautoattack, sweeps), and the record round-trips through the store. Skipped,
with the reason, when the data is not there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.attacks.autoattack import from_bits
from bench.config import resolve
from bench.datasets import load
from bench.attacks.accuracy import clean_correct, image_batches
from bench.evaluation import EVAL_STATE
from bench.models import load_classifier
from bench.stages.base import run_stage
from bench.stages.finetune import CLASSIFIER
from bench.jobs import Job
from bench.record import Metric
from bench.store import Store

# PGD-1 adversarial training, 160 steps of 64 images (~45 s of one CPU core); SLF on its encoder
# then scores ~0.29 on the test set (chance 0.1), PGD-20 ~0.16.
PRETRAIN = {"encoder.width": 8, "supervised_at.epochs": 1, "supervised_at.steps_per_epoch": 160,
            "supervised_at.batch_size": 64, "supervised_at.attack_steps": 1, "supervised_at.schedule": "cosine"}
# SLF's head on 5,000 training images: batch 64 and lr 0.03 (not 512 and 0.01), so that 2 epochs
# are enough steps. AutoAttack costs ~70 s here whatever aa_n: some samples survive APGD-CE, and
# APGD-T, FAB-T and Square then run their full iterations on them (tiny batches, overhead-bound).
FINETUNE = {"data.train_limit": 5000, "slf.epochs": 2, "slf.batch_size": 64, "slf.lr": 0.03, "eval.val_n": 200,
            "eval.selection_steps": 5, "eval.batch_size": 250, "eval.n": 256, "eval.aa_n": 16, "eval.sweep_n": 32,
            "eval.sweep_eps": [2, 8], "eval.sweep_steps": [1, 5]}
FIRST_LABELS = [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
TEST_MEAN = (0.4942, 0.4851, 0.4504)
# the published cifar10_test.npz (../shared/data/README.md): lossless, in the original test_batch order
TEST_SHA256 = "deed1e6f451526907a3528d0687dc225328d4a8018902a17d33867e6246afa93"


def _data_dir() -> Path | None:
    candidates = [Path(os.environ["BENCH_DATA_DIR"])] if os.environ.get("BENCH_DATA_DIR") else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for path in candidates:
        if (path / "cifar10_test.npz").is_file() and (path / "cifar10_train.npz").is_file():
            return path
    return None


@pytest.fixture(scope="module")
def data_dir() -> Path:
    path = _data_dir()
    if path is None:
        pytest.skip("real CIFAR-10 (cifar10_test.npz and cifar10_train.npz) not found: "
                    "set BENCH_DATA_DIR to the folder holding them (../shared/data)")
    return path


@pytest.fixture(scope="module")
def test_set(data_dir):
    return load("cifar10", "test", data_dir=data_dir)


def test_loader_returns_the_real_test_set(test_set):
    assert len(test_set) == 10_000 and test_set.x.shape == (10_000, 3, 32, 32) and test_set.x.dtype == torch.uint8
    assert test_set.y[:10].tolist() == FIRST_LABELS
    assert torch.bincount(test_set.y, minlength=10).tolist() == [1000] * 10
    mean = test_set.x.double().mean(dim=(0, 2, 3)) / 255
    assert mean.tolist() == pytest.approx(TEST_MEAN, abs=2e-4)
    assert test_set.classes[:3] == ["airplane", "automobile", "bird"]


def test_loader_returns_exactly_the_published_test_file(data_dir, test_set):
    path = data_dir / "cifar10_test.npz"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    assert digest.hexdigest() == TEST_SHA256, f"{path} is not the published CIFAR-10 test file"
    with np.load(path, allow_pickle=False) as published:
        x, y = published["x"], published["y"]
    assert x.shape == (10_000, 32, 32, 3) and x.dtype == np.uint8
    # every pixel and label: the loader's NCHW images are the file's NHWC ones transposed, in order
    assert torch.equal(test_set.x, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert torch.equal(test_set.y, torch.from_numpy(y).to(torch.int64))
    assert test_set.indices.tolist() == list(range(10_000))


def test_validation_split_is_carved_from_training_only(data_dir):
    train = load("cifar10", "train", data_dir=data_dir, val_size=5000)
    val = load("cifar10", "val", data_dir=data_dir, val_size=5000)
    assert len(train) == 45_000 and len(val) == 5_000
    assert not set(train.indices.tolist()) & set(val.indices.tolist())
    assert sorted(train.indices.tolist() + val.indices.tolist()) == list(range(50_000))


@pytest.fixture(scope="module")
def pipeline(data_dir, test_set, tmp_path_factory):
    """The real pretrain (supervised_at), finetune (SLF) and evaluate jobs; returns what they made."""
    store = Store(tmp_path_factory.mktemp("results"))
    pre_config = resolve(PRETRAIN, ["supervised_at"]).as_dict()
    pre = Job(kind="pretrain", key="pretrain-supervised_at-cifar10-s0-000000000000", seed=0, method="supervised_at",
              source="cifar10", config={k: pre_config[k] for k in ("encoder", "data", "supervised_at")},
              data_dir=str(data_dir))
    pre_record = run_stage(pre, store, "cpu")
    store.write(pre_record)

    config = resolve(FINETUNE, ["slf"]).as_dict()
    ft = Job(kind="finetune", key="finetune-supervised_at-slf-cifar10-s0-000000000000", seed=0,
             method="supervised_at", finetuner="slf", source="cifar10", target="cifar10",
             config={k: config[k] for k in ("encoder", "data", "eval", "slf")}, deps={"encoder": pre.key},
             data_dir=str(data_dir))
    ft_record = run_stage(ft, store, "cpu")
    store.write(ft_record)
    ev = Job(kind="evaluate", key="evaluate-supervised_at-slf-cifar10-s0-000000000000", seed=0,
             method="supervised_at", finetuner="slf", source="cifar10", target="cifar10",
             config={"eval": config["eval"]}, deps={"classifier": ft.key}, data_dir=str(data_dir))
    ev_record = run_stage(ev, store, "cpu")
    store.write(ev_record)
    return {"store": store, "pre": pre_record, "ft": ft_record, "ev": ev_record, "ev_job": ev}


@pytest.mark.slow
def test_slf_on_a_pretrained_encoder_beats_chance_and_attacks_order_correctly(pipeline, test_set):
    store = pipeline["store"]
    classifier = load_classifier(store.job_dir(pipeline["ft"].key) / CLASSIFIER)
    slf_acc = clean_correct(classifier, image_batches(test_set.first(1000), 500)).float().mean().item()
    pretrain_s = pipeline["pre"].provenance["duration_s"]
    assert slf_acc > 0.2, f"SLF on the encoder pretrained {pretrain_s:.0f} s: {slf_acc:.3f} on 1000 test images"
    assert pipeline["ft"].metrics["selected_epoch"] in (1, 2) and pipeline["ft"].flags == []

    m = pipeline["ev"].metrics
    sa, ra, aa = m["sa"], m["ra"], m["aa"]
    assert sa["n"] == ra["n"] == 256 and aa["n"] == 16
    assert sa["value"] > 0.2
    assert ra["value"] < sa["value"]  # PGD-20 finds adversarial examples
    # AA against PGD-20 on the same images: the evaluation's own per-sample flags (its saved stages).
    # Different attacks, so not sample by sample: AA's accuracy must not exceed the 95% interval of
    # PGD-20's on those images (the evaluation's sanity check, with like compared with like).
    stages = json.loads((store.job_dir(pipeline["ev_job"].key) / EVAL_STATE).read_text())["parts"]
    pgd = from_bits(stages["pgd"]["result"]["robust"])
    aa_robust = from_bits(stages["autoattack"]["result"]["robust"])
    assert int(pgd.sum()) == ra["correct"] and int(aa_robust.sum()) == aa["correct"]  # the record's numbers
    pgd_same = Metric.from_counts(int(pgd[:aa["n"]].sum()), aa["n"])
    assert aa["value"] <= pgd_same.ci95[1], (aa["correct"], pgd_same.correct)
    assert pipeline["ev"].warnings == [], pipeline["ev"].warnings


@pytest.mark.slow
def test_evaluation_record_holds_the_protocol_and_round_trips(pipeline):
    record, store = pipeline["ev"], pipeline["store"]
    ra = record.metrics["ra"]["protocol"]
    assert (ra["eps"], ra["alpha"], ra["steps"], ra["restarts"], ra["n"], ra["seed"]) == (8 / 255, 2 / 255, 20, 1, 256, 0)
    assert ra["implementation"] == "bench.attacks.pgd" and ra["version"]
    aa = record.metrics["aa"]["protocol"]
    assert aa["implementation"] == "pyautoattack" and aa["version"] == "0.2.0" and aa["aa_version"] == "standard"
    assert aa["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"] and aa["n_target_classes"] == 9
    assert {"eps", "steps", "restarts", "n", "seed"} <= set(aa)
    assert [p["protocol"]["eps_255"] for p in record.metrics["sweeps"]["eps"]] == [2, 8]
    assert [p["protocol"]["steps"] for p in record.metrics["sweeps"]["steps"]] == [1, 5]
    again = store.read(record.key)
    assert again == record
    assert store.records("evaluate") == [record]


@pytest.mark.slow
def test_cross_dataset_evaluation_resizes_stl10_to_the_classifier(pipeline, data_dir, tmp_path):
    subset = data_dir / "stl10_test_subset.npz"
    if not subset.is_file():
        pytest.skip("stl10_test_subset.npz not in the data folder")
    stl_dir = tmp_path / "data"
    stl_dir.mkdir()
    shutil.copy(subset, stl_dir / "stl10_test.npz")  # the cache name the loader looks for
    store = pipeline["store"]
    eval_section = {**pipeline["ev_job"].config["eval"], "n": 10, "aa_n": 0, "sweep_n": 0}
    job = Job(kind="evaluate", key="evaluate-plain-slf-cifar10-stl10-s0-000000000000", seed=0, method="plain",
              finetuner="slf", source="cifar10", target="stl10",
              config={"eval": eval_section, "stl10": {"image_size": 32}},
              deps={"classifier": pipeline["ft"].key}, data_dir=str(stl_dir))
    record = run_stage(job, store, "cpu")
    assert record.target == "stl10" and record.metrics["sa"]["n"] == 10 and record.metrics["aa"] is None
    assert load("stl10", "test", data_dir=stl_dir, image_size=32).x.shape == (10, 3, 32, 32)
