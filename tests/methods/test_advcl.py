"""AdvCL (docs/methods.md §1): branches, attack, loss scale, views of Table 4, fast = naive schedule."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import methods.advcl as advcl
from bench.config import EncoderConfig, TrainConfig, from_dict, resolve, to_dict
from bench.datasets import load
from bench.datasets.synthetic import Synthetic
from bench.errors import BenchError
from bench.method import MethodContext
from bench.models import bn_state
from bench.models.norm import BranchedBatchNorm2d
from bench.registry import METHODS
from benchmarks.advcl_reference import naive_step
from methods.advcl import TABLE4_VIEWS, VIEWS, AdvCL, advcl_contrastive

WIDTH, BATCH, KS = 4, 8, (2, 3)
EPS = 8 / 255


@pytest.fixture(scope="module")
def data():
    return load("synthetic", "train", cfg=Synthetic.Config(n_train=48, n_test=8), val_size=8)


def make(data, seed=0, labels=None, **overrides) -> AdvCL:
    settings = {"batch_size": BATCH, "attack_steps": 2, "cluster_ks": list(KS), **overrides}
    cfg = from_dict(AdvCL.Config, settings, "advcl")
    if labels is None:
        size = int(data.indices.max()) + 1
        g = torch.Generator().manual_seed(seed)
        labels = {k: torch.randint(k, (size,), generator=g) for k in KS}
    ctx = MethodContext(EncoderConfig(width=WIDTH), data.num_classes, torch.device("cpu"),
                        {"pseudo_labels": labels})
    torch.manual_seed(seed)
    method = AdvCL(cfg, ctx)
    method.train_mode()
    return method


def fake_inputs(data, seed=1) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Fixed stand-ins for the clean views (the step only needs the tensors)."""
    g = torch.Generator().manual_seed(seed)
    x = data.images(slice(0, BATCH))
    inputs = {"x_org": x, "tau1": torch.rand(x.shape, generator=g), "tau2": torch.rand(x.shape, generator=g)}
    inputs["x_hfc"] = x - x.mean(dim=(2, 3), keepdim=True)  # zero-mean, may be negative, like HFC
    inputs["x_lfc"] = x.mean(dim=(2, 3), keepdim=True).expand_as(x).contiguous()
    return inputs, data.indices[:BATCH]


def run(method, schedule, inputs, index, state, seed=3):
    """Restore `state`, run a schedule + backward with seeded random starts."""
    method.model.load_state_dict(state)
    method.model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = schedule(method, inputs, index)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in method.model.named_parameters() if p.grad is not None}
    return out, grads, bn_state(method.model)


def ours(method, inputs, index):
    return method.step(inputs, index)


class Capture:
    """Records (branch, encoder input) of every encoder forward and the attack's outputs."""

    def __init__(self, method, monkeypatch):
        self.forwards: list[tuple[str, torch.Tensor]] = []
        self.bn_branches: list[str] = []
        self.advs: list[torch.Tensor] = []
        enc = method.model.encoder
        enc.register_forward_pre_hook(lambda mod, args: self.forwards.append((args[1], args[0].detach().clone())))
        stem = enc.bn1
        assert isinstance(stem, BranchedBatchNorm2d)
        stem.register_forward_pre_hook(lambda mod, args: self.bn_branches.append(args[1]))
        real_pgd = advcl.pgd

        def spy(*args, **kwargs):
            out = real_pgd(*args, **kwargs)
            self.advs = [a.clone() for a in out]
            self.kwargs = kwargs
            return out

        monkeypatch.setattr(advcl, "pgd", spy)

    def branches_of(self, x: torch.Tensor) -> set[str]:
        return {b for b, inp in self.forwards if inp.shape == x.shape and torch.equal(inp, x)}


# ---------------------------------------------------------------- loss and config


def test_contrastive_scale_reference_value():
    z = torch.ones(2, 16)
    value = advcl_contrastive([z, z, z, z], temperature=0.5, scale=0.5 / 0.07)
    assert value.item() == pytest.approx(13.899358, abs=1e-5)
    assert value.item() == pytest.approx((0.5 / 0.07) * math.log(7), rel=1e-6)
    assert AdvCL.Config().contrastive_scale == pytest.approx(0.5 / 0.07)


def test_paper_defaults():
    c = AdvCL.Config()
    assert (c.lr, c.momentum, c.weight_decay, c.batch_size, c.epochs) == (0.5, 0.9, 1e-4, 512, 1000)
    assert (c.eps, c.alpha, c.attack_steps, c.temperature, c.ce_weight) == (8 / 255, 2 / 255, 5, 0.5, 0.2)
    assert c.views == TABLE4_VIEWS[7] == ("adv_x", "tau1", "tau2", "x_hfc")
    assert c.cluster_ks == (2, 10, 50, 100, 500) and c.pseudo_labels == "simclr" and c.freq_radius == 8
    assert AdvCL.branches == ("normal", "pgd", "pgd_ce") and AdvCL.encoder_branch == "pgd"
    assert AdvCL.normalize == "none" and METHODS.get("advcl") is AdvCL


def test_learning_rate_schedule():
    c = AdvCL.Config()
    m = AdvCL.__new__(AdvCL)
    m.cfg = c
    cosine = lambda e: 5e-4 + (0.5 - 5e-4) * (1 + math.cos(math.pi * e / 1000)) / 2  # noqa: E731
    assert m.lr_at(0, 0, 100) == pytest.approx(0.01)
    assert m.lr_at(5, 0, 100) == pytest.approx(0.01 + 0.5 * (cosine(10) - 0.01))  # linear per iteration
    assert m.lr_at(9, 99, 100) < cosine(10)
    assert m.lr_at(10, 0, 100) == m.lr_at(10, 57, 100) == pytest.approx(cosine(11))  # per epoch
    assert m.lr_at(999, 0, 100) == pytest.approx(5e-4)


def test_every_table4_row_is_a_config_value():
    for row, views in TABLE4_VIEWS.items():
        resolved = resolve({"advcl.views": list(views)}, ["advcl"])
        assert resolved["advcl"].views == views
        again = from_dict(AdvCL.Config, to_dict(resolved["advcl"]), "advcl")
        assert again.views == views
    cli = resolve({"advcl.views": '["adv_x", "tau1", "tau2", "x_lfc"]'}, ["advcl"])
    assert cli["advcl"].views == TABLE4_VIEWS[5]
    assert set(v for row in TABLE4_VIEWS.values() for v in row) == set(VIEWS)


@pytest.mark.parametrize("views, match", [(("adv_x", "tau3"), "unknown view"), (("adv_x",), "at least two"),
                                          (("tau1", "tau2"), "no adversarial"), (("adv_x", "adv_x"), "twice")])
def test_bad_view_sets_are_refused_before_work(views, match):
    cfg = AdvCL.Config()
    cfg.views = views
    with pytest.raises(BenchError, match=match):
        AdvCL.dependencies(cfg)


def test_dependencies(tmp_path):
    assert AdvCL.dependencies(AdvCL.Config()) == {  # role -> (stage, its parameters)
        "pseudo_labels": ("pseudo_labels", {"source": "simclr", "ks": [2, 10, 50, 100, 500], "file": None})}
    assert AdvCL.dependencies(None)["pseudo_labels"][1]["source"] == "simclr"
    cfg = AdvCL.Config()
    cfg.pseudo_labels = "imagenet"
    cfg.cluster_ks = (10,)
    assert AdvCL.dependencies(cfg) == {"pseudo_labels": ("pseudo_labels", {"source": "imagenet", "ks": [10], "file": None})}
    label_file = tmp_path / "labels.npz"
    label_file.write_bytes(b"pretend")
    cfg.pseudo_labels = f"file:{label_file}"
    stage, params = AdvCL.dependencies(cfg)["pseudo_labels"]
    assert stage == "pseudo_labels" and params["source"] == "file" and params["file"] == str(label_file.resolve()) and len(params["sha256"]) == 64
    cfg.pseudo_labels = f"file:{tmp_path / 'missing.pkl'}"
    with pytest.raises(BenchError, match="does not exist"):
        AdvCL.dependencies(cfg)
    cfg.pseudo_labels = "imagnet"
    with pytest.raises(BenchError, match="not one of"):
        AdvCL.dependencies(cfg)


@pytest.mark.parametrize("setting", [{"pseudo_labels": "none"}, {"ce_weight": 0.0}])
def test_without_clusterfit_there_are_no_heads_and_no_dependency(setting, data, monkeypatch):
    cfg = from_dict(AdvCL.Config, setting, "advcl")
    assert AdvCL.dependencies(cfg) == {}
    ctx = MethodContext(EncoderConfig(width=WIDTH), data.num_classes, torch.device("cpu"), {})
    method = AdvCL(from_dict(AdvCL.Config, {**setting, "attack_steps": 1}, "advcl"), ctx)  # no labels needed
    assert not method.uses_ce and len(method.model.cluster_heads) == 0
    method.train_mode()
    cap = Capture(method, monkeypatch)
    inputs, index = fake_inputs(data)
    before = bn_state(method.model)
    out = method.step(inputs, index)
    assert "ce_loss" not in out and torch.isfinite(out["loss"])
    assert len(cap.advs) == 1 and "pgd_ce" not in {b for b, _ in cap.forwards}
    after = bn_state(method.model)
    assert all(torch.equal(before[k], after[k]) for k in before if ".bns.pgd_ce." in k)


def test_missing_or_partial_pseudo_labels_are_refused(data):
    with pytest.raises(BenchError, match="needs pseudo-labels"):
        AdvCL(AdvCL.Config(), MethodContext(EncoderConfig(width=WIDTH), 10, torch.device("cpu"), {}))
    with pytest.raises(BenchError, match=r"K=\[3\] are missing"):
        make(data, labels={2: torch.zeros(100, dtype=torch.long)})
    size = int(data.indices.max()) + 1
    labels = {k: torch.full((size,), -1, dtype=torch.long) for k in KS}
    method = make(data, labels=labels)
    inputs, index = fake_inputs(data)
    with pytest.raises(BenchError, match="no pseudo-label"):
        method.step(inputs, index)


# ---------------------------------------------------------------- one step


def test_views_enter_their_branches_and_attack_stays_in_the_ball(data, monkeypatch):
    method = make(data)
    cap = Capture(method, monkeypatch)
    inputs, index = fake_inputs(data)
    weights = {k: v.clone() for k, v in method.model.named_parameters()}
    bn_modes = []
    for m in method.model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.register_forward_pre_hook(lambda mod, args: bn_modes.append(mod.training))
    out = method.step(inputs, index)

    # the attack: unclamped random start, eps 8/255, alpha 2/255, model in train mode
    assert bn_modes and all(bn_modes)  # every BatchNorm forward, attack steps included, in train mode
    assert cap.kwargs["clamp_start"] is False and cap.kwargs["random_start"] == "uniform"
    assert cap.kwargs["eps"] == pytest.approx(EPS) and cap.kwargs["alpha"] == pytest.approx(2 / 255)
    x_cl, x_ce = cap.advs
    for adv in (x_cl, x_ce):
        assert (adv - inputs["x_org"]).abs().max() <= EPS + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1
        assert not torch.equal(adv, inputs["x_org"])
    assert not torch.equal(x_cl, x_ce)  # two independent adversarial examples
    assert method.model.training

    # branches: fixed views through `normal` (once each), x_cl through `pgd`, x_ce through `pgd_ce`
    for name in ("tau1", "tau2", "x_hfc"):
        assert cap.branches_of(inputs[name]) == {"normal"}
    assert sum(torch.equal(inp, inputs["x_hfc"]) for _, inp in cap.forwards) == 1
    assert cap.branches_of(x_cl) == {"pgd"} and cap.branches_of(x_ce) == {"pgd_ce"}
    steps = method.cfg.attack_steps
    branches = [b for b, _ in cap.forwards]
    assert branches.count("normal") == 3 and branches.count("pgd") == branches.count("pgd_ce") == steps + 1
    assert cap.bn_branches == branches  # the stem BatchNorm saw the same branches
    assert "x_lfc" not in {n for n in inputs if cap.branches_of(inputs[n])}

    # the attack used input gradients only: weights untouched, no parameter gradients
    for k, v in method.model.named_parameters():
        assert torch.equal(v, weights[k]) and v.grad is None
    assert set(out) == {"loss", "cl_loss", "ce_loss"}
    assert out["loss"].item() == pytest.approx(out["cl_loss"].item() + 0.2 * out["ce_loss"].item(), rel=1e-5)


def test_only_x_ce_feeds_the_ce_term(data, monkeypatch):
    method = make(data, attack_steps=1)
    seen = []
    heads = method.model.cluster_heads
    for head in heads.values():
        head.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    cap = Capture(method, monkeypatch)
    inputs, index = fake_inputs(data)
    method.step(inputs, index)
    ce_features = [f for b, f in cap.forwards if b == "pgd_ce"]
    assert len(seen) == len(heads) * len(ce_features)  # heads run only on x_ce's features
    with torch.no_grad():
        final = method.model.encoder(cap.advs[-1], "pgd_ce")  # train mode: batch statistics
    assert torch.allclose(seen[-1], final, atol=1e-6)


@pytest.mark.parametrize("row", sorted(TABLE4_VIEWS))
def test_fast_step_equals_the_naive_schedule(row, data):
    """Every Table 4 view set: same loss, parameter gradients and BatchNorm statistics."""
    method = make(data, views=list(TABLE4_VIEWS[row]))
    inputs, index = fake_inputs(data)
    state = copy.deepcopy(method.model.state_dict())
    fast, fast_grads, fast_bn = run(method, ours, inputs, index, state)
    slow, slow_grads, slow_bn = run(method, naive_step, inputs, index, state)
    assert torch.isfinite(fast["loss"])
    assert torch.allclose(fast["loss"], slow["loss"], rtol=1e-6, atol=1e-6)
    assert torch.allclose(fast["ce_loss"], slow["ce_loss"], rtol=1e-6, atol=1e-6)
    assert fast_grads.keys() == slow_grads.keys()
    assert any(k.startswith("encoder.") for k in fast_grads) and any(k.startswith("cluster_heads.") for k in fast_grads)
    for k in fast_grads:
        assert torch.allclose(fast_grads[k], slow_grads[k], rtol=1e-4, atol=1e-6), k
    for k in fast_bn:  # running statistics too: `normal` and the head BN replayed, not just skipped
        assert torch.allclose(fast_bn[k].double(), slow_bn[k].double(), rtol=1e-5, atol=1e-6), k
    changed = {k.split(".bns.")[1].split(".")[0] for k in fast_bn
               if ".bns." in k and not torch.equal(fast_bn[k], state[k])}
    clean = any(not VIEWS[v][1] for v in TABLE4_VIEWS[row])
    assert changed == ({"normal", "pgd", "pgd_ce"} if clean else {"pgd", "pgd_ce"})


def test_bn_statistics_would_differ_without_the_replay(data, monkeypatch):
    """The replay is what makes the `normal` statistics match (naive: one update per view per round)."""
    method = make(data)
    inputs, index = fake_inputs(data)
    state = copy.deepcopy(method.model.state_dict())
    _, _, slow_bn = run(method, naive_step, inputs, index, state)
    monkeypatch.setattr(advcl, "replayed_rounds", lambda *a: __import__("contextlib").nullcontext())
    _, _, fast_bn = run(method, ours, inputs, index, state)
    key = "encoder.bn1.bns.normal.num_batches_tracked"
    assert int(slow_bn[key]) == 3 * (method.cfg.attack_steps + 1) and int(fast_bn[key]) == 3


def test_exported_encoder_is_the_pgd_branch(data):
    method = make(data)
    inputs, index = fake_inputs(data)
    for _ in range(2):  # give the branches different statistics
        method.step(inputs, index)
    exported = method.export_encoder()
    assert exported.branches == ("pgd",) and not exported.training
    x = data.images(slice(0, 4))
    method.model.eval()
    with torch.no_grad():
        assert torch.allclose(exported(x), method.model.encoder(x, "pgd"), atol=1e-6)
        assert not torch.allclose(exported(x), method.model.encoder(x, "normal"), atol=1e-4)


def test_training_step_builds_its_views(data):
    from bench.frequency import hfc, lfc

    method = make(data, views=list(TABLE4_VIEWS[6]))
    x = data.images(slice(0, BATCH))
    torch.manual_seed(0)
    inputs = method.make_inputs(x)
    assert set(inputs) == {"tau1", "tau2", "x_org", "x_hfc", "x_lfc"}
    assert all(v.shape == x.shape for v in inputs.values())
    assert torch.allclose(inputs["x_hfc"], hfc(inputs["x_org"], 8))
    assert torch.allclose(inputs["x_lfc"], lfc(inputs["x_org"], 8))
    assert not torch.equal(inputs["tau1"], inputs["tau2"])
    from bench.train import StepInfo

    out = method.training_step(x, data.y[:BATCH], data.indices[:BATCH], StepInfo(0, 0, 0, 1, 0.5))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert issubclass(AdvCL.Config, TrainConfig)


def test_bn_shards_normalize_each_shard_as_the_official_dataparallel_replicas(data):
    """advcl.bn_shards=2: every train-mode BatchNorm (backbone branches and the projection head) sees
    half the batch, as each GPU of the official 2-GPU DataParallel run; running statistics follow GPU 0."""
    from bench.train.bn_shards import sharded_batchnorm

    method = make(data, bn_shards=2)
    assert method.cfg.bn_shards == 2 and method.min_batch_size() == 4 and AdvCL.Config().bn_shards == 1
    assert to_dict(method.cfg)["bn_shards"] == 2  # a config field: in every record's config
    x = data.images(slice(0, BATCH))
    replicas = [copy.deepcopy(method.model) for _ in range(2)]
    for r in replicas:
        r.head.bn_shards = 1  # one GPU's replica normalizes all it gets
    with sharded_batchnorm(method.model.encoder, 2):
        z = method.model.project(x, "pgd")
        z_normal = method.model.project(x, "normal")
    half = BATCH // 2
    assert torch.allclose(z, torch.cat([replicas[0].project(x[:half], "pgd"), replicas[1].project(x[half:], "pgd")]),
                          atol=1e-5)
    assert torch.allclose(z_normal, torch.cat([replicas[0].project(x[:half], "normal"),
                                               replicas[1].project(x[half:], "normal")]), atol=1e-5)
    for k, v in bn_state(method.model).items():
        assert torch.equal(v, bn_state(replicas[0])[k]), k
    plain = make(data)
    assert not torch.allclose(plain.model.project(x, "pgd"), z, atol=1e-3)  # whole-batch statistics differ


def test_fast_step_equals_the_naive_schedule_with_bn_shards(data):
    from bench.train.bn_shards import sharded_batchnorm

    def sharded(schedule):
        def step(method, inputs, index):
            with sharded_batchnorm(method.model.encoder, method.cfg.bn_shards):
                return schedule(method, inputs, index)
        return step

    method = make(data, bn_shards=2)
    inputs, index = fake_inputs(data)
    state = copy.deepcopy(method.model.state_dict())
    fast, fast_grads, fast_bn = run(method, sharded(ours), inputs, index, state)
    slow, slow_grads, slow_bn = run(method, sharded(naive_step), inputs, index, state)
    assert torch.allclose(fast["loss"], slow["loss"], rtol=1e-6, atol=1e-6)
    for k in fast_grads:
        assert torch.allclose(fast_grads[k], slow_grads[k], rtol=1e-4, atol=1e-6), k
    for k in fast_bn:
        assert torch.allclose(fast_bn[k].double(), slow_bn[k].double(), rtol=1e-5, atol=1e-6), k
    _, whole_grads, _ = run(make(data), ours, inputs, index, state)
    assert not all(torch.allclose(whole_grads[k], fast_grads[k], rtol=1e-3, atol=1e-6) for k in fast_grads)
    from bench.train import StepInfo

    out = method.training_step(data.images(slice(0, BATCH)), data.y[:BATCH], data.indices[:BATCH],
                               StepInfo(0, 0, 0, 1, 0.5))
    assert torch.isfinite(out["loss"]) and all("forward" not in vars(m) for m in method.model.modules())
