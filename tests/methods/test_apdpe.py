"""AP-DPE (docs/methods.md §4): task transforms, selfie loss, gradient diversity, attack, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.config import EncoderConfig, from_dict
from bench.errors import BenchError
from bench.method import MethodContext
from bench.models import ResNet18
from bench.registry import METHODS
from bench.train import build_optimizer
from methods.apdpe import (
    APDPE, JIGSAW_CLASSES, JIGSAW_PERMUTATIONS, from_patches, gradient_diversity, jigsaw,
    make_jigsaw_permutations, rotate, sample_jigsaw_labels, sample_selfie_masks, selfie_loss,
    to_patches, unrotate,
)

WIDTH, BATCH = 4, 8


def make(**overrides) -> APDPE:
    settings = {"batch_size": BATCH, **APDPE.test_settings, **overrides}
    cfg = from_dict(APDPE.Config, settings, "apdpe")
    torch.manual_seed(0)
    return APDPE(cfg, MethodContext(EncoderConfig(width=WIDTH), 10, torch.device("cpu"), {}))


def images(n: int = BATCH, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_registered_with_the_paper_defaults():
    assert METHODS.get("apdpe") is APDPE
    c = APDPE.Config()
    assert (c.epochs, c.optimizer, c.nesterov, c.momentum, c.weight_decay, c.schedule, c.warmup_epochs) == \
        (150, "sgd", True, 0.9, 1e-4, "cosine", 0)
    assert (c.lr, c.batch_size, c.min_lr) == (0.1, 128, 1e-8)
    assert (c.eps, c.alpha, c.attack_steps, c.diversity_weight, c.penalty_weight) == (8 / 255, 2 / 255, 10, 0.1, 0.1)
    assert (c.selfie_layers, c.selfie_d_model, c.selfie_heads, c.selfie_ff, c.selfie_dropout) == \
        (13, 1024, 0, 2048, 0.1)  # heads 0 = d_model // 64 = 16
    assert c.gradient_space == "task"  # spec and official code
    assert APDPE.normalize == "imagenet"


# ---------------------------------------------------------------- transforms


def test_rotation_is_undone_by_the_inverse_rotation():
    x = images()
    k = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    r = rotate(x, k)
    for i in range(len(x)):
        assert torch.equal(r[i], torch.rot90(x[i], int(k[i]), dims=(1, 2)))
    assert torch.equal(unrotate(r, k), x)


def test_patches_round_trip_and_layout():
    x = images(2)
    p = to_patches(x)
    assert p.shape == (2, 16, 3, 8, 8)
    assert torch.equal(p[1, 6], x[1, :, 8:16, 16:24])  # patch 6 = row 1, column 2
    assert torch.equal(from_patches(p), x)


def test_jigsaw_permutations_are_fixed_distinct_and_start_with_the_identity():
    assert JIGSAW_PERMUTATIONS.shape == (31, 16) and JIGSAW_CLASSES == 31
    assert torch.equal(JIGSAW_PERMUTATIONS[0], torch.arange(16))
    assert len({tuple(r.tolist()) for r in JIGSAW_PERMUTATIONS}) == 31
    assert all(sorted(r.tolist()) == list(range(16)) for r in JIGSAW_PERMUTATIONS)
    assert torch.equal(make_jigsaw_permutations(), JIGSAW_PERMUTATIONS)  # same in every process


def test_jigsaw_label_zero_is_the_image_and_label_k_moves_patches_as_its_permutation_says():
    x = images(3)
    assert torch.equal(jigsaw(x, torch.zeros(3, dtype=torch.long)), x)
    labels = torch.tensor([5, 17, 30])
    out_p, in_p = to_patches(jigsaw(x, labels)), to_patches(x)
    for i, label in enumerate(labels.tolist()):
        perm = JIGSAW_PERMUTATIONS[label]
        for p in range(16):
            assert torch.equal(out_p[i, p], in_p[i, perm[p]])


def test_jigsaw_labels_force_the_identity_with_probability_p():
    torch.manual_seed(0)
    labels = sample_jigsaw_labels(200_000, torch.device("cpu"), identity_p=0.1)
    assert labels.min() == 0 and labels.max() == 30
    expected = 0.1 + 0.9 / 31
    assert (labels == 0).float().mean().item() == pytest.approx(expected, abs=0.005)


def test_selfie_masks_split_the_sixteen_positions():
    masked, visible = sample_selfie_masks(5, torch.device("cpu"))
    assert masked.shape == (5, 4) and visible.shape == (5, 12)
    for m, v in zip(masked, visible):
        assert sorted(m.tolist() + v.tolist()) == list(range(16))


def test_gradients_map_back_through_the_pixel_permutations():
    # The attack perturbs images in original coordinates and feeds T(x) to each task; the
    # gradient there is T^-1 of the gradient w.r.t. the task input, and PGD's sign step commutes.
    x = images(4).requires_grad_(True)
    k, labels = torch.tensor([1, 2, 3, 0]), torch.tensor([0, 3, 9, 30])
    w = torch.randn(4, 3, 32, 32)
    for transform, inverse in ((lambda t: rotate(t, k), lambda t: unrotate(t, k)),):
        task_in = transform(x)
        g_x, g_task = torch.autograd.grad((task_in * w).sum(), [x, task_in])
        assert torch.equal(g_x, inverse(g_task))
    task_in = jigsaw(x, labels)
    g_x, g_task = torch.autograd.grad((task_in * w).sum(), [x, task_in])
    assert torch.allclose((g_x * g_x).sum(), (g_task * g_task).sum())  # a permutation keeps norms
    assert torch.equal(jigsaw(g_x, labels), g_task)


# ---------------------------------------------------------------- losses


def test_selfie_loss_of_uniform_scores_is_log_four():
    assert selfie_loss(torch.zeros(6, 4, 4)).item() == pytest.approx(math.log(4), abs=1e-6)
    assert selfie_loss(torch.full((2, 4, 4), 3.7)).item() == pytest.approx(math.log(4), abs=1e-6)
    perfect = torch.eye(4).expand(2, 4, 4) * 50
    assert selfie_loss(perfect).item() < 1e-6


def test_logdet_reference_values():
    g = torch.randn(5, 3, 32, 32)
    identical = gradient_diversity([g, 2 * g, 0.5 * g])  # normalization removes the scale
    assert identical.shape == (5,)
    assert torch.allclose(identical, torch.full((5,), math.log(3 + 1e-5) + 2 * math.log(1e-5)), atol=1e-3)
    assert identical.mean().item() == pytest.approx(-21.927, abs=1e-3)
    basis = torch.eye(3 * 32 * 32)[:3].view(3, 1, 3, 32, 32)
    orthogonal = gradient_diversity([basis[0], basis[1], basis[2]])
    assert orthogonal.item() == pytest.approx(3e-5, abs=1e-6)


# ---------------------------------------------------------------- model


def test_model_structure_and_exported_encoder_is_the_rotation_branch():
    method = make()
    model = method.model
    assert isinstance(model.encoder, ResNet18) and model.encoder.normalize.kind == "imagenet"
    assert len(model.layer4) == 2 and all(a is not b for a, b in zip(model.layer4, model.encoder.blocks[6:]))
    exported = method.export_encoder()
    x = images(4)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.rotation_fc(exported(x)), model.classify(x, "rotation"), atol=1e-5)
        assert not torch.allclose(model.jigsaw_fc(exported(x)), model.classify(x, "jigsaw"), atol=1e-3)
    jig = make(encoder_task="jigsaw")
    jig.model.eval()
    with torch.no_grad():
        assert torch.allclose(jig.model.jigsaw_fc(jig.export_encoder()(x)), jig.model.classify(x, "jigsaw"), atol=1e-5)


def test_selfie_head_sizes_follow_the_config():
    method = make(selfie_layers=2, selfie_d_model=32, selfie_heads=4, selfie_ff=16)
    head = method.model.selfie
    assert len(head.layers) == 2 and head.layers[0].heads == 4 and isinstance(head.proj, nn.Linear)
    assert make().model.selfie.layers[0].heads == 1  # test_settings' d_model 64: one head of 64
    official = make(selfie_d_model=1024, selfie_heads=0).model.selfie  # the default size
    assert official.layers[0].heads == 16 and official.layers[0].qkv.in_features == 1024
    assert (official.proj.in_features, official.proj.out_features) == (4 * WIDTH, 1024)
    trunk_sized = make(selfie_d_model=0).model.selfie  # 0 = the trunk's feature size, no projection
    assert isinstance(trunk_sized.proj, nn.Identity) and trunk_sized.layers[0].heads == 1
    with pytest.raises(BenchError, match="selfie_heads"):
        make(selfie_d_model=30, selfie_heads=4)


# ---------------------------------------------------------------- attack


def _batch(method, seed=0):
    torch.manual_seed(seed)
    return method.make_batch(images())


def test_attack_stays_in_the_ball_and_in_the_unit_box():
    method = make(attack_steps=3)
    batch = _batch(method)
    advs = method.attack(batch)
    assert len(advs) == 3
    eps = method.cfg.eps
    for a in advs:
        assert (a - batch.x).abs().max() <= eps + 1e-6 and a.min() >= 0 and a.max() <= 1
        assert (a - batch.x).abs().max() > eps / 2
    assert not torch.equal(advs[0], advs[1])  # one perturbation per task


def test_attack_runs_in_train_mode():
    method = make(attack_steps=2)
    model = method.model
    model.train()
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
             for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.Dropout))]
    running = model.encoder.bn1.running_mean.clone()
    method.attack(_batch(method))
    for h in hooks:
        h.remove()
    assert seen and all(seen)
    assert not torch.equal(running, model.encoder.bn1.running_mean)  # batch statistics, as official


def test_attack_steps_along_the_diversity_direction():
    # One PGD step rebuilt independently: x0 = x + eps * U(-1, 1) (unclamped, one draw per task
    # in task order, as bench.attacks.pgd draws it), then clip(proj(x0 + alpha sign(g + 0.1 grad h))).
    method = make(attack_steps=1, selfie_dropout=0.0)  # no dropout: the forwards are deterministic
    c, batch = method.cfg, _batch(method)
    x = batch.x
    torch.manual_seed(7)
    advs = method.attack(batch)  # train-mode BN moves its running stats, not its outputs
    torch.manual_seed(7)
    x0 = [(x + c.eps * (torch.rand(x.shape) * 2 - 1)).requires_grad_(True) for _ in range(3)]
    _, grads, h = method.input_gradients(x0, batch)
    h_grads = torch.autograd.grad(h, x0)

    def step(a, d):
        return torch.min(torch.max(a.detach() + c.alpha * d.sign(), x - c.eps), x + c.eps).clamp(0, 1)

    expected = [step(a, g + c.diversity_weight * gh) for a, g, gh in zip(x0, grads, h_grads)]
    plain = [step(a, g) for a, g in zip(x0, grads)]
    for a, e in zip(advs, expected):
        assert torch.equal(a, e)
    # h must matter: sign(g) alone lands elsewhere for some pixels of some task
    assert sum((e != p).sum().item() for e, p in zip(expected, plain)) > 0


def test_attack_raises_the_task_losses():
    method = make(attack_steps=4)
    batch = _batch(method)
    advs = method.attack(batch)
    method.model.eval()
    with torch.no_grad():
        clean = sum(method.task_losses([batch.x] * 3, batch)).item()
        adv = sum(method.task_losses(advs, batch)).item()
    assert adv > clean


# ---------------------------------------------------------------- training


def test_one_step_is_finite_and_the_penalty_trains_the_weights():
    method = make()
    optimizer = build_optimizer(method.trainable_parameters(), method.cfg)
    before = {k: v.clone() for k, v in method.model.state_dict().items()}
    method.train_mode()
    torch.manual_seed(0)
    out = method.training_step(images(), None, None, None)
    losses = [out[f"{t}{s}_loss"] for t in ("rotation", "jigsaw", "selfie") for s in ("", "_adv")]
    assert all(torch.isfinite(v) for v in [out["loss"], out["h"], *losses])
    assert out["loss"].item() == pytest.approx(torch.stack(losses).mean().item() + 0.1 * out["h"].item(), rel=1e-5)
    assert -23.1 < out["h"].item() <= 1e-4
    optimizer.zero_grad()
    out["loss"].backward()
    optimizer.step()
    changed = {k for k, v in method.model.state_dict().items() if not torch.equal(v, before[k])}
    for prefix in ("encoder.conv1.", "encoder.blocks.7.", "layer4.1.", "rotation_fc.", "jigsaw_fc.", "selfie."):
        assert any(k.startswith(prefix) for k in changed), prefix


def test_penalty_gradient_reaches_the_weights():
    method = make(selfie_dropout=0.0)
    batch = _batch(method)
    advs = [a.requires_grad_(True) for a in method.attack(batch)]
    _, _, h = method.input_gradients(advs, batch)
    g = torch.autograd.grad(h, method.model.encoder.conv1.weight)[0]  # double backward
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_h_uses_each_tasks_gradient_with_respect_to_its_own_input():
    # Default (spec, official): G = gradients w.r.t. the task inputs T_t(x) themselves.
    task_space, image_space = make(selfie_dropout=0.0), make(selfie_dropout=0.0, gradient_space="image")
    batch = _batch(task_space)
    xs = [batch.x.clone().requires_grad_(True) for _ in range(3)]
    _, grads, h_task = task_space.input_gradients(xs, batch)

    model = task_space.model
    inputs = [t.detach().requires_grad_(True) for t in task_space.task_inputs([batch.x] * 3, batch)]
    losses = [F.cross_entropy(model.classify(inputs[0], "rotation"), batch.rotation),
              F.cross_entropy(model.classify(inputs[1], "jigsaw"), batch.jigsaw),
              selfie_loss(model.selfie_scores(inputs[2], batch.masked, batch.visible))]
    own = torch.autograd.grad(sum(losses), inputs)
    torch.testing.assert_close(h_task, gradient_diversity(own).mean(), rtol=1e-5, atol=1e-5)

    # The option: the same gradients in original-image coordinates, a different h.
    h_image = image_space.diversity(grads, batch)
    torch.testing.assert_close(h_image, gradient_diversity(grads).mean(), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(h_image) and not torch.allclose(h_image, h_task)


def test_loss_falls_on_a_fixed_batch():
    method = make(batch_size=4)
    optimizer = build_optimizer(method.trainable_parameters(), method.cfg)
    x = images(4)
    method.train_mode()
    losses = []
    for _ in range(30):
        torch.manual_seed(0)
        out = method.training_step(x, None, None, None)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) < sum(losses[:5]), losses
