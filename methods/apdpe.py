"""AP-DPE (Chen et al., CVPR 2020), per docs/methods.md §4; choices in docs/apdpe.md.

Three pretext tasks trained adversarially on one shared trunk and ensembled with a
gradient-diversity term. ResNet-18 with ImageNet normalization inside the model:

- trunk: the stem and the first six BasicBlocks (conv1..layer3) of `encoder`, shared;
- rotation: trunk -> its own layer4 (two BasicBlocks) -> pool -> Linear(d, 4);
- jigsaw: trunk -> its own layer4 -> pool -> Linear(d, 31);
- selfie: each 8x8 patch -> trunk -> pool (the official patch encoder has no layer4), a
  transformer pools the visible patches into a summary, CE over 4 dot-product scores. The
  transformer has the official size by default: 13 post-LN layers, d_model 1024, 16 heads of 64,
  d_ff 2048, dropout 0.1; a Linear projects the trunk's patch features (4 x width, 256 at width
  64) to d_model. `selfie_layers`, `selfie_d_model`, `selfie_heads`, `selfie_ff` shrink it
  (the smoke preset does).

`encoder` is a plain ResNet-18 whose last two blocks are the rotation branch's layer4
(`encoder_task = "rotation"`, or "jigsaw"), so the downstream encoder is trunk + rotation layer4
(docs/methods.md is silent; the official fine-tuning code ensembles whole per-task networks, which
the harness's single-encoder protocol cannot express).

Tasks, for one WEAK_VIEW image x per sample (the official RandomCrop(32, 4) + HFlip):
- Rotation: one k ~ U{0..3} per image, the image rotated by k x 90 degrees, label k.
- Jigsaw: 4x4 grid of 8x8 patches; label l ~ U{0..30}, forced to 0 with p = 0.1; label 0 is the
  identity, label l >= 1 the fixed permutation JIGSAW_PERMUTATIONS[l] (30 distinct non-identity
  permutations from a fixed seed): output patch p = input patch perm[p].
- Selfie: 16 patches of 8x8, per sample 4 masked and 12 visible (uniformly at random).
  Transformer input = [u0; visible patch features] (no position embeddings on the visible
  patches, as in the official code; `selfie_visible_positions` adds them); summary = output at
  u0; the query of masked position p = summary + row_emb[p // 4] + col_emb[p % 4]; scores =
  query . candidate over the 4 masked patches' features; loss = CE (target: its own patch),
  averaged over the 4 positions and the batch (uniform scores give log 4).

Attack (PGD 10 steps, eps 8/255, alpha 2/255, unclamped uniform random start, model in TRAIN
mode: BatchNorm uses batch statistics and updates its running ones, dropout is on, as in the
official code). Each task has its own perturbation delta_t (three independent PGD iterates),
parameterized in the coordinates of the original image: task t sees T_t(x + delta_t), T_t the
task's pixel permutation (rotation / jigsaw / patching). A pixel permutation commutes with the
eps-ball projection, the [0,1] clamp, sign() and the i.i.d. uniform start, so this is exactly
PGD on the task input T_t(x) itself (the spec's "three task inputs"). G = [g_rot, g_jig,
g_selfie] / per-sample L2 norms, g_t = each task's gradient w.r.t. its own input T_t(x_t) (the
spec and the official code, `gradient_space = "task"`, the default; obtained as T_t of the
original-coordinate gradient, the same numbers). `gradient_space = "image"` stacks the gradients
mapped back to original-image coordinates instead, so that G compares the tasks at the same
image location (docs/apdpe.md). Step direction of x_t: sign(g_t + 0.1 * grad_{x_t} h),
h = mean over samples of logdet(G^T G + 1e-5 I), computed with create_graph (double backward),
through `bench.attacks.pgd(gradient=...)`.

Loss = mean of the 6 task losses (clean and adversarial) + 0.1 * h, h from the adversarial
losses' input gradients (create_graph, so h trains the weights). Sign: +0.1 in both the attack
and the loss, i.e. the single saddle-point objective min_theta max_delta [sum_t l_t + lambda h]
that the official code implements (attack and loss both add +0.1 * h). The attack therefore
seeks perturbations whose per-task gradients are diverse, and training penalizes that
diversity. `penalty_weight` (loss) and `diversity_weight` (attack) may be set negative to flip
either sign; docs/apdpe.md gives the reasoning.

Optimizer: SGD, Nesterov momentum 0.9, weight decay 1e-4, per-iteration cosine to 1e-8, 150
epochs, no warm-up. lr 0.1 at batch 128 (the official single-task adversarial pretraining runs
of the same repository: README `-b 128`, `--lr 0.1`; also the harness's supervised-AT recipe).
The official ensemble script's lr 0.001 at batch 32 is recorded, not used: it is a one-GPU
memory setting for a ResNet-50 (`apdpe.lr=0.001 apdpe.batch_size=32` reproduces it).

Cost, from `OMP_NUM_THREADS=1 bench profile --methods simclr,rocl,apdpe --device cpu` (encoder
width 16, batch 32, one thread, median of 5 timed steps after a warm-up, default configs with the
official-size transformer; two runs on the shared 2-core machine, 1-min load 1.2-1.5 at start,
4-6 by the end): AP-DPE 94.9 / 106.2 s per step, SimCLR 0.332 / 0.397 s, RoCL 2.30 / 1.86 s,
i.e. AP-DPE ~270-290x SimCLR per step at the same batch size (RoCL 5-7x). Most of it is the
attack's 10 steps (three task forwards, a create_graph backward and a double backward each),
and most of the step (roughly 85-90%, docs/apdpe.md) is the d_model 1024 transformer, whose
cost does not grow with the encoder width: the ratio is smaller at width 64. The smoke preset
shrinks the transformer (docs/apdpe.md, Cost).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bench.attacks import pgd
from bench.config import TrainConfig, param
from bench.errors import BenchError
from bench.method import Method
from bench.registry import METHODS

TASKS = ("rotation", "jigsaw", "selfie")
GRID = 4                     # 4 x 4 patches (8 x 8 on a 32 x 32 image)
ROTATION_CLASSES = 4
JIGSAW_PERMUTATION_COUNT = 30
JIGSAW_SEED = 20200614       # fixed: the permutations are part of the task definition
SELFIE_MASKED = 4
TRUNK_BLOCKS = 6             # conv1..layer3 = stem + blocks[:6]; layer4 = blocks[6:8]
HEAD_DIM = 64                # the official transformer's heads are 64 wide


# ---------------------------------------------------------------- task transforms (plain functions)


def make_jigsaw_permutations(count: int = JIGSAW_PERMUTATION_COUNT, cells: int = GRID * GRID,
                             seed: int = JIGSAW_SEED) -> torch.Tensor:
    """(count + 1, cells) long: row 0 the identity, then `count` distinct random permutations."""
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.arange(cells)]
    seen = {tuple(rows[0].tolist())}
    while len(rows) < count + 1:
        perm = torch.randperm(cells, generator=generator)
        key = tuple(perm.tolist())
        if key not in seen:
            seen.add(key)
            rows.append(perm)
    return torch.stack(rows)


JIGSAW_PERMUTATIONS = make_jigsaw_permutations()
JIGSAW_CLASSES = JIGSAW_PERMUTATIONS.shape[0]  # 31


def to_patches(x: torch.Tensor, grid: int = GRID) -> torch.Tensor:
    """(B, C, H, W) -> (B, grid*grid, C, H/grid, W/grid); patch p = row p // grid, column p % grid."""
    b, c, h, w = x.shape
    ph, pw = h // grid, w // grid
    return (x.reshape(b, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5)
            .reshape(b, grid * grid, c, ph, pw))


def from_patches(p: torch.Tensor, grid: int = GRID) -> torch.Tensor:
    """Inverse of `to_patches`."""
    b, _, c, ph, pw = p.shape
    return (p.reshape(b, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5)
            .reshape(b, c, grid * ph, grid * pw))


def rotate(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Each image x[i] rotated by k[i] x 90 degrees (torch.rot90 over H, W); differentiable."""
    out = x
    for r in range(1, ROTATION_CLASSES):
        sel = k == r
        out = torch.where(sel.view(-1, 1, 1, 1), torch.rot90(x, r, dims=(2, 3)), out)
    return out


def unrotate(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return rotate(x, (ROTATION_CLASSES - k) % ROTATION_CLASSES)


def jigsaw(x: torch.Tensor, labels: torch.Tensor, permutations: torch.Tensor = JIGSAW_PERMUTATIONS,
           grid: int = GRID) -> torch.Tensor:
    """Shuffle each image's grid x grid patches: output patch p = input patch permutations[label][p]."""
    patches = to_patches(x, grid)
    order = permutations.to(x.device)[labels]  # (B, cells)
    index = order.view(*order.shape, 1, 1, 1).expand_as(patches)
    return from_patches(patches.gather(1, index), grid)


def sample_jigsaw_labels(n: int, device: torch.device, identity_p: float = 0.1,
                         classes: int = JIGSAW_CLASSES) -> torch.Tensor:
    """Uniform over the classes, then forced to 0 (identity) with probability `identity_p`."""
    labels = torch.randint(classes, (n,), device=device)
    force = torch.rand(n, device=device) < identity_p
    return torch.where(force, torch.zeros_like(labels), labels)


def sample_selfie_masks(n: int, device: torch.device, cells: int = GRID * GRID,
                        masked: int = SELFIE_MASKED) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: (masked positions (n, masked), visible positions (n, cells - masked))."""
    order = torch.rand(n, cells, device=device).argsort(dim=1)
    return order[:, :masked], order[:, masked:]


# ---------------------------------------------------------------- losses (plain functions)


def selfie_loss(scores: torch.Tensor) -> torch.Tensor:
    """scores (B, M, M): query m against the M masked candidates; CE with target m, mean over B and M."""
    b, m, _ = scores.shape
    target = torch.arange(m, device=scores.device).repeat(b)
    return F.cross_entropy(scores.reshape(b * m, m).float(), target)


def gradient_diversity(grads: Sequence[torch.Tensor], eps: float = 1e-5) -> torch.Tensor:
    """Per-sample logdet(G^T G + eps I), G = the per-sample L2-normalized gradients as columns.

    Identical gradients give ln(3 + eps) + 2 ln(eps) = -21.927 (three tasks); orthogonal ones
    3 ln(1 + eps) = 3e-5. Computed in float64 (B x D x 3 numbers, cheap): with eps = 1e-5 the
    small eigenvalues of nearly aligned gradients are below fp32's rounding of the Gram entries.
    """
    with torch.autocast(grads[0].device.type, enabled=False):
        cols = []
        for g in grads:
            g = g.reshape(g.shape[0], -1).double()
            cols.append(g / (g.norm(dim=1, keepdim=True) + 1e-10))
        G = torch.stack(cols, dim=2)  # (B, D, tasks)
        gram = G.transpose(1, 2) @ G
        eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
        return torch.logdet(gram + eps * eye).float()


# ---------------------------------------------------------------- model


class EncoderLayer(nn.Module):
    """Post-LN transformer encoder layer (the official attention-pooling layer's form).

    Attention is written out (matmul + softmax) so that it has a double backward on every
    device; fused attention kernels do not.
    """

    def __init__(self, d_model: int, heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.ff1 = nn.Linear(d_model, d_ff)
        self.ff2 = nn.Linear(d_ff, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        attn = self.dropout(attn.softmax(dim=-1))
        y = (attn @ v).transpose(1, 2).reshape(b, n, d)
        x = self.norm1(x + self.dropout(self.out(y)))
        return self.norm2(x + self.dropout(self.ff2(F.relu(self.ff1(x)))))


class SelfieHead(nn.Module):
    """Attention pooling of the visible patches and the masked-patch scores."""

    def __init__(self, d_in: int, d_model: int, layers: int, heads: int, d_ff: int, dropout: float,
                 grid: int = GRID, visible_positions: bool = False):
        super().__init__()
        self.grid = grid
        self.visible_positions = visible_positions
        self.proj = nn.Identity() if d_model == d_in else nn.Linear(d_in, d_model)
        self.u0 = nn.Parameter(torch.zeros(1, 1, d_model))
        self.row_embeddings = nn.Parameter(torch.randn(grid, d_model))  # official init: randn rows,
        self.column_embeddings = nn.Parameter(torch.zeros(grid, d_model))  # zero columns
        self.layers = nn.ModuleList(EncoderLayer(d_model, heads, d_ff, dropout) for _ in range(layers))

    def position(self, p: torch.Tensor) -> torch.Tensor:
        return self.row_embeddings[p // self.grid] + self.column_embeddings[p % self.grid]

    def forward(self, features: torch.Tensor, masked: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """features (B, cells, d_in) -> scores (B, M, M) of each masked query against the M candidates."""
        f = self.proj(features)
        pick = lambda idx: f.gather(1, idx.unsqueeze(-1).expand(-1, -1, f.shape[-1]))  # noqa: E731
        seen = pick(visible)
        if self.visible_positions:
            seen = seen + self.position(visible)
        seq = torch.cat([self.u0.expand(f.shape[0], -1, -1).to(seen.dtype), seen], dim=1)
        for layer in self.layers:
            seq = layer(seq)
        queries = seq[:, :1] + self.position(masked)  # (B, M, d)
        return queries @ pick(masked).transpose(1, 2)


class APDPEModel(nn.Module):
    """`encoder` (trunk + the layer4 of `encoder_task`), the other task's layer4, the heads."""

    def __init__(self, encoder: nn.Module, spare: nn.Module, encoder_task: str, selfie: SelfieHead):
        super().__init__()
        self.encoder = encoder
        self.encoder_task = encoder_task
        self.other_task = "jigsaw" if encoder_task == "rotation" else "rotation"
        self.layer4 = nn.ModuleList(list(spare.blocks[TRUNK_BLOCKS:]))  # the other task's own layer4
        d = encoder.feature_dim
        self.rotation_fc = nn.Linear(d, ROTATION_CLASSES)
        self.jigsaw_fc = nn.Linear(d, JIGSAW_CLASSES)
        self.selfie = selfie

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        out = self.encoder.forward_stem(x)
        for block in self.encoder.blocks[:TRUNK_BLOCKS]:
            out = block(out)
        return out

    def layer4_of(self, task: str) -> Sequence[nn.Module]:
        return self.encoder.blocks[TRUNK_BLOCKS:] if task == self.encoder_task else self.layer4

    def classify(self, x: torch.Tensor, task: str) -> torch.Tensor:
        out = self.trunk(x)
        for block in self.layer4_of(task):
            out = block(out)
        fc = self.rotation_fc if task == "rotation" else self.jigsaw_fc
        return fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))

    def patch_features(self, x: torch.Tensor, grid: int = GRID) -> torch.Tensor:
        """(B, C, H, W) -> (B, grid*grid, d_trunk): every patch through the trunk and a global pool."""
        patches = to_patches(x, grid)
        b, cells = patches.shape[:2]
        out = self.trunk(patches.reshape(b * cells, *patches.shape[2:]))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1).view(b, cells, -1)

    def selfie_scores(self, x: torch.Tensor, masked: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        return self.selfie(self.patch_features(x), masked, visible)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


# ---------------------------------------------------------------- the method


@dataclass
class TaskBatch:
    """One batch's task randomness (labels, masks), shared by the attack and the loss."""

    x: torch.Tensor           # the WEAK_VIEW images, (B, C, H, W)
    rotation: torch.Tensor    # k in 0..3
    jigsaw: torch.Tensor      # permutation label in 0..30
    masked: torch.Tensor      # (B, 4) masked patch positions
    visible: torch.Tensor     # (B, 12) visible patch positions


@METHODS.register("apdpe")
class APDPE(Method):
    """AP-DPE: adversarial rotation + jigsaw + selfie ensemble with a gradient-diversity term."""

    @dataclass
    class Config(TrainConfig):
        epochs: int = param(150, min=1)
        batch_size: int = param(128, min=2)
        lr: float = param(0.1, min=0.0, help="official ensemble script: 0.001 at batch 32 (see docs/apdpe.md)")
        momentum: float = param(0.9, min=0.0, max=1.0)
        nesterov: bool = True
        weight_decay: float = param(1e-4, min=0.0)
        min_lr: float = param(1e-8, min=0.0, help="end of the per-iteration cosine (official 1e-8)")
        eps: float = param(8 / 255, min=0.0, max=1.0)
        alpha: float = param(2 / 255, min=0.0, max=1.0)
        attack_steps: int = param(10, min=0)
        diversity_weight: float = param(0.1, help="lambda of grad h in the attack direction (negative flips it)")
        penalty_weight: float = param(0.1, help="weight of h in the loss (negative flips the sign)")
        logdet_eps: float = param(1e-5, min=0.0, help="h = logdet(G^T G + logdet_eps I)")
        gradient_space: str = param("task", choices=("task", "image"),
                                    help="task: G stacks each task's gradient w.r.t. its own input (spec, "
                                         "official); image: mapped back to pixel-aligned image coordinates")
        jigsaw_identity_p: float = param(0.1, min=0.0, max=1.0, help="probability the jigsaw label is forced to 0")
        encoder_task: str = param("rotation", choices=("rotation", "jigsaw"),
                                  help="whose layer4 the downstream encoder keeps")
        selfie_layers: int = param(13, min=1, help="transformer layers (official 12 + 1)")
        selfie_heads: int = param(0, min=0, help="0 = d_model // 64 (heads of 64: 16 at the official d_model 1024)")
        selfie_d_model: int = param(1024, min=0, help="transformer width (official 1024); a Linear projects the "
                                                      "patch features when it differs from the trunk's; 0 = the "
                                                      "trunk's feature size, no projection")
        selfie_ff: int = param(2048, min=1, help="transformer feed-forward width (official 2048)")
        selfie_dropout: float = param(0.1, min=0.0, max=1.0)
        selfie_visible_positions: bool = param(False, help="add position embeddings to the visible patches "
                                                           "(the official code does not)")

    branches = ("normal",)
    encoder_branch = "normal"
    normalize = "imagenet"
    drop_last = False  # the official ensemble_pretrain.py DataLoader keeps the last partial batch
    test_settings = {"attack_steps": 1, "selfie_layers": 1, "selfie_d_model": 64, "selfie_ff": 32}

    def build(self) -> nn.Module:
        c = self.cfg
        size = self.ctx.image_size
        if size % GRID:
            raise BenchError(f"apdpe: jigsaw and selfie cut a {GRID}x{GRID} grid; image size {size} "
                             f"is not a multiple of {GRID}")
        encoder, spare = self.new_encoder(), self.new_encoder()
        d_in = encoder.blocks[TRUNK_BLOCKS - 1].conv2.out_channels
        d_model = c.selfie_d_model or d_in
        heads = c.selfie_heads or max(1, d_model // HEAD_DIM)
        if d_model % heads:
            raise BenchError(f"apdpe.selfie_heads: {heads} heads do not divide d_model {d_model}")
        selfie = SelfieHead(d_in, d_model, c.selfie_layers, heads, c.selfie_ff, c.selfie_dropout,
                            visible_positions=c.selfie_visible_positions)
        return APDPEModel(encoder, spare, c.encoder_task, selfie)

    # -- the three tasks

    def make_batch(self, x: torch.Tensor) -> TaskBatch:
        n, device = x.shape[0], x.device
        rotation = torch.randint(ROTATION_CLASSES, (n,), device=device)
        labels = sample_jigsaw_labels(n, device, self.cfg.jigsaw_identity_p)
        masked, visible = sample_selfie_masks(n, device)
        return TaskBatch(x, rotation, labels, masked, visible)

    def task_inputs(self, xs: Sequence[torch.Tensor], batch: TaskBatch) -> list[torch.Tensor]:
        """The task inputs T_t(x_t) of three images in original coordinates (rotation, jigsaw, selfie)."""
        return [rotate(xs[0], batch.rotation), jigsaw(xs[1], batch.jigsaw), xs[2]]

    def task_losses(self, xs: Sequence[torch.Tensor], batch: TaskBatch) -> list[torch.Tensor]:
        """[rotation CE, jigsaw CE, selfie CE] for three images in original coordinates."""
        model = self.model
        rot_in, jig_in, selfie_in = self.task_inputs(xs, batch)
        return [F.cross_entropy(model.classify(rot_in, "rotation").float(), batch.rotation),
                F.cross_entropy(model.classify(jig_in, "jigsaw").float(), batch.jigsaw),
                selfie_loss(model.selfie_scores(selfie_in, batch.masked, batch.visible))]

    def diversity(self, grads: Sequence[torch.Tensor], batch: TaskBatch) -> torch.Tensor:
        """h: mean over the batch of logdet(G^T G + eps I) of the three tasks' input gradients."""
        if self.cfg.gradient_space == "task":
            # grad w.r.t. T_t(x) = T_t(grad w.r.t. x): a pixel permutation maps gradients like images
            grads = self.task_inputs(grads, batch)
        return gradient_diversity(grads, self.cfg.logdet_eps).mean()

    def input_gradients(self, xs: Sequence[torch.Tensor], batch: TaskBatch
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """(task losses, their input gradients g_t with create_graph, h)."""
        losses = self.task_losses(xs, batch)
        grads = list(torch.autograd.grad(sum(losses), list(xs), create_graph=True))
        return losses, grads, self.diversity(grads, batch)

    def attack(self, batch: TaskBatch) -> list[torch.Tensor]:
        """Three adversarial images (original coordinates), one per task, model in train mode."""
        c = self.cfg

        def direction(advs: list[torch.Tensor]) -> list[torch.Tensor]:
            _, grads, h = self.input_gradients(advs, batch)
            h_grads = torch.autograd.grad(h, advs)
            return [(g + c.diversity_weight * gh).detach() for g, gh in zip(grads, h_grads)]

        def objective(advs: list[torch.Tensor]) -> torch.Tensor:  # diversity_weight = 0: plain joint PGD
            return sum(self.task_losses(advs, batch))

        return pgd(objective, [batch.x] * len(TASKS), eps=c.eps, alpha=c.alpha, steps=c.attack_steps,
                   random_start="uniform", clamp_start=False, freeze=self.model,
                   gradient=direction if c.diversity_weight else None)

    def step(self, batch: TaskBatch) -> dict[str, torch.Tensor]:
        c = self.cfg
        advs = [a.requires_grad_(True) for a in self.attack(batch)]
        clean = self.task_losses([batch.x] * len(TASKS), batch)
        adv, _, h = self.input_gradients(advs, batch)
        task_mean = torch.stack(clean + adv).mean()
        out = {"loss": task_mean + c.penalty_weight * h, "h": h.detach()}
        for name, cl, ad in zip(TASKS, clean, adv):
            out[f"{name}_loss"] = cl.detach()
            out[f"{name}_adv_loss"] = ad.detach()
        return out

    def training_step(self, x, y, index, info):
        from bench.augment import WEAK_VIEW, make_view

        return self.step(self.make_batch(make_view(x, WEAK_VIEW)))
