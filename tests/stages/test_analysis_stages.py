"""The analysis stages: fim (feature inversion, Figure 5) and landscape (adversarial loss landscape, Figure 6) as
cached jobs: planned per encoder / per SLF classifier with their settings in the key and the record, run through
a real store, resumed after an interruption to the uninterrupted result, models untouched."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench import grid
from bench.analysis.inversion import InversionConfig, choose_seed_images
from bench.attacks.pgd import attack_classifier
from bench.config import to_dict
from bench.datasets import load
from bench.datasets.synthetic import Synthetic
from bench.errors import BenchError
from bench.jobs import Job
from bench.models import Classifier, ResNet18, bn_state, load_classifier, load_encoder, save_classifier
from bench.stages import fim as fim_stage
from bench.stages.base import get_stage, run_stage
from bench.store import Store
from helpers import TINY, done_encoder, done_job

SYNTH = {"n_train": 64, "n_test": 48, "num_classes": 3, "image_size": 16}
ENCODER_KEY = "pretrain-x-synthetic-s0-000000000001"
CLASSIFIER_KEY = "finetune-x-slf-synthetic-s0-000000000002"


class Interrupt(Exception):
    pass


def bn_model(model):
    """Train-mode batches so that the BatchNorm statistics are not the defaults."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(8, 3, 16, 16))
    return model.eval()


@pytest.fixture
def store(tmp_path):
    """A store with a finished pretrain job (its encoder) and a finished finetune job (its classifier)."""
    torch.manual_seed(0)
    store = Store(tmp_path / "results")
    done_encoder(store, ENCODER_KEY, bn_model(ResNet18(width=4)), {"image_size": 16})
    classifier = bn_model(Classifier(ResNet18(width=4), 3))
    done_job(store, CLASSIFIER_KEY, "finetune", {"classifier.pt": lambda p: save_classifier(
        p, classifier, classes=["a", "b", "c"], image_size=16)}, metrics={"selected_epoch": 1})
    return store


def fim_job(**settings) -> Job:
    cfg = to_dict(InversionConfig(**{"coordinate": 5, "steps": 12, "n_images": 3, **settings}))
    return Job(kind="fim", key="fim-x-synthetic-s0-000000000003", seed=0, method="x", source="synthetic",
               config={"fim": cfg, "synthetic": SYNTH, "data": {"download": False}}, deps={"encoder": ENCODER_KEY})


def landscape_job(**settings) -> Job:
    from bench.stages.landscape import landscape_config

    section = {"n": 12, "points_1d": 5, "points_2d": 3, "steps": 2, "seed": 3, "batch_size": 8, **settings}
    cfg = to_dict(landscape_config(section))
    return Job(kind="landscape", key="landscape-x-slf-synthetic-s0-000000000004", seed=0, method="x",
               finetuner="slf", source="synthetic", target="synthetic",
               config={"landscape": cfg, "synthetic": SYNTH, "data": {"download": False}},
               deps={"classifier": CLASSIFIER_KEY})


def steps_seen(job, store, stop_after=None):
    """Run `job` with a progress callback that records the steps (and interrupts after `stop_after`)."""
    seen = []

    def on_progress(info):
        seen.append(info["step"])
        if stop_after is not None and len(seen) >= stop_after:
            raise Interrupt()

    if stop_after is not None:
        with pytest.raises(Interrupt):
            run_stage(job, store, "cpu", on_progress)
        return seen, None
    return seen, run_stage(job, store, "cpu", on_progress)


# ---------------------------------------------------------------- planning: settings, keys, which cells


def test_analysis_jobs_are_planned_per_encoder_and_per_slf_classifier_with_their_settings_in_the_key():
    base = dict(methods="simclr,acl", finetune="slf,aff", datasets="synthetic,synthetic:cifar10",
                stages="fim,landscape")
    settings = [*TINY, "fim.coordinate=3", "fim.steps=4", "landscape.points_1d=3"]
    _, graph, _ = grid.plan(fetch=False, overrides=settings, **base)
    fims = [j for j in graph if j.kind == "fim"]
    assert sorted(j.method for j in fims) == ["acl", "simclr"]  # one per encoder, whatever its targets
    assert {j.deps["encoder"] for j in fims} == {j.key for j in graph if j.kind == "pretrain"}
    assert fims[0].config["fim"]["steps"] == 4 and list(fims[0].data) == ["synthetic/test"]
    scapes = [j for j in graph if j.kind == "landscape"]
    assert sorted((j.method, j.finetuner, j.target) for j in scapes) == [
        ("acl", "slf", "cifar10"), ("acl", "slf", "synthetic"), ("simclr", "slf", "cifar10"),
        ("simclr", "slf", "synthetic")]  # SLF classifiers only, by default
    assert "finetuners" not in scapes[0].config["landscape"] and scapes[0].config["landscape"]["points_1d"] == 3

    def keys(extra):
        return {(j.kind, j.method, j.finetuner, j.target): j.key for j in grid.plan(
            fetch=False, overrides=[*settings, *extra], **base)[1] if j.kind in ("fim", "landscape")}

    before = keys([])
    assert keys([]) == before  # cached: the same settings are the same jobs
    assert keys(["fim.steps=5"]).keys() == before.keys()
    changed = {k for k, v in keys(["fim.steps=5"]).items() if before[k] != v}
    assert changed == {k for k in before if k[0] == "fim"}
    wider = keys(["landscape.finetuners=[\"slf\",\"aff\"]"])
    assert len(wider) == len(before) + 4 and all(wider[k] == v for k, v in before.items())


def test_analysis_settings_are_checked_before_work():
    base = dict(methods="simclr", finetune="slf", datasets="synthetic")
    with pytest.raises(BenchError, match="fim.coordinate=502 is outside.*size 32"):
        grid.plan(fetch=False, overrides=TINY, stages="fim", **base)  # the paper's neuron 502 needs width 64
    with pytest.raises(BenchError, match="unknown finetuners 'slff'"):
        grid.plan(fetch=False, overrides=[*TINY, 'landscape.finetuners=["slff"]'], stages="landscape", **base)
    with pytest.raises(BenchError, match="fim.direction"):
        grid.plan(fetch=False, overrides=[*TINY, "fim.direction=up"], stages="fim", **base)


# ---------------------------------------------------------------- fim


def test_fim_job_records_the_inversion_and_its_images(store):
    seen, record = steps_seen(fim_job(), store)
    assert seen == list(range(1, 13))
    m = record.metrics
    assert (m["coordinate"], m["direction"], m["n_images"], m["steps"], m["feature_dim"]) == (5, "max", 3, 12, 32)
    assert m["settings"]["steps"] == 12 and record.config["fim"]["coordinate"] == 5
    values = np.asarray(m["values"])
    assert values.shape == (13, 3) and (values[-1] >= values[0]).all() and values[-1].mean() > values[0].mean()
    assert max(m["delta_norm"]) <= 1000.0
    test = load("synthetic", "test", cfg=Synthetic.Config(**SYNTH))
    chosen = choose_seed_images(len(test), 3, 0)
    assert m["seed_indices"] == chosen and set(record.artifacts) == {"fim.npz"}
    entry = get_stage("fim").figure_entry(store.job(record.key), record)
    assert entry["seeds"].shape == entry["images"].shape == (3, 16, 16, 3) and entry["seeds"].dtype == np.uint8
    assert np.array_equal(entry["seeds"], test.x[chosen].permute(0, 2, 3, 1).numpy())  # the stored test images
    assert not np.array_equal(entry["seeds"], entry["images"])
    # the encoder it read is untouched (the stage compares weights and BatchNorm statistics bit for bit)
    encoder = load_encoder(store.job_dir(ENCODER_KEY) / "encoder.pt")
    assert any(v.abs().sum() > 0 for k, v in bn_state(encoder).items() if "running_mean" in k)


def test_fim_job_minimises_when_asked(store):
    _, record = steps_seen(fim_job(direction="min", coordinate=int(active_coordinate(store))), store)
    values = np.asarray(record.metrics["values"])
    assert values[-1].mean() < values[0].mean()


def active_coordinate(store) -> int:
    encoder = load_encoder(store.job_dir(ENCODER_KEY) / "encoder.pt")
    test = load("synthetic", "test", cfg=Synthetic.Config(**SYNTH))
    with torch.no_grad():
        return int(encoder(test.images(choose_seed_images(len(test), 3, 0))).min(0).values.argmax())


def test_an_interrupted_fim_job_resumes_to_the_uninterrupted_result(store, monkeypatch):
    _, straight = steps_seen(fim_job(), store)
    monkeypatch.setattr(fim_stage, "CHECKPOINT_STEPS", 4)
    job = dataclasses.replace(fim_job(), key="fim-x-synthetic-s0-000000000009")
    seen, _ = steps_seen(job, store, stop_after=6)  # stopped after step 6: steps 1-4 are saved
    assert seen == [1, 2, 3, 4, 5, 6] and (store.job_dir(job.key) / fim_stage.STATE).is_file()
    seen, resumed = steps_seen(job, store)
    assert seen == list(range(5, 13))  # steps 1-4 are not redone
    assert resumed.metrics == straight.metrics
    a = np.load(store.job_dir(job.key) / "fim.npz")
    b = np.load(store.job_dir(straight.key) / "fim.npz")
    assert all(np.array_equal(a[k], b[k]) for k in ("seeds", "images", "seed_indices"))


def test_fim_stage_refuses_an_inversion_that_changed_the_encoder(store, monkeypatch):
    real = fim_stage.invert_feature

    def leaky(encoder, x0, cfg, **kw):  # a broken analysis that trains the BatchNorm statistics
        encoder.train()
        encoder(x0)
        encoder.eval()
        return real(encoder, x0, cfg, **kw)

    monkeypatch.setattr(fim_stage, "invert_feature", leaky)
    with pytest.raises(RuntimeError, match="changed the encoder"):
        run_stage(fim_job(), store, "cpu")


# ---------------------------------------------------------------- landscape


def test_landscape_job_at_the_origin_is_the_classifiers_adversarial_loss(store):
    seen, record = steps_seen(landscape_job(), store)
    m = record.metrics
    assert m["alphas"] == [-1.0, -0.5, 0.0, 0.5, 1.0] and m["surface"]["alphas"] == [-1.0, 0.0, 1.0]
    assert len(seen) == 5 + 9 - 3  # the surface's beta = 0 row is on the curve: those points once
    assert m["n_images"] == 12 and m["settings"]["steps"] == 2 and m["weights_restored"] is True
    # directly: PGD-2 against the stored classifier (same seed), the mean cross-entropy
    model = load_classifier(store.job_dir(CLASSIFIER_KEY) / "classifier.pt")
    test = load("synthetic", "test", cfg=Synthetic.Config(**SYNTH)).first(12)
    x, y = test.images(slice(None)), test.y
    bn = bn_state(model)
    x_adv = attack_classifier(model, x[:8], y[:8], eps=8 / 255, alpha=2 / 255, steps=2, seed=3)
    x_adv2 = attack_classifier(model, x[8:], y[8:], eps=8 / 255, alpha=2 / 255, steps=2, seed=4)  # batch 2: seed + 1
    with torch.no_grad():
        direct = float(F.cross_entropy(model(torch.cat([x_adv, x_adv2])), y))
    assert m["loss"][2] == pytest.approx(direct, rel=1e-6) and m["surface"]["loss"][1][1] == m["loss"][2]
    assert m["loss"][0] != pytest.approx(direct)
    assert all(torch.equal(bn[k], v) for k, v in bn_state(model).items())
    entry = get_stage("landscape").figure_entry(store.job(record.key), record)
    assert entry["finetuner"] == "slf" and entry["loss"] == m["loss"] and entry["surface"] == m["surface"]


def test_an_interrupted_landscape_job_computes_only_its_missing_points(store):
    _, straight = steps_seen(landscape_job(), store)
    job = dataclasses.replace(landscape_job(), key="landscape-x-slf-synthetic-s0-000000000008")
    seen, _ = steps_seen(job, store, stop_after=4)
    assert seen == [1, 2, 3, 4]
    seen, resumed = steps_seen(job, store)
    assert seen == list(range(5, 12))  # points 1-4 were saved and are not computed again
    assert resumed.metrics == straight.metrics
