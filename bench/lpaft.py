"""DynACL++'s post-processing (dynacl.md section 8): k-means pseudo-labels, then LP-AFT.

- `dynacl_pseudo_labels` (8a, `PKU-ML/DYNACL@7d143db assign_label.py`): the dual-branch encoder's
  `normal`-branch features (eval mode, un-augmented images, not L2-normalized), one seeded run
  of Lloyd's k-means with K = 10 (`bench.clusterfit.kmeans_lloyd`); labels by source position.
- `run_lpaft` (8b, `LPAFT.py`): a single-BN encoder initialized from the dual encoder's `pgd`
  branch with a zero-initialized Linear(d, C) head; **LP**: 10 epochs, head only, model in eval
  mode, CE on RandomCrop(4) + flip views, SGD lr 0.01, momentum 0.9, wd 1e-4, constant; then
  **AFT**: 25 epochs, everything, TRADES on the pseudo-labels (beta 6, eps 8/255, 10 steps of
  2/255, x_adv starting at x exactly, crafted in eval mode), SGD lr 0.1 x0.1 after epochs 10 and
  20, wd 1e-4; batch 512 with drop_last; fp32; no model selection. Returns the encoder (the
  pseudo-label head is discarded), which SLF/ALF/AFF then finetune like any other.

Both phases run through `bench.train.fit` (checkpointed under `workdir/lp`, `workdir/aft`), so an
interrupted LP-AFT resumes exactly. A stage wraps these functions; nothing here touches a store.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from bench.attacks import kl_objective, pgd
from bench.augment import WEAK_VIEW, make_view
from bench.config import TrainConfig, from_dict, param
from bench.datasets import ImageSet, batches
from bench.errors import BenchError
from bench.models import Classifier, export_encoder
from bench.models.blob import encoder_from_blob
from bench.models.resnet import ResNet18
from bench.train import Trainable, fit

Progress = Callable[[dict[str, Any]], None]
TRADES_INITS = ("x", "normal")


@dataclass
class LPAFTConfig:
    """The LP-AFT job's settings (`PKU-ML/DYNACL@7d143db LPAFT.py`, `assign_label.py`)."""

    k: str = param("10", help="k-means pseudo-classes, or 'classes' (the dataset's number); the code: 10")
    lp_epochs: int = param(10, min=0, help="--epochs_head")
    aft_epochs: int = param(25, min=0)
    batch_size: int = param(512, min=1)
    lp_lr: float = param(0.01, min=0.0)
    aft_lr: float = param(0.1, min=0.0)
    momentum: float = param(0.9, min=0.0, max=1.0)
    weight_decay: float = param(1e-4, min=0.0)
    aft_decay_at: tuple[float, ...] = param((0.4, 0.8), min=0.0, max=1.0, help="x gamma after epochs 10, 20 of 25")
    gamma: float = param(0.1, min=0.0, max=1.0)
    beta: float = param(6.0, min=0.0)
    eps: float = param(8 / 255, min=0.0, max=1.0)
    alpha: float = param(2 / 255, min=0.0, max=1.0)
    attack_steps: int = param(10, min=0)
    trades_init: str = param("x", choices=TRADES_INITS, help="x: x_adv starts at x exactly (the code); "
                                                              "normal: x + 0.001 N(0, 1) (the harness AFF)")
    kmeans_tol: float = param(1e-4, min=0.0)
    kmeans_max_iter: int = param(10_000, min=1)
    feature_batch: int = param(512, min=1)
    precision: str = param("fp32", choices=("fp32", "tf32", "bf16", "fp16"), help="the official code runs in fp32")
    steps_per_epoch: int = param(0, min=0, help="cap on steps per epoch (0 = all; tests and smoke runs)")


def check_k(value: str) -> str:
    if value == "classes" or (value.isdigit() and int(value) >= 2):
        return value
    raise BenchError(f"lpaft k={value!r}: use a number of clusters >= 2 or 'classes'")


def resolve_k(value: str, num_classes: int) -> int:
    check_k(value)
    return num_classes if value == "classes" else int(value)


# ---------------------------------------------------------------- 8a. pseudo-labels


@torch.no_grad()
def branch_features(encoder: nn.Module, data: ImageSet, branch: str, batch_size: int = 512) -> torch.Tensor:
    """encoder(x, branch) of every image of `data` in order, eval mode (BN statistics untouched)."""
    was_training = encoder.training
    encoder.eval()
    try:
        return torch.cat([encoder(x, branch).float() for x, _, _ in batches(data, batch_size, shuffle=False)])
    finally:
        encoder.train(was_training)


def dynacl_pseudo_labels(dual_encoder: nn.Module, data: ImageSet, k: int, *, seed: int, tol: float = 1e-4,
                         max_iter: int = 10_000, batch_size: int = 512) -> tuple[torch.Tensor, dict[str, Any]]:
    """K-means labels of the `normal`-branch features, as a LongTensor indexed by source position
    (-1 where `data` has no image), and what to record (iterations, cluster sizes)."""
    from bench.clusterfit import kmeans_lloyd

    features = branch_features(dual_encoder, data, "normal", batch_size)
    labels, _, iterations = kmeans_lloyd(features, k, seed=seed, tol=tol, max_iter=max_iter)
    positions = data.indices if data.indices is not None else torch.arange(len(data))
    positions = positions.cpu()
    table = torch.full((int(positions.max()) + 1,), -1, dtype=torch.long)
    table[positions] = labels.cpu()
    return table, {"k": k, "kmeans_iterations": iterations, "features": "normal branch, not L2-normalized",
                   "cluster_sizes": torch.bincount(labels.cpu(), minlength=k).tolist()}


# ---------------------------------------------------------------- 8b. LP-AFT


class PseudoLabelTask(Trainable):
    """Shared by both phases: the classifier and the pseudo-label lookup by source position."""

    drop_last = True  # LPAFT.py's loader

    def __init__(self, cfg: TrainConfig, model: Classifier, labels: torch.Tensor):
        self.cfg = cfg
        self.model = model
        self.labels = labels

    def targets(self, index: torch.Tensor) -> torch.Tensor:
        y = self.labels[index]
        if bool((y < 0).any()):
            raise BenchError("LP-AFT: some training images have no pseudo-label")
        return y


class LinearProbe(PseudoLabelTask):
    """LP: the head alone on clean views, the whole model in eval mode (BN frozen)."""

    def trainable_parameters(self):
        return self.model.head.parameters()

    def train_mode(self) -> None:
        self.model.eval()

    def training_step(self, x, y, index, info):
        with torch.no_grad():
            features = self.model.encoder(make_view(x, WEAK_VIEW))
        logits = self.model.head(features)
        return {"loss": F.cross_entropy(logits, self.targets(index))}


class PseudoTRADES(PseudoLabelTask):
    """AFT: TRADES on the pseudo-labels, every parameter trained (`utils.py:167-206`)."""

    def __init__(self, cfg: TrainConfig, model: Classifier, labels: torch.Tensor, lp: LPAFTConfig):
        super().__init__(cfg, model, labels)
        self.lp = lp

    def training_step(self, x, y, index, info):
        from bench.finetuners.aff import trades_loss

        c = self.lp
        x = make_view(x, WEAK_VIEW)
        target = self.targets(index)
        self.model.eval()
        try:
            with torch.no_grad():
                reference = self.model(x)
            start = None if c.trades_init == "x" else "normal"
            x_adv = pgd(kl_objective(self.model, reference), x, eps=c.eps, alpha=c.alpha, steps=c.attack_steps,
                        random_start=start, clamp_start=False, freeze=self.model)
        finally:
            self.train_mode()
        clean, adv = self.model(x), self.model(x_adv)
        return {"loss": trades_loss(clean, adv, target, c.beta), "accuracy": (clean.argmax(1) == target).float().mean()}


def _phase_config(c: LPAFTConfig, *, epochs: int, lr: float, schedule: str) -> TrainConfig:
    return TrainConfig(epochs=max(epochs, 1), batch_size=c.batch_size, lr=lr, momentum=c.momentum,
                       weight_decay=c.weight_decay, optimizer="sgd", schedule=schedule,
                       decay_at=tuple(c.aft_decay_at), gamma=c.gamma, steps_per_epoch=c.steps_per_epoch,
                       precision=c.precision)


def start_encoder(dual: nn.Module | dict[str, Any], device: torch.device | str) -> ResNet18:
    """The single-BN encoder LP-AFT starts from: the dual encoder's `pgd` branch."""
    encoder = encoder_from_blob(dual, device) if isinstance(dual, dict) else dual
    if "pgd" not in encoder.branches:
        raise BenchError(f"LP-AFT needs an encoder with a 'pgd' branch, this one has {list(encoder.branches)}")
    return export_encoder(encoder, "pgd").to(device) if len(encoder.branches) > 1 else copy.deepcopy(encoder)


def run_lpaft(dual: nn.Module | dict[str, Any], data: ImageSet, pseudo_labels: torch.Tensor, cfg: LPAFTConfig | dict,
              *, num_classes: int, seed: int, workdir: str | Path | None = None,
              on_progress: Progress | None = None) -> tuple[ResNet18, dict[str, Any]]:
    """LP then AFT on `data` with `pseudo_labels` (by source position); returns the single-branch
    encoder (eval mode) and the two phases' histories. `dual`: the dual-branch encoder or its blob."""
    c = cfg if isinstance(cfg, LPAFTConfig) else from_dict(LPAFTConfig, cfg, "lpaft")
    device = data.y.device
    labels = torch.as_tensor(pseudo_labels, dtype=torch.long).to(device)
    if int(labels.max()) >= num_classes:
        raise BenchError(f"LP-AFT: pseudo-labels go up to {int(labels.max())}, the head has {num_classes} classes")
    torch.manual_seed(seed)
    model = Classifier(start_encoder(dual, device), num_classes, zero_init=True).to(device)
    root = Path(workdir) if workdir is not None else None

    def phase(name: str, task: Trainable, epochs: int, phase_seed: int) -> list[dict[str, float]]:
        if epochs == 0:
            return []
        folder = None
        if root is not None:
            folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
        report = (lambda e: on_progress({**e, "stage": name})) if on_progress else None
        return fit(task, data, seed=phase_seed, workdir=folder, on_progress=report)

    model.encoder.requires_grad_(False)
    lp = LinearProbe(_phase_config(c, epochs=c.lp_epochs, lr=c.lp_lr, schedule="constant"), model, labels)
    lp_history = phase("lp", lp, c.lp_epochs, seed)
    model.encoder.requires_grad_(True)
    aft = PseudoTRADES(_phase_config(c, epochs=c.aft_epochs, lr=c.aft_lr, schedule="step"), model, labels, c)
    aft_history = phase("aft", aft, c.aft_epochs, seed + 1)
    encoder = copy.deepcopy(model.encoder).eval()
    return encoder, {"lp": lp_history, "aft": aft_history}


def lpaft_from_dual(dual: nn.Module | dict[str, Any], data: ImageSet, cfg: LPAFTConfig | dict, *, num_classes: int,
                    seed: int, workdir: str | Path | None = None, on_progress: Progress | None = None
                    ) -> tuple[ResNet18, torch.Tensor, dict[str, Any]]:
    """The whole DynACL++ post-processing: pseudo-labels (8a) then LP-AFT (8b)."""
    c = cfg if isinstance(cfg, LPAFTConfig) else from_dict(LPAFTConfig, cfg, "lpaft")
    encoder = encoder_from_blob(dual, data.y.device) if isinstance(dual, dict) else dual
    k = resolve_k(c.k, num_classes)
    labels, info = dynacl_pseudo_labels(encoder, data, k, seed=seed, tol=c.kmeans_tol, max_iter=c.kmeans_max_iter,
                                        batch_size=c.feature_batch)
    out, history = run_lpaft(encoder, data, labels, c, num_classes=max(num_classes, k), seed=seed, workdir=workdir,
                             on_progress=on_progress)
    return out, labels, {**history, "pseudo_labels": info}
