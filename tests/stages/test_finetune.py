"""Finetuners (SLF, ALF, AFF), model selection, resume, the finetune job and classifier.pt."""

from __future__ import annotations

import dataclasses
import hashlib
import math

import pytest
import torch
from torch import nn

from bench.config import EvalConfig, TrainConfig, from_dict, resolve, to_dict
from bench.datasets import load
from bench.datasets.synthetic import Synthetic
from bench.errors import BenchError
from bench.finetuning import finetune
from bench.finetuners.base import FinetuneContext, Finetuner
from bench.jobs import Job
from bench.models import ResNet18, load_classifier
from bench.record import TEST_SELECTION_FLAG
from bench.registry import FINETUNERS
from bench.stages.base import run_stage
from bench.stages.finetune import CLASSIFIER
from bench.store import Store
from bench.train import load_checkpoint
from helpers import done_encoder

SYNTH = {"n_train": 512, "n_test": 128, "num_classes": 4, "image_size": 16}
SETTINGS = {**{f"synthetic.{k}": v for k, v in SYNTH.items()},
            "data.val_size": 64, "eval.val_n": 32, "eval.selection_steps": 2, "eval.batch_size": 64,
            "finetune.epochs": 2, "finetune.batch_size": 64, "finetune.steps_per_epoch": 3,
            "alf.attack_steps": 2, "aff.attack_steps": 2}


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    enc = ResNet18(width=4)
    enc.train()
    with torch.no_grad():  # give the BN statistics non-default values
        for _ in range(3):
            enc(torch.rand(16, 3, 16, 16))
    return enc.eval()


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(module: nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in module.state_dict().items() if not torch.equal(v, before[k])]


def initial_head(features: int, classes: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)  # what finetune() does before building the classifier
    return nn.Linear(features, classes)


@pytest.mark.parametrize("name", FINETUNERS.names())
def test_every_registered_finetuner_trains_and_selects(name, encoder):
    """Every finetuner (built-in or third-party) gets this by being registered."""
    cls = FINETUNERS.get(name)
    assert issubclass(cls, Finetuner) and issubclass(cls.Config, TrainConfig)
    defaults = cls.Config()
    assert dataclasses.asdict(from_dict(cls.Config, to_dict(defaults), name)) == dataclasses.asdict(defaults)
    overrides = {f"{name}.{k}": v for k, v in getattr(cls, "test_settings", {}).items()}
    result = finetune(name, encoder, "synthetic", {**SETTINGS, **overrides, "finetune.epochs": 1}, seed=0)
    assert len(result.history) == 1 and math.isfinite(result.history[0]["loss"])
    assert result.selected is not None and result.selected["epoch"] == 1 and result.selected["n"] == 32
    assert result.model.head.out_features == 4 and not result.model.training


@pytest.mark.parametrize("name", ["slf", "alf"])
def test_linear_finetuners_change_only_the_head(name, encoder):
    before = snapshot(encoder)
    result = finetune(name, encoder, "synthetic", SETTINGS, seed=0)
    enc_after = result.model.encoder.state_dict()
    assert set(enc_after) == set(before)
    for key, value in enc_after.items():  # weights, BN running statistics and batch counters
        assert torch.equal(value, before[key]), key
    assert not changed(encoder, before)  # the caller's encoder is untouched too
    head0 = initial_head(encoder.feature_dim, 4)
    assert not torch.equal(result.model.head.weight, head0.weight)
    assert not result.model.training and not result.model.encoder.training
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert {"loss", "val_sa", "val_ra"} <= set(result.history[-1])


def test_aff_trains_the_whole_model_from_a_zero_head(encoder):
    cls = FINETUNERS.get("aff")
    cfg = from_dict(cls.Config, {"attack_steps": 2})
    ctx = FinetuneContext(num_classes=4, device=torch.device("cpu"), eval=EvalConfig())
    fresh = cls(cfg, ResNet18(width=4), ctx)
    assert torch.count_nonzero(fresh.model.head.weight) == 0 and torch.count_nonzero(fresh.model.head.bias) == 0
    assert not FINETUNERS.get("slf").zero_init_head

    before = snapshot(encoder)
    result = finetune("aff", encoder, "synthetic", SETTINGS, seed=0)
    moved = changed(result.model.encoder, before)
    assert any(k.endswith("conv1.weight") for k in moved)
    assert any(k.endswith("running_mean") for k in moved)
    assert torch.count_nonzero(result.model.head.weight) > 0
    assert not changed(encoder, before)


def test_paper_values_and_step_schedule():
    slf, alf, aff = (FINETUNERS.get(n).Config() for n in ("slf", "alf", "aff"))
    for c in (slf, alf, aff):
        assert (c.epochs, c.momentum, c.weight_decay, c.schedule, c.decay_at, c.gamma) == \
            (25, 0.9, 2e-4, "step", (0.6, 0.8), 0.1)
        assert c.selection == "val"
    assert (slf.lr, slf.batch_size, alf.lr, alf.batch_size, aff.lr, aff.batch_size) == (0.01, 512, 0.01, 512, 0.1, 128)
    assert (alf.eps, alf.alpha, alf.attack_steps) == (8 / 255, 2 / 255, 10)
    assert (aff.eps, aff.alpha, aff.attack_steps, aff.beta) == (8 / 255, 2 / 255, 10, 6.0)
    ctx = FinetuneContext(num_classes=4, device=torch.device("cpu"), eval=EvalConfig())
    for name, base in (("slf", 0.01), ("aff", 0.1)):
        task = FINETUNERS.get(name)(FINETUNERS.get(name).Config(), ResNet18(width=2), ctx)
        lrs = [task.lr_at(e, 0, 10) for e in range(25)]
        assert lrs[:15] == [base] * 15
        assert lrs[15:20] == [pytest.approx(base * 0.1)] * 5 and lrs[20:] == [pytest.approx(base * 0.01)] * 5
        assert task.lr_at(14, 9, 10) == base  # per epoch, not per step


def test_linear_finetuner_keeps_the_encoder_out_of_the_optimizer(encoder):
    ctx = FinetuneContext(num_classes=4, device=torch.device("cpu"), eval=EvalConfig())
    task = FINETUNERS.get("slf")(FINETUNERS.get("slf").Config(), ResNet18(width=2), ctx)
    assert {id(p) for p in task.trainable_parameters()} == {id(p) for p in task.model.head.parameters()}
    task.train_mode()
    assert not task.model.encoder.training
    aff = FINETUNERS.get("aff")(FINETUNERS.get("aff").Config(), ResNet18(width=2), ctx)
    aff.train_mode()
    assert aff.model.training and len(list(aff.trainable_parameters())) == len(list(aff.model.parameters()))


def test_selection_keeps_the_best_validation_epoch(encoder, monkeypatch):
    script = iter([(20, 5), (22, 9), (25, 7)])  # (clean, robust) at epochs 1, 2, 3
    heads = []

    def scripted(self):
        heads.append(snapshot(self.model.head))
        sa, ra = next(script)
        return sa, ra, 32

    monkeypatch.setattr(Finetuner, "validate", scripted)
    result = finetune("slf", encoder, "synthetic", {**SETTINGS, "slf.epochs": 3}, seed=0)
    assert result.selected == {"epoch": 2, "ra": 9, "sa": 22, "n": 32}
    assert [h["val_ra"] for h in result.history] == [5 / 32, 9 / 32, 7 / 32]
    assert all(torch.equal(v, heads[1][k]) for k, v in result.model.head.state_dict().items())
    assert not all(torch.equal(v, heads[2][k]) for k, v in result.model.head.state_dict().items())


def test_selection_last_measures_only_the_final_epoch(encoder, monkeypatch):
    calls = []

    def scripted(self):
        calls.append(1)
        return 10, 4, 32

    monkeypatch.setattr(Finetuner, "validate", scripted)
    result = finetune("slf", encoder, "synthetic", {**SETTINGS, "slf.epochs": 3, "slf.selection": "last"}, seed=0)
    assert len(calls) == 1 and result.selected["epoch"] == 3 and not result.flags


def test_validation_and_test_images_never_overlap(encoder):
    result = finetune("slf", encoder, "synthetic", {**SETTINGS, "finetune.epochs": 1}, seed=0)
    val, train = result.selection_data, result.train
    assert len(val) == 32 and len(train) == SYNTH["n_train"] - 64
    assert not set(val.indices.tolist()) & set(train.indices.tolist())
    full_val = load("synthetic", "val", cfg=Synthetic.Config(**SYNTH), val_size=64)
    assert torch.equal(val.indices, full_val.indices[:32])  # a fixed subset of the validation split
    test = load("synthetic", "test", cfg=Synthetic.Config(**SYNTH))

    def digests(data):
        return {hashlib.sha256(img.numpy().tobytes()).hexdigest() for img in data.x}

    assert not digests(full_val) & digests(test)
    assert not digests(full_val) & digests(train)


def test_resumed_finetuning_selects_what_a_straight_run_selects(encoder, tmp_path):
    settings = {**SETTINGS, "aff.epochs": 3}
    straight = finetune("aff", encoder, "synthetic", settings, seed=1, workdir=tmp_path / "straight")
    part = finetune("aff", encoder, "synthetic", settings, seed=1, workdir=tmp_path / "resumed", stop_after_epoch=2)
    assert len(part.history) == 2
    ckpt = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    assert "best" in ckpt["extra"] and ckpt["extra"]["best"]["epoch"] in (1, 2)
    resumed = finetune("aff", encoder, "synthetic", settings, seed=1, workdir=tmp_path / "resumed")
    assert resumed.selected == straight.selected
    assert resumed.history == straight.history
    for key, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


def write_pretrain(store: Store, encoder: nn.Module, image_size: int = 16, flags: tuple[str, ...] = ()) -> str:
    key = "pretrain-test-synthetic-s0-000"
    done_encoder(store, key, encoder, {"method": "test", "image_size": image_size}, flags=list(flags))
    return key


def finetune_job(pre_key: str, finetuner: str, settings: dict) -> Job:
    config = resolve(settings, [finetuner, "synthetic"]).as_dict()
    sections = {k: config[k] for k in ("encoder", "data", "eval", finetuner, "synthetic")}
    return Job(kind="finetune", key=f"finetune-test-{finetuner}-synthetic-s0-111", seed=0, method="test",
               finetuner=finetuner, source="synthetic", target="synthetic", config=sections,
               deps={"encoder": pre_key})


def test_finetune_job_with_test_selection_is_flagged_and_saves_the_classifier(encoder, tmp_path):
    store = Store(tmp_path / "results")
    pre = write_pretrain(store, encoder)
    job = finetune_job(pre, "slf", {**SETTINGS, "slf.selection": "test"})
    record = run_stage(job, store, "cpu")
    assert record.kind == "finetune" and record.flags == [TEST_SELECTION_FLAG]
    assert set(record.artifacts) == {CLASSIFIER}
    assert any("selected on the test set" in w for w in record.warnings)
    assert set(record.metrics) == {"selected_epoch", "val_ra", "val_sa", "precision", "training"}
    assert record.metrics["precision"]["ran"] == "fp32"
    assert record.metrics["val_ra"]["protocol"]["selection"] == "test"
    assert "synthetic test" in record.metrics["val_ra"]["protocol"]["images"]
    assert record.metrics["val_ra"]["protocol"]["steps"] == 2 and record.metrics["val_ra"]["n"] == 32
    store.write(record)
    assert store.read(job.key) == record

    path = store.job_dir(job.key) / CLASSIFIER
    blob = torch.load(path, map_location="cpu", weights_only=True)
    assert blob["image_size"] == 16 and blob["num_classes"] == 4 and blob["spec"]["width"] == 4
    model, meta = load_classifier(path, with_meta=True)
    assert not model.training and meta["selected_epoch"] == record.metrics["selected_epoch"]
    assert meta["flags"] == [TEST_SELECTION_FLAG]
    for key, value in encoder.state_dict().items():  # SLF: the saved encoder is the pretrained one
        assert torch.equal(model.encoder.state_dict()[key], value), key


def test_validation_selection_is_not_flagged(encoder, tmp_path):
    store = Store(tmp_path / "results")
    job = finetune_job(write_pretrain(store, encoder), "slf", {**SETTINGS, "finetune.epochs": 1})
    record = run_stage(job, store, "cpu")
    assert record.flags == [] and record.warnings == []
    assert "synthetic val" in record.metrics["val_sa"]["protocol"]["images"]


def test_the_encoders_flags_reach_the_finetuned_record(encoder, tmp_path):
    # a bf16-pretrained encoder qualifies every number computed from it (and the evaluate record
    # copies the finetune record's flags)
    store = Store(tmp_path / "results")
    job = finetune_job(write_pretrain(store, encoder, flags=("precision=bf16",)), "slf",
                       {**SETTINGS, "finetune.epochs": 1, "slf.selection": "test"})
    record = run_stage(job, store, "cpu")
    assert record.flags == ["precision=bf16", TEST_SELECTION_FLAG]


def test_image_size_must_match_the_encoder(encoder, tmp_path):
    with pytest.raises(BenchError, match="synthetic.image_size=16"):
        finetune("slf", encoder, "synthetic", SETTINGS, image_size=32)
    store = Store(tmp_path / "results")
    pre = write_pretrain(store, encoder, image_size=32)  # the encoder was pretrained at 32px
    job = finetune_job(pre, "slf", SETTINGS)  # ... but the target is configured at 16px
    with pytest.raises(BenchError, match="encoder's input size 32"):
        run_stage(job, store, "cpu")
