"""Evaluation: metrics with their protocol, sweeps, restarts, sanity checks, the evaluate job."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bench
from bench import evaluation as ev
from bench.attacks import accuracy as acc
from bench.attacks import autoattack as aa_mod
from bench.attacks.autoattack import AAResult
from bench.config import EvalConfig, to_dict
from bench.datasets import batches, load
from bench.datasets.synthetic import Synthetic
from bench.attacks.accuracy import Watch, image_batches, pgd_correct, pgd_correct_at
from bench.evaluation import evaluate_classifier
from bench.jobs import Job
from bench.models import Classifier, ResNet18, bn_state, load_classifier, save_classifier
from bench.record import TEST_SELECTION_FLAG, TEST_SELECTION_WARNING, Metric, Record, wilson_interval
from bench.sanity import sanity_warnings
from bench.stages.base import run_stage
from bench.stages.finetune import CLASSIFIER
from bench.store import Store
from helpers import done_job

SYNTH = {"n_train": 512, "n_test": 128, "num_classes": 4, "image_size": 16}
PGD_FIELDS = {"eps", "alpha", "steps", "restarts", "n", "seed", "implementation", "version", "random_start",
              "loss", "precision", "mode", "batch_size", "images"}


@pytest.fixture(scope="module")
def test_set():
    return load("synthetic", "test", cfg=Synthetic.Config(**SYNTH))


@pytest.fixture(scope="module")
def trained():
    train = load("synthetic", "train", cfg=Synthetic.Config(**SYNTH), val_size=0)
    torch.manual_seed(0)
    model = Classifier(ResNet18(width=4), 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):  # to 100% clean accuracy: the AutoAttack tests below need every one of 4 images right
        for x, y, _ in batches(train, 64, shuffle=True, generator=generator):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def cfg(**kw) -> EvalConfig:
    base = dict(n=128, aa_n=0, sweep_n=0, batch_size=64, steps=5, val_n=32)
    base.update(kw)
    return EvalConfig(**base)


def test_wilson_interval_values():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.403832, abs=1e-6) and hi == pytest.approx(0.596168, abs=1e-6)
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.277533, abs=1e-6))
    assert wilson_interval(10, 10) == (pytest.approx(0.722467, abs=1e-6), pytest.approx(1.0))
    assert wilson_interval(0, 0) == (0.0, 1.0)
    m = Metric.from_counts(81, 100, {"eps": 1})
    assert m.value == 0.81 and m.n == 100 and m.correct == 81 and m.ci95[0] < 0.81 < m.ci95[1]


def test_k_step_pgd_is_a_prefix_of_a_longer_run(trained, test_set):
    data = image_batches(test_set.first(64), 32)
    at = pgd_correct_at(trained, data, eps=8 / 255, alpha=2 / 255, steps=[1, 3, 6], seed=5)
    for k in (1, 3, 6):
        assert torch.equal(at[k], pgd_correct(trained, data, eps=8 / 255, alpha=2 / 255, steps=k, seed=5))


def test_a_sample_is_robust_only_if_it_survives_every_restart(trained, test_set):
    data = image_batches(test_set.first(64), 32)
    kw = dict(eps=8 / 255, alpha=2 / 255, steps=2)
    two = pgd_correct(trained, data, restarts=2, seed=3, **kw)
    assert torch.equal(two, pgd_correct(trained, data, seed=3, **kw) & pgd_correct(trained, data, seed=4, **kw))


def test_metrics_carry_their_protocol_and_sweeps_fall_with_eps(trained, test_set):
    c = cfg(sweep_n=128, sweep_eps=(0, 2, 4, 8, 16), sweep_steps=(1, 2, 5, 10))
    out = evaluate_classifier(trained, test_set, c, seed=7)
    sa, ra = out.metrics.sa, out.metrics.ra
    assert sa.n == ra.n == 128 and out.metrics.aa is None
    assert torch.equal(out.per_sample["clean"], acc.clean_correct(trained, image_batches(test_set, 64)))
    assert int(out.per_sample["pgd"].sum()) == ra.correct and int(out.per_sample["clean"].sum()) == sa.correct
    assert PGD_FIELDS <= set(ra.protocol)
    p = ra.protocol
    assert (p["eps"], p["alpha"], p["steps"], p["restarts"], p["n"], p["seed"]) == (8 / 255, 2 / 255, 5, 1, 128, 7)
    assert p["implementation"] == "bench.attacks.pgd" and p["version"] == bench.__version__
    assert {"n", "seed", "implementation", "version"} <= set(sa.protocol)
    eps_curve = out.metrics.sweeps["eps"]
    assert [m.protocol["eps_255"] for m in eps_curve] == [0, 2, 4, 8, 16]
    assert all(m.protocol["steps"] == 20 and m.protocol["seed"] == 7 and PGD_FIELDS <= set(m.protocol)
               for m in eps_curve)
    assert eps_curve[0].correct == sa.correct  # eps 0: the clean accuracy
    for a, b in zip(eps_curve, eps_curve[1:]):  # non-increasing within the interval
        assert b.value <= a.ci95[1]
    assert eps_curve[-1].value < eps_curve[0].value
    steps_curve = out.metrics.sweeps["steps"]
    assert [m.protocol["steps"] for m in steps_curve] == [1, 2, 5, 10]
    assert all(m.protocol["eps"] == 8 / 255 and m.protocol["alpha"] == 2 / 255 for m in steps_curve)
    for a, b in zip(steps_curve, steps_curve[1:]):
        assert b.value <= a.ci95[1]
    assert out.warnings == []


def fake(correct, n=100, **protocol):
    return Metric.from_counts(correct, n, protocol)


def test_sanity_warnings_on_crafted_numbers():
    assert sanity_warnings(fake(80), fake(40), fake(35)) == []
    assert any("RA" in w and "above SA" in w for w in sanity_warnings(fake(40), fake(80)))
    assert sanity_warnings(fake(80), fake(82)) == []  # within the interval: sampling noise
    assert any("AA" in w and "above RA" in w for w in sanity_warnings(fake(80), fake(40), fake(70)))
    # AA on the first 32 (easier) images against RA on the same 32, not on all 500
    easy_aa, ra_500 = fake(9, n=32), fake(90, n=500)
    assert sanity_warnings(fake(170, n=500), ra_500, easy_aa)  # unlike compared: a false alarm
    assert sanity_warnings(fake(170, n=500), ra_500, easy_aa, ra_on_aa=fake(10, n=32)) == []
    assert any("above RA on the same 32 images" in w
               for w in sanity_warnings(fake(170, n=500), ra_500, fake(20, n=32), ra_on_aa=fake(10, n=32)))
    rising = {"eps": [fake(60, eps_255=2), fake(30, eps_255=4), fake(55, eps_255=8)]}
    assert any("eps sweep rises" in w for w in sanity_warnings(fake(80), fake(40), sweeps=rising))
    watch = Watch(train_forwards=3, bn_changed=["encoder.bn1.running_mean"], mode_restored=False)
    watch.check_perturbation(torch.full((2, 3), 0.5) + 0.1, torch.full((2, 3), 0.5), 8 / 255, "PGD")
    watch.check_perturbation(torch.full((2, 3), 1.02), torch.ones(2, 3), 8 / 255, "PGD")
    text = " | ".join(sanity_warnings(fake(80), fake(40), watch=watch))
    for expected in ("train mode during an attack", "BatchNorm statistics changed", "not restored",
                     "exceeds eps", "outside [0, 1]"):
        assert expected in text
    aa = AAResult(robust=torch.zeros(100, dtype=torch.bool), clean=torch.ones(100, dtype=torch.bool),
                  attacks=["apgd-ce", "apgd-t", "fab-t", "square"], n_target_classes=9, version="0.2.0",
                  aa_version="standard",
                  robust_after={"clean": 80, "apgd-ce": 50, "apgd-t": 46, "fab-t": 46, "square": 40},
                  messages=["it seems to be a randomized defense!"])
    text = " | ".join(sanity_warnings(fake(80), fake(50), fake(40), aa_result=aa))
    assert "Square broke 6 of 100 samples" in text and "pyautoattack: it seems to be a randomized" in text
    aa.robust_after["square"] = 46
    assert sanity_warnings(fake(80), fake(50), fake(46), aa_result=aa) == ["pyautoattack: it seems to be a randomized defense!"]


class SwitchesToTrain(nn.Module):
    """A broken model: its forward puts itself in train mode (so BN statistics move during attacks)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        self.train()
        return self.inner(x)


def test_sanity_checks_catch_a_model_that_trains_during_attacks(trained, test_set):
    import copy

    broken = SwitchesToTrain(copy.deepcopy(trained)).eval()
    out = evaluate_classifier(broken, test_set.first(32), cfg(n=32, steps=2), seed=0)
    text = " | ".join(out.warnings)
    assert "train mode during an attack" in text and "BatchNorm statistics changed" in text
    assert not broken.training  # the mode the caller had is restored


def test_sanity_checks_catch_perturbations_outside_eps(trained, test_set, monkeypatch):
    real = acc.pgd

    def too_far(objective, x, **kw):
        return (real(objective, x, **kw) + 2 * kw["eps"]).clamp(max=1.5)

    monkeypatch.setattr(acc, "pgd", too_far)
    out = evaluate_classifier(trained, test_set.first(32), cfg(n=32, steps=1), seed=0)
    text = " | ".join(out.warnings)
    assert "exceeds eps" in text and "outside [0, 1]" in text


def test_clean_evaluation_leaves_the_model_untouched(trained, test_set):
    before = bn_state(trained)
    evaluate_classifier(trained, test_set.first(32), cfg(n=32, steps=2), seed=0)
    assert not trained.training and all(torch.equal(before[k], v) for k, v in bn_state(trained).items())
    assert all(p.requires_grad and p.grad is None for p in trained.parameters())


FT_KEY = "finetune-x-slf-synthetic-s0-abc"
EVAL_KEY = "evaluate-x-slf-synthetic-s0-def"


def job_store(root, model):
    """A store holding a finetuned classifier (flagged selection=test) and its evaluate job."""
    store = Store(root)
    save = lambda path: save_classifier(path, model, classes=[f"c{i}" for i in range(4)], image_size=16)  # noqa: E731
    done_job(store, FT_KEY, "finetune", {CLASSIFIER: save}, flags=["selection=test"], metrics={"selected_epoch": 1})
    # eps 24/255: AA breaks most of the 4 images with APGD-CE, one survives every attack;
    # batch 2, so APGD-CE takes two batches (an interruption can fall between them)
    eval_section = to_dict(cfg(n=64, aa_n=4, sweep_n=16, batch_size=2, eps=24 / 255, alpha=6 / 255,
                               sweep_eps=(2, 8), sweep_steps=(1, 5)))
    job = Job(kind="evaluate", key=EVAL_KEY, seed=0, method="x", finetuner="slf", source="synthetic",
              target="synthetic", config={"eval": eval_section, "synthetic": dict(SYNTH)}, deps={"classifier": FT_KEY})
    return store, job


@pytest.fixture(scope="module")
def straight(trained, tmp_path_factory):
    """An uninterrupted evaluate job: (store, job, record, AutoAttack batches run)."""
    store, job = job_store(tmp_path_factory.mktemp("straight"), trained)
    calls = []
    real = aa_mod._run_one

    def counting(attack_obj, attack, xb, yb):
        calls.append(attack)
        return real(attack_obj, attack, xb, yb)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(aa_mod, "_run_one", counting)
        record = run_stage(job, store, "cpu")
    return store, job, record, calls


def test_evaluate_job_record_round_trips_through_the_store(trained, straight):
    store, job, record, _ = straight
    loaded = load_classifier(store.job_dir(FT_KEY) / CLASSIFIER)
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))
    assert record.kind == "evaluate" and record.flags == [TEST_SELECTION_FLAG]
    assert TEST_SELECTION_WARNING in record.warnings and "selected on the test set" in record.warnings[0]
    assert set(record.metrics) == {"sa", "ra", "aa", "sweeps", "prediction_share"}
    assert record.metrics["aa"]["protocol"]["implementation"] == "pyautoattack"
    assert record.metrics["aa"]["n"] == 4 and record.metrics["ra"]["n"] == 64
    assert [m["protocol"]["eps_255"] for m in record.metrics["sweeps"]["eps"]] == [2, 8]
    # the saved parts outlive the stage's run: the worker writes the record after it returns
    assert (store.job_dir(job.key) / ev.AA_STATE).is_file() and (store.job_dir(job.key) / ev.EVAL_STATE).is_file()
    store.write(record)
    assert store.read(job.key) == record
    assert not math.isnan(record.metrics["sa"]["value"])


class Interrupt(Exception):
    pass


def _results(record: Record) -> Record:
    return dataclasses.replace(record, provenance={})  # times and host differ between runs


def test_an_interrupted_evaluate_job_resumes_without_redoing_finished_stages(trained, straight, tmp_path,
                                                                             monkeypatch):
    _, _, expected, straight_calls = straight
    assert straight_calls.count("apgd-ce") == 2 and len(straight_calls) > 2  # the interruption below is mid-AA
    store, job = job_store(tmp_path / "results", trained)
    workdir = store.job_dir(job.key)
    stage_calls: list[str] = []
    for name in ("clean_correct", "pgd_correct", "pgd_correct_at"):  # wrapped, not replaced
        def counting(*args, _real=getattr(ev, name), _name=name, **kw):
            stage_calls.append(_name)
            return _real(*args, **kw)

        monkeypatch.setattr(ev, name, counting)
    aa_calls: list[str] = []
    real_run_one = aa_mod._run_one
    interrupt_at = None

    def run_one(attack_obj, attack, xb, yb):
        if len(aa_calls) == interrupt_at:
            raise Interrupt
        aa_calls.append(attack)
        return real_run_one(attack_obj, attack, xb, yb)

    monkeypatch.setattr(aa_mod, "_run_one", run_one)

    interrupt_at = 1  # the second batch of APGD-CE: the first one is decided
    with pytest.raises(Interrupt):
        run_stage(job, store, "cpu")
    assert {"clean_correct", "pgd_correct", "pgd_correct_at"} <= set(stage_calls)
    saved = json.loads((workdir / ev.EVAL_STATE).read_text())["parts"]
    assert set(saved) == {"clean", "pgd", "sweeps"}  # AutoAttack runs last and is not finished
    aa_state = json.loads((workdir / ev.AA_STATE).read_text())
    assert aa_state["done"] == [] and aa_state["current"]["attack"] == "apgd-ce"
    assert aa_state["current"]["batches_done"] == 1

    stage_calls.clear()
    aa_calls.clear()
    interrupt_at = None
    resumed = run_stage(job, store, "cpu")
    assert stage_calls == []  # SA, RA and the sweeps are read back, not recomputed
    assert aa_calls == straight_calls[1:]  # AutoAttack continues after the decided batch
    assert _results(resumed) == _results(expected)

    aa_calls.clear()  # every stage finished: nothing runs, not even AutoAttack's checks
    again = run_stage(job, store, "cpu")
    assert stage_calls == [] and aa_calls == [] and _results(again) == _results(expected)


def test_a_saved_stage_is_used_only_for_the_same_model_data_and_settings(trained, test_set, tmp_path):
    import copy

    path = tmp_path / ev.EVAL_STATE
    calls = []

    def compute(watch):
        calls.append(1)
        return {"flags": "0101"}

    def run(model=trained, data=test_set.first(4), settings=None, file=path):
        return ev.EvalState(file, model).run("clean", data, settings or {"batch_size": 2}, compute)

    assert run() == ({"flags": "0101"}, Watch(), False) and len(calls) == 1
    assert run()[2] and len(calls) == 1  # the same: read back
    changed = copy.deepcopy(trained)
    with torch.no_grad():
        changed.head.bias += 1e-3
    assert not run(model=changed)[2]  # another model
    assert not run(data=test_set.subset(slice(4, 8)))[2]  # other images
    assert not run(settings={"batch_size": 4})[2]  # other settings
    assert not run(file=None)[2] and not run(file=None)[2]  # no folder: nothing kept
    path.write_text("{not json")
    assert not run()[2] and run()[2]  # an unreadable file is replaced
    assert len(calls) == 7
