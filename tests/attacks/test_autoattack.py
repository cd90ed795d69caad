"""The AutoAttack adapter with the real pyautoattack on a tiny trained model (4 classes, 8x8 images).

eps is 32/255 here so that the tiny model has a mix of samples: some broken by APGD-CE, some
only by APGD-T, some robust to everything (so every attack of the standard version runs).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.attacks import autoattack as aa_mod
from bench.attacks.autoattack import attack_list, build_autoattack, run_autoattack, square_gain, target_classes
from bench.attacks.pgd import eval_guard
from bench.datasets import batches, load
from bench.datasets.synthetic import Synthetic
from bench.attacks.accuracy import clean_correct, pgd_correct, tensor_batches
from bench.registry import ATTACKS

pytest.importorskip("pyautoattack")

EPS = 32 / 255
N = 16


@pytest.fixture(scope="module")
def setup():
    cfg = Synthetic.Config(n_train=512, n_test=64, num_classes=4, image_size=8)
    train = load("synthetic", "train", cfg=cfg, val_size=0)
    test = load("synthetic", "test", cfg=cfg)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    for _ in range(6):
        for x, y, _ in batches(train, 64, shuffle=True, generator=generator):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval().zero_grad(set_to_none=True)
    return model, test.images(slice(0, N)), test.y[:N]


def aa(model, x, y, **kw):
    settings = dict(eps=EPS, num_classes=4, seed=0, batch_size=N)
    settings.update(kw)
    with eval_guard(model):
        return run_autoattack(model, x, y, **settings)


@pytest.fixture(scope="module")
def straight(setup):
    model, x, y = setup
    return aa(model, x, y, batch_size=4)


def test_target_classes_come_from_the_real_number_of_classes(setup):
    model, _, _ = setup
    assert target_classes(4) == 3 and target_classes(10) == 9 and target_classes(100) == 9 and target_classes(2) == 1
    attack, attacks, n_target = build_autoattack(model, eps=EPS, num_classes=4, seed=0)
    assert attack.apgd_targeted.n_target_classes == 3 and attack.fab.n_target_classes == 3 and n_target == 3
    assert attacks == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert attack_list("standard", 3) == ["apgd-ce", "fab-t", "square"]  # targeted DLR needs 4 classes


def test_autoattack_is_at_most_pgd20_and_every_attack_ran(setup, straight):
    model, x, y = setup
    pgd20 = pgd_correct(model, tensor_batches(x, y, N), eps=EPS, alpha=EPS / 4, steps=20, seed=0)
    clean = clean_correct(model, tensor_batches(x, y, N))
    assert straight.n_target_classes == 3 and not straight.messages
    assert straight.correct <= int(pgd20.sum()) <= int(clean.sum())
    assert torch.equal(straight.clean, clean)
    assert not (straight.robust & ~straight.clean).any()  # robust implies correct on the clean image
    after = straight.robust_after
    assert list(after) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert all(a >= b for a, b in zip(list(after.values()), list(after.values())[1:]))
    assert after["square"] == straight.correct > 0 and after["apgd-ce"] < after["clean"]  # a mix of outcomes
    assert straight.max_perturbation <= EPS + 1e-6 and not straight.out_of_range
    assert square_gain(after, straight.attacks) == after["fab-t"] - after["square"]


def test_seeded_runs_are_reproducible(setup, straight):
    model, x, y = setup
    again = aa(model, x, y, batch_size=4)
    assert torch.equal(again.robust, straight.robust) and again.robust_after == straight.robust_after


def test_interrupted_run_resumes_from_the_state_file(setup, straight, tmp_path, monkeypatch):
    model, x, y = setup
    path = tmp_path / "aa_state.json"

    class Interrupt(Exception):
        pass

    def stop(attack, done, total):
        if attack == "apgd-t" and done == 1:  # in the middle of the second attack
            raise Interrupt

    with pytest.raises(Interrupt):
        aa(model, x, y, batch_size=4, state_path=path, on_batch=stop)
    state = json.loads(path.read_text())
    assert state["done"] == ["apgd-ce"] and state["current"]["attack"] == "apgd-t"
    assert state["current"]["batches_done"] == 1 and state["robust_after"]["apgd-ce"] == straight.robust_after["apgd-ce"]

    calls = []
    real = aa_mod._run_one

    def counting(attack_obj, attack, xb, yb):
        calls.append((attack, len(yb)))
        return real(attack_obj, attack, xb, yb)

    monkeypatch.setattr(aa_mod, "_run_one", counting)
    resumed = aa(model, x, y, batch_size=4, state_path=path)
    assert resumed.resumed
    assert "apgd-ce" not in {a for a, _ in calls}  # decided before the interruption: not run again
    apgd_t_batches = -(-straight.robust_after["apgd-ce"] // 4)
    assert sum(a == "apgd-t" for a, _ in calls) == apgd_t_batches - 1  # only the batches left
    assert torch.equal(resumed.robust, straight.robust) and resumed.robust_after == straight.robust_after
    # the perturbation check covers the batches attacked before the interruption too
    assert resumed.max_perturbation == straight.max_perturbation > 0
    final = json.loads(path.read_text())
    assert final["done"] == straight.attacks and final["current"] is None

    calls.clear()  # a finished state: nothing left to run
    done = aa(model, x, y, batch_size=4, state_path=path)
    assert not calls and torch.equal(done.robust, straight.robust)


def test_a_state_made_for_another_model_or_other_data_is_not_used(setup, tmp_path):
    model, x, y = setup
    path = tmp_path / "aa_state.json"
    aa(model, x[:8], y[:8], batch_size=8, state_path=path)
    other = aa(model, x[8:], y[8:], batch_size=8, state_path=path)
    assert not other.resumed and any("other data" in m for m in other.messages)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed[-1].bias += 1e-3
    again = aa(changed, x[8:], y[8:], batch_size=8, state_path=path)
    assert not again.resumed and any("another model" in m for m in again.messages)


def test_registry_entries(setup, straight):
    model, x, y = setup
    assert {"pgd", "autoattack"} <= set(ATTACKS.names())
    flags = ATTACKS.get("autoattack")(model, x, y, eps=EPS, seed=0, num_classes=4, batch_size=4)
    assert torch.equal(flags, straight.robust)
    assert all(p.requires_grad for p in model.parameters())  # frozen only while attacking
    assert all(p.grad is None for p in model.parameters())  # FAB's backward() filled no .grad


def test_a_reduced_budget_scales_every_attack_and_is_flagged(setup, straight):
    from bench.sanity import sanity_warnings

    model, x, y = setup
    full, _, _ = build_autoattack(model, eps=EPS, num_classes=4, seed=0)
    cheap, _, _ = build_autoattack(model, eps=EPS, num_classes=4, seed=0, budget=0.05)
    assert (full.apgd.n_iter, full.apgd_targeted.n_iter, full.fab.n_iter, full.square.n_queries) == (100, 100, 100, 5000)
    assert (cheap.apgd.n_iter, cheap.apgd_targeted.n_iter, cheap.fab.n_iter, cheap.square.n_queries) == (5, 5, 5, 250)
    result = aa(model, x, y, budget=0.05)
    assert result.settings["budget"] == 0.05 and result.settings["apgd_iterations"] == 5
    assert result.correct >= straight.correct  # fewer iterations can only break fewer samples here
    flagged = [w for w in sanity_warnings(None, None, aa_result=result) if "aa_budget" in w]
    assert len(flagged) == 1 and not any("aa_budget" in w for w in sanity_warnings(None, None, aa_result=straight))
