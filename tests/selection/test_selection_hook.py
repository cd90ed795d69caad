"""The epoch-level data-selection hook of `bench.train.fit`: schedule, subset epochs, config checks,
and killed-and-resumed runs (random and RCS) that end where uninterrupted ones do."""

import pytest
import torch
from torch import nn

import methods.acl as acl
from bench.config import EncoderConfig, SelectConfig, TrainConfig, from_dict, resolve
from bench.datasets import load
from bench.datasets.synthetic import Synthetic
from bench.errors import BenchError
from bench.method import MethodContext
from bench.registry import METHODS
from bench.selection import FULL, REUSE, SELECT, RandomSelector, attach_selector, schedule_action
from bench.train import Trainable, fit
from bench.train.loop import CHECKPOINT, load_checkpoint


@pytest.mark.parametrize("e, action", [(1, FULL), (100, FULL), (101, SELECT), (102, REUSE), (120, REUSE),
                                       (121, SELECT), (981, SELECT), (1000, REUSE)])
def test_schedule_of_the_released_loop(e, action):
    assert schedule_action(e - 1, warmup=100, every=20, has_selection=True) == action


def test_schedule_selects_when_nothing_was_selected_yet():
    assert schedule_action(0, warmup=0, every=5, has_selection=False) == SELECT
    assert schedule_action(1, warmup=0, every=5, has_selection=False) == SELECT   # e.g. resumed without state
    assert schedule_action(1, warmup=0, every=5, has_selection=True) == REUSE


class Probe(Trainable):
    """A linear model that records which source images it trained on, per epoch."""

    def __init__(self, **cfg):
        self.cfg = TrainConfig(**{"epochs": 3, "batch_size": 4, "lr": 0.1, **cfg})
        torch.manual_seed(0)
        self.model = nn.Linear(3 * 8 * 8, 4)
        self.seen: dict[int, list[int]] = {}
        self.steps: dict[int, int] = {}

    def training_step(self, x, y, index, info):
        self.seen.setdefault(info.epoch, []).extend(index.tolist())
        self.steps[info.epoch] = info.steps_per_epoch
        return {"loss": nn.functional.cross_entropy(self.model(x.flatten(1)), y)}


@pytest.fixture(scope="module")
def data():
    return load("synthetic", "train", cfg=Synthetic.Config(n_train=40, num_classes=4, image_size=8), val_size=0)


def random_cfg(**kw):
    return SelectConfig(**{"method": "random", "fraction": 0.5, "warmup": 1, "every": 2, **kw})


def test_epochs_train_on_the_selected_subset_with_their_own_step_count(data, tmp_path):
    task = Probe(epochs=5)
    attach_selector(task, random_cfg(warmup=2), seed=1)  # e = 1, 2 full; 3 select; 4 reuse; 5 select
    history = fit(task, data, seed=0, workdir=tmp_path)
    for epoch in (0, 1):
        assert sorted(task.seen[epoch]) == sorted(data.indices.tolist()) and task.steps[epoch] == 10
    first, reused, second = set(task.seen[2]), set(task.seen[3]), set(task.seen[4])
    assert len(first) == 20 and len(task.seen[2]) == 20 and task.steps[2] == 5
    assert first == reused and first != second and len(second) == 20
    assert [h["train_images"] for h in history] == [40, 40, 20, 20, 20]
    assert history[2]["selection_s"] > 0 and all("selection_s" in h for h in history)
    state = load_checkpoint(tmp_path / CHECKPOINT)
    assert state["selection"]["method"] == "random" and state["selection"]["selected_at"] == 4
    assert state["global_step"] == 10 + 10 + 5 + 5 + 5


def test_without_a_selector_nothing_changes(data):
    task = Probe(epochs=1)
    history = fit(task, data, seed=0)
    assert "train_images" not in history[0] and len(task.seen[0]) == 40


def test_random_selection_resumes_exactly(data, tmp_path):
    def run(workdir, stop=None):
        workdir.mkdir(exist_ok=True)
        task = Probe(epochs=4)
        attach_selector(task, random_cfg(every=3), seed=2)
        fit(task, data, seed=0, workdir=workdir, stop_after_epoch=stop)
        return task

    straight = run(tmp_path / "a")
    run(tmp_path / "b", stop=2)  # selected at e = 1; e = 3 reuses that set, which only the checkpoint knows
    resumed = run(tmp_path / "b")
    assert resumed.seen[2] and set(resumed.seen[2]) == set(straight.seen[2])
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key])


def test_random_selection_is_a_function_of_seed_and_epoch(data):
    a, b = RandomSelector(random_cfg(warmup=0), 5, 4), RandomSelector(random_cfg(warmup=0), 5, 4)
    assert torch.equal(a.select(None, 0, data), b.select(None, 0, data))
    assert not torch.equal(a.select(None, 2, data), RandomSelector(random_cfg(warmup=0), 6, 4).select(None, 2, data))


def test_rcs_is_rejected_outside_the_acl_family():
    from bench import grid

    with pytest.raises(BenchError, match="select.method=rcs works only with the ACL family.*simclr"):
        grid.plan(methods="simclr,acl", datasets="synthetic", overrides=["select.method=rcs"], fetch=False)
    for name in ("acl", "acl_air", "dynacl", "dynacl_air", "dynacl_pp", "dynacl_air_pp"):
        _, graph, _ = grid.plan(methods=name, datasets="synthetic", overrides=["select.method=rcs"], fetch=False)
        (own,) = [j for j in graph if j.kind == "pretrain"]
        assert own.config["select"]["method"] == "rcs"
    assert resolve({"select.method": "random"}, ["simclr"]).sections["select"].method == "random"
    with pytest.raises(BenchError, match="select.method"):
        resolve({"select.method": "coreset"}, [])
    simclr = METHODS.get("simclr")
    task = simclr.__new__(simclr)
    task.cfg = simclr.Config()
    with pytest.raises(BenchError, match="ACL family"):
        attach_selector(task, SelectConfig(method="rcs"), seed=0)


def test_rcs_selection_run_resumes_exactly(tmp_path):
    pool = load("synthetic", "train", cfg=Synthetic.Config(n_train=24, n_test=4), val_size=0)
    cfg = SelectConfig(method="rcs", fraction=0.5, warmup=0, every=2, val_fraction=0.2, val_attack_steps=1)

    def run(workdir, stop=None):
        workdir.mkdir(exist_ok=True)
        torch.manual_seed(0)
        ctx = MethodContext(EncoderConfig(width=4), 10, torch.device("cpu"), {})
        method = acl.ACL(from_dict(acl.ACL.Config, {"epochs": 3, "batch_size": 4, "attack_steps": 1,
                                                    "warmup_epochs": 1}, "acl"), ctx)
        attach_selector(method, cfg, seed=4)
        history = fit(method, pool, seed=4, workdir=workdir, stop_after_epoch=stop)
        return method, history

    straight, history = run(tmp_path / "a")
    sizes = [h["train_images"] for h in history]  # e = 1 select, 2 reuse, 3 select: 2 candidate batches each
    assert sizes[0] == sizes[1] and all(3 + 4 <= n <= 8 for n in sizes)  # 19 candidates: batches of 4, 4, 4, 4, 3
    run(tmp_path / "b", stop=1)
    resumed, _ = run(tmp_path / "b")
    assert torch.equal(straight.selector.indices, resumed.selector.indices)
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
