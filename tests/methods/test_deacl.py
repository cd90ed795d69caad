"""DeACL (deacl.md): the teacher dependency and its file form, the student initialized from the
teacher, the attack and loss of its sections 4-5, the schedule, export, resume (its section 12)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from bench.config import EncoderConfig, from_dict
from bench.datasets import load
from bench.datasets.synthetic import Synthetic
from bench.errors import BenchError
from bench.method import MethodContext
from bench.models import bn_state, load_encoder, save_encoder
from bench.models.norm import CIFAR10_MEAN, CIFAR10_STD
from bench.registry import METHODS
from bench.train import StepInfo, fit
from methods.deacl import DeACL, RandomTeacher, deacl_attack, deacl_loss
from methods.simclr import SOLO_RECIPE

WIDTH, BATCH, EPS = 4, 8, 8 / 255


@pytest.fixture(scope="module")
def data():
    return load("synthetic", "train", cfg=Synthetic.Config(n_train=32, n_test=8), val_size=0)


def teacher(width=WIDTH, seed=1):
    t = DeACL.placeholder_teacher(EncoderConfig(width=width), seed=seed)
    t.train()
    for _ in range(2):  # non-trivial running statistics, so buffers matter
        with torch.no_grad():
            t(torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(seed)))
    return t.eval()


def make(inputs=None, width=WIDTH, encoder=None, **overrides) -> DeACL:
    settings = {"batch_size": BATCH, "attack_steps": 2, **overrides}
    cfg = from_dict(DeACL.Config, settings, "deacl")
    ctx = MethodContext(encoder or EncoderConfig(width=width), 10, torch.device("cpu"),
                        {"teacher": teacher(width)} if inputs is None else inputs)
    torch.manual_seed(0)
    method = DeACL(cfg, ctx)
    method.train_mode()
    return method


def images(n=BATCH, seed=2):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- config and dependency


def test_registered_with_the_official_defaults():
    assert METHODS.get("deacl") is DeACL and not DeACL.uses_labels
    c = DeACL.Config()
    assert (c.epochs, c.batch_size, c.lr, c.momentum, c.weight_decay, c.optimizer) == (100, 256, 0.5, 0.9, 5e-4, "sgd")
    assert (c.warmup_epochs, c.warmup_from, c.min_lr) == (10, 0.003, 0.0)
    assert (c.eps, c.alpha, c.attack_steps, c.robust_weight) == (8 / 255, 2 / 255, 5, 2.0)
    assert c.teacher == "simclr_solo" and DeACL.drop_last
    assert (DeACL.normalize, DeACL.stem_padding, DeACL.branches, DeACL.encoder_branch) == \
        ("cifar10", 2, ("normal",), "normal")


def test_teacher_dependency_is_a_simclr_solo_pretrain_job():
    stage, params = DeACL.dependencies(DeACL.Config())["teacher"]
    assert stage == "pretrain" and params["method"] == "simclr"
    assert params["encoder"] == {"stem_padding": 2, "normalize": "cifar10"}
    expected = {k: v for k, v in SOLO_RECIPE.items() if k != "epochs"}
    assert params["settings"] == expected and "source" not in params
    cfg = from_dict(DeACL.Config, {"teacher_epochs": 3, "teacher_batch_size": 0, "teacher_source": "cifar100"}, "deacl")
    _, params = DeACL.dependencies(cfg)["teacher"]
    assert params["settings"]["epochs"] == 3 and "batch_size" not in params["settings"]
    assert params["source"] == "cifar100"
    assert DeACL.dependencies(None) == DeACL.dependencies(DeACL.Config())
    # the settings are valid simclr settings
    from methods.simclr import SimCLR
    simclr = from_dict(SimCLR.Config, params["settings"], "simclr")
    assert (simclr.recipe, simclr.optimizer, simclr.lr, simclr.temperature) == ("solo", "solo_lars", 0.4, 0.2)


def test_file_teacher_dependency_names_the_file_and_its_digest(tmp_path):
    path = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": {}}, path)
    cfg = from_dict(DeACL.Config, {"teacher": f"file:{path}"}, "deacl")
    stage, params = DeACL.dependencies(cfg)["teacher"]
    assert stage == "checkpoint" and params["source"] == str(path.resolve()) and len(params["sha256"]) == 64
    assert params["format"] == "solo_learn" and params["want"] == "encoder"
    assert params["encoder"] == {"stem_padding": 2, "normalize": "cifar10"}
    for bad, match in ((f"file:{tmp_path / 'missing.ckpt'}", "does not exist"), ("simclr", "not one of"),
                       ("file:", "file:PATH")):
        with pytest.raises(BenchError, match=match):
            DeACL.dependencies(from_dict(DeACL.Config, {"teacher": bad}, "deacl"))


def test_a_missing_or_mismatched_teacher_is_refused():
    with pytest.raises(BenchError, match="needs its teacher"):
        make(inputs={})
    wrong = DeACL.placeholder_teacher(EncoderConfig(width=WIDTH, stem_padding=1))
    with pytest.raises(BenchError, match="architecture"):
        make(inputs={"teacher": wrong})
    with pytest.raises(BenchError, match="architecture"):
        make(inputs={"teacher": teacher(width=8)})


def test_placeholder_teachers():
    t = DeACL.placeholder_teacher(EncoderConfig(width=WIDTH), seed=3)
    assert t.stem_padding == 2 and t.normalize.kind == "cifar10" and not t.training
    again = DeACL.placeholder_teacher(EncoderConfig(width=WIDTH), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(t.state_dict().values(), again.state_dict().values()))
    assert DeACL.placeholder_teacher() == RandomTeacher(0)
    method = make(inputs={"teacher": RandomTeacher(3)})
    assert all(torch.equal(a, b) for a, b in zip(method.teacher.state_dict().values(), t.state_dict().values()))
    # `encoder.stem_padding = 1` for both is an option
    both = EncoderConfig(width=WIDTH, stem_padding=1)
    method = make(inputs={"teacher": DeACL.placeholder_teacher(both)}, encoder=both)
    assert method.encoder.stem_padding == method.teacher.stem_padding == 1


# ---------------------------------------------------------------- student, teacher, attack, loss


def test_the_student_equals_the_teacher_before_the_first_step():
    method = make()
    s_state, t_state = method.encoder.state_dict(), method.teacher.state_dict()
    assert s_state.keys() == t_state.keys() and all(torch.equal(s_state[k], t_state[k]) for k in s_state)
    assert method.encoder.stem_padding == 2 and method.encoder.normalize.kind == "cifar10"
    x = images()
    method.encoder.eval()
    with torch.no_grad():
        cos = F.cosine_similarity(method.encoder(x), method.teacher(x), dim=1)
    assert torch.allclose(-cos, -torch.ones(BATCH), atol=1e-6)
    assert method.teacher is not method.ctx.inputs["teacher"]  # a frozen private copy


def test_after_a_step_the_teacher_is_bit_identical_and_the_student_moved(data):
    method = make(epochs=1, steps_per_epoch=1, warmup_epochs=0)
    t_before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    s_before = {k: v.clone() for k, v in method.encoder.state_dict().items()}
    fit(method, data, seed=0)
    assert all(torch.equal(v, t_before[k]) for k, v in method.teacher.state_dict().items())
    assert not method.teacher.training and all(not p.requires_grad and p.grad is None
                                               for p in method.teacher.parameters())
    changed = [k for k, v in method.encoder.state_dict().items() if not torch.equal(v, s_before[k])]
    assert any(k.endswith("weight") for k in changed) and any(k.endswith("running_mean") for k in changed)
    assert all(p.requires_grad for p in method.encoder.parameters())
    trained = {id(p) for p in method.trainable_parameters()}
    assert not trained & {id(p) for p in method.teacher.parameters()}


def test_attack_stays_in_the_ball_and_leaves_batchnorm_untouched():
    method = make(attack_steps=5)
    x = images()
    with torch.no_grad():
        target = method.teacher(x)
    before = bn_state(method.encoder)
    modes = []
    for m in method.encoder.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_pre_hook(lambda mod, args: modes.append(mod.training))
    torch.manual_seed(4)
    adv = deacl_attack(method.encoder, x, target, eps=EPS, alpha=2 / 255, steps=5)
    assert (adv - x).abs().max() <= EPS + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert not torch.equal(adv, x) and modes and not any(modes)  # eval mode throughout
    after = bn_state(method.encoder)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert method.encoder.training and all(p.grad is None for p in method.encoder.parameters())
    with torch.no_grad():  # the attack pushes the student's feature away from the teacher's
        method.encoder.eval()
        start = F.cosine_similarity(method.encoder(x), target).sum()
        end = F.cosine_similarity(method.encoder(adv), target).sum()
    assert end < start


def test_the_step_forwards_clean_and_adversarial_together_in_train_mode():
    method = make()
    seen = []
    method.encoder.register_forward_pre_hook(lambda mod, args: seen.append((args[0].shape[0], mod.training)))
    method.teacher.register_forward_pre_hook(lambda mod, args: seen.append(("teacher", mod.training)))
    out = method.step(images())
    assert seen[0] == ("teacher", False)
    assert seen[1:-1] == [(BATCH, False)] * method.cfg.attack_steps  # the attack
    assert seen[-1] == (2 * BATCH, True)  # one train-mode forward of [x; x_adv]
    assert set(out) == {"loss", "distill_loss", "robust_loss"}


def test_loss_equals_the_formula_with_gradients_through_both_terms():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(6, 10, generator=g, requires_grad=True)
    a = torch.randn(6, 10, generator=g, requires_grad=True)
    t = torch.randn(6, 10, generator=g)
    cos = lambda u, v: (u * v).sum(1) / (u.norm(dim=1) * v.norm(dim=1))  # noqa: E731
    expected = -cos(s, t).mean() - 2.0 * cos(a, s).mean()
    out = deacl_loss(s, a, t, 2.0)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    grad_s, grad_a = torch.autograd.grad(out["loss"], [s, a])
    ref_s, ref_a = torch.autograd.grad(expected, [s, a])
    assert torch.allclose(grad_s, ref_s, atol=1e-6) and torch.allclose(grad_a, ref_a, atol=1e-6)
    robust_only = torch.autograd.grad(deacl_loss(s, a, t, 2.0)["robust_loss"], s)[0]
    assert robust_only.abs().sum() > 0  # s is not detached in the robust term


def test_gamma_zero_is_clean_feature_distillation():
    g = torch.Generator().manual_seed(6)
    s, a, t = (torch.randn(4, 8, generator=g) for _ in range(3))
    out = deacl_loss(s, a, t, 0.0)
    assert out["loss"].item() == pytest.approx(-F.cosine_similarity(s, t).mean().item(), rel=1e-6)
    method = make(robust_weight=0.0)
    out = method.step(images())
    assert torch.equal(out["loss"].detach(), out["distill_loss"])
    grads = torch.autograd.grad(out["loss"], list(method.encoder.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_labels_are_never_read(data):
    method = make()
    x = images()
    losses = []
    for y in (torch.zeros(BATCH, dtype=torch.long), torch.full((BATCH,), -1)):
        method = make()
        torch.manual_seed(0)
        losses.append(method.training_step(x, y, torch.arange(BATCH), StepInfo(0, 0, 0, 1, 0.1))["loss"].detach())
    assert torch.equal(*losses)


def test_per_epoch_warmup_cosine_schedule():
    method = DeACL.__new__(DeACL)
    method.cfg = DeACL.Config()
    lr = lambda e, s=0: method.lr_at(e, s, 195)  # noqa: E731
    assert lr(0) == pytest.approx(0.003)
    for e in range(10):
        assert lr(e) == pytest.approx(0.003 + e * (0.5 - 0.003) / 9) == lr(e, 194)  # per epoch
    assert lr(9) == pytest.approx(0.5) and lr(10) == pytest.approx(0.5)
    assert lr(55) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)) / 2)
    assert lr(99) == pytest.approx(1.52e-4, rel=0.01)


# ---------------------------------------------------------------- export, files, resume


def test_export_is_the_student_and_survives_save_and_load(tmp_path):
    method = make()
    with torch.no_grad():
        method.encoder.conv1.weight.add_(0.1)  # a student that differs from its teacher
    exported = method.export_encoder()
    assert exported is not method.encoder and exported.stem_padding == 2 and exported.normalize.kind == "cifar10"
    save_encoder(tmp_path / "encoder.pt", exported)
    again = load_encoder(tmp_path / "encoder.pt")
    assert again.stem_padding == 2 and again.normalize.kind == "cifar10"
    x = images(4)
    with torch.no_grad():
        assert torch.equal(again(x), exported(x))
        assert not torch.allclose(exported(x), method.teacher(x))


def solo_learn_resnet18() -> nn.Module:
    """solo-learn's CIFAR backbone, built from torchvision (the official key names and shapes)."""
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


def test_a_solo_learn_checkpoint_loads_strictly_into_the_encoder(tmp_path):
    torch.manual_seed(7)
    backbone = solo_learn_resnet18()
    backbone.train()
    with torch.no_grad():
        backbone(torch.rand(4, 3, 32, 32))  # running statistics that differ from the init
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    state.update({"projector.0.weight": torch.zeros(2048, 512), "classifier.weight": torch.zeros(10, 512),
                  "momentum_backbone.conv1.weight": torch.zeros(64, 3, 3, 3)})
    path = tmp_path / "simclr-cifar10-ep=999.ckpt"
    torch.save({"state_dict": state, "epoch": 999, "global_step": 194805}, path)

    enc = EncoderConfig(width=64)
    t = DeACL.load_teacher_file(path, enc)
    assert t.state_dict()["blocks.4.shortcut_bn.running_var"].equal(state["backbone.layer3.0.downsample.1.running_var"])
    assert t.state_dict()["blocks.7.conv2.weight"].equal(state["backbone.layer4.1.conv2.weight"])
    # the same function as solo-learn's network fed normalized images (DeACL's in-model constants)
    x = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    backbone.eval()
    with torch.no_grad():
        assert torch.allclose(t(x), backbone((x - mean) / std), atol=1e-5)
    # a DeACL run with deacl.teacher=file:PATH loads it when no teacher job output is given
    cfg = from_dict(DeACL.Config, {"teacher": f"file:{path}"}, "deacl")
    method = DeACL(cfg, MethodContext(enc, 10, torch.device("cpu"), {}))
    assert all(torch.equal(v, t.state_dict()[k]) for k, v in method.encoder.state_dict().items())
    # strict: a missing or misshapen key is refused with the key named
    del state["backbone.layer2.0.downsample.0.weight"]
    torch.save({"state_dict": state}, path)
    with pytest.raises(BenchError, match="missing keys \\(1\\): blocks.2.shortcut_conv.weight"):
        DeACL.load_teacher_file(path, enc)
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}}, path)
    with pytest.raises(BenchError, match="does not fit the student's encoder: it has width 64"):
        DeACL.load_teacher_file(path, EncoderConfig(width=32))


def test_killed_and_resumed_run_ends_with_the_same_weights(data, tmp_path):
    settings = {"epochs": 3, "steps_per_epoch": 2, "warmup_epochs": 2, "attack_steps": 1}
    finals = []
    for stop in (None, 1, 2):
        workdir = tmp_path / f"run{stop}"
        workdir.mkdir()
        method = make(**settings)
        if stop is not None:
            fit(method, data, seed=0, workdir=workdir, stop_after_epoch=stop)
            method = make(**settings)  # a fresh start: the student comes from the checkpoint
        history = fit(method, data, seed=0, workdir=workdir)
        finals.append((method.encoder.state_dict(), history))
    ref, ref_history = finals[0]
    for state, history in finals[1:]:
        assert all(torch.equal(state[k], ref[k]) for k in ref)
        assert [h["loss"] for h in history] == [h["loss"] for h in ref_history]


def test_published_numbers_are_labelled_by_source_and_protocol():
    import json
    from pathlib import Path

    import bench.report

    doc = json.loads((Path(bench.report.__file__).parent / "published" / "deacl_ainfonce.json").read_text())
    rows = doc["rows"]
    assert {r["method"] for r in rows} == {"deacl", "ainfonce", "advcl"}
    for r in rows:
        assert r["source_label"] in doc["source_labels"] and r["protocol"] and r["cite"]
        assert r["finetuner"] in doc["finetuners"] and r["source"] in doc["datasets"] and r["target"] in doc["datasets"]
        values = [r[k] for k in ("aa", "ra", "sa") if k in r]
        assert values and all(0 < v < 100 for v in values) and values == sorted(values)  # AA <= RA <= SA
    readme_slf = [r for r in rows if r["method"] == "deacl" and r["cite"].endswith("README.md:65")]
    assert len(readme_slf) == 1
    assert (readme_slf[0]["aa"], readme_slf[0]["ra"], readme_slf[0]["sa"]) == (46.14, 53.45, 80.82)
