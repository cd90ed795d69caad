"""The whole finetune + evaluate path on real CIFAR-10 (../shared/data, via BENCH_DATA_DIR).

A tiny ResNet-18 (width 8) is trained with plain cross-entropy for about a minute on the
(JPEG-decoded) training set; its encoder goes through the real finetune job (SLF) and the real
evaluate job (SA, PGD-20, AutoAttack from pyautoattack, sweeps), and the record round-trips
through the store. Skipped, with the reason, when the data is not there.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench.augment import WEAK_VIEW, make_view
from bench.config import TrainConfig, resolve
from bench.datasets import load
from bench.evaluate import clean_correct, image_batches, run_evaluate_job
from bench.finetune import CLASSIFIER_FILE, ENCODER_FILE, load_classifier, run_finetune_job
from bench.jobs import Job
from bench.models import Classifier, ResNet18, save_encoder
from bench.record import Record
from bench.store import Store
from bench.train import Trainable, fit

TRAIN_STEPS = 300  # batch 128: about 50 s on one CPU core, ~47% test accuracy
FIRST_LABELS = [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
TEST_MEAN = (0.4942, 0.4851, 0.4504)


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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: on a shared 2-core machine one thread is faster
    yield
    torch.set_num_threads(before)


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


def test_validation_split_is_carved_from_training_only(data_dir):
    train = load("cifar10", "train", data_dir=data_dir, val_size=5000)
    val = load("cifar10", "val", data_dir=data_dir, val_size=5000)
    assert len(train) == 45_000 and len(val) == 5_000
    assert not set(train.indices.tolist()) & set(val.indices.tolist())
    assert sorted(train.indices.tolist() + val.indices.tolist()) == list(range(50_000))


class PlainCE(Trainable):
    """Supervised training with cross-entropy on weakly augmented images (a stand-in pretrainer)."""

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module):
        self.cfg, self.model = cfg, model

    def training_step(self, x, y, index, info):
        logits = self.model(make_view(x, WEAK_VIEW))
        return {"loss": F.cross_entropy(logits, y)}


@pytest.fixture(scope="module")
def pipeline(data_dir, test_set, tmp_path_factory):
    """Train ~1 min, then run the real finetune (SLF) and evaluate jobs; returns what they made."""
    store = Store(tmp_path_factory.mktemp("results"))
    train = load("cifar10", "train", data_dir=data_dir, val_size=5000)
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=1, batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine",
                      steps_per_epoch=TRAIN_STEPS, amp=False)
    task = PlainCE(cfg, Classifier(ResNet18(width=8), 10))
    started = time.time()
    fit(task, train, seed=0)
    train_s = time.time() - started
    supervised = task.model.eval()

    pre_key = "pretrain-plain-cifar10-s0-000000000000"
    store.job_dir(pre_key).mkdir(parents=True)
    save_encoder(store.job_dir(pre_key) / ENCODER_FILE, supervised.encoder, {"method": "plain"})
    store.write(Record(kind="pretrain", key=pre_key, seed=0, method="plain", source="cifar10"))

    settings = {"data.train_limit": 5000, "slf.epochs": 4, "eval.val_n": 200, "eval.selection_steps": 5,
                "eval.batch_size": 250, "eval.n": 500, "eval.aa_n": 64, "eval.sweep_n": 32,
                "eval.sweep_eps": [2, 8], "eval.sweep_steps": [1, 5]}
    config = resolve(settings, ["slf"]).as_dict()
    ft = Job(kind="finetune", key="finetune-plain-slf-cifar10-s0-000000000000", seed=0, method="plain",
             finetuner="slf", source="cifar10", target="cifar10",
             config={k: config[k] for k in ("encoder", "data", "eval", "slf")}, deps={"pretrain": pre_key},
             data_dir=str(data_dir))
    ft_record = run_finetune_job(ft, store, "cpu")
    store.write(ft_record)
    ev = Job(kind="evaluate", key="evaluate-plain-slf-cifar10-s0-000000000000", seed=0, method="plain",
             finetuner="slf", source="cifar10", target="cifar10", config={"eval": config["eval"]},
             deps={"finetune": ft.key}, data_dir=str(data_dir))
    ev_record = run_evaluate_job(ev, store, "cpu")
    store.write(ev_record)
    return {"store": store, "supervised": supervised, "train_s": train_s, "ft": ft_record, "ev": ev_record,
            "ev_job": ev}


@pytest.mark.slow
def test_trained_model_beats_chance_and_attacks_order_correctly(pipeline, test_set):
    first = test_set.first(1000)
    supervised_acc = clean_correct(pipeline["supervised"], image_batches(first, 500)).float().mean().item()
    assert supervised_acc > 0.3, f"trained {pipeline['train_s']:.0f} s, accuracy {supervised_acc:.3f}"

    store = pipeline["store"]
    classifier = load_classifier(store.job_dir(pipeline["ft"].key) / CLASSIFIER_FILE)
    slf_acc = clean_correct(classifier, image_batches(first, 500)).float().mean().item()
    assert slf_acc > 0.2, f"SLF on the trained encoder: {slf_acc:.3f} on 1000 test images"
    assert pipeline["ft"].metrics["selected_epoch"] in range(1, 5) and pipeline["ft"].flags == []

    m = pipeline["ev"].metrics
    sa, ra, aa = m["sa"], m["ra"], m["aa"]
    assert sa["n"] == ra["n"] == 500 and aa["n"] == 64
    assert sa["value"] > 0.2
    assert ra["value"] < sa["value"]  # PGD-20 finds adversarial examples
    assert aa["value"] <= ra["value"]  # AutoAttack is at least as strong
    assert pipeline["ev"].warnings == [], pipeline["ev"].warnings


@pytest.mark.slow
def test_evaluation_record_holds_the_protocol_and_round_trips(pipeline):
    record, store = pipeline["ev"], pipeline["store"]
    ra = record.metrics["ra"]["protocol"]
    assert (ra["eps"], ra["alpha"], ra["steps"], ra["restarts"], ra["n"], ra["seed"]) == (8 / 255, 2 / 255, 20, 1, 500, 0)
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
              deps={"finetune": pipeline["ft"].key}, data_dir=str(stl_dir))
    record = run_evaluate_job(job, store, "cpu")
    assert record.target == "stl10" and record.metrics["sa"]["n"] == 10 and record.metrics["aa"] is None
    assert load("stl10", "test", data_dir=stl_dir, image_size=32).x.shape == (10, 3, 32, 32)
