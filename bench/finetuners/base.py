"""The shared finetuner: a pretrained encoder plus a new linear head, trained by `bench.train.fit`.

A finetuner is a `Trainable` with a `Config` (a `TrainConfig` holding the paper's values) and
one `training_step`. This base class adds what SLF, ALF and AFF share:

- linear finetuners (`linear = True`) freeze the encoder: it stays in eval mode for the whole
  run (`train_mode` is overridden), its parameters are not given to the optimizer, and no
  BatchNorm statistic can change;
- model selection at every epoch end (`end_epoch`): SA and robust accuracy (PGD in the threat model
  of eval.norm: eval.eps and eval.alpha under L-inf, eval.l2_eps and eval.l2_alpha under L2; with
  eval.selection_steps, a fixed seed, fp32, eval mode) on a fixed subset of
  eval.val_n images of the validation split; the best state (by robust accuracy, then clean
  accuracy, earliest on ties) is kept in memory and in the checkpoint (`extra_state`), so a
  resumed run selects exactly what an uninterrupted one would;
- `selection = "last"` keeps the final epoch, `selection = "test"` selects on the test set (the
  papers' practice: optimistic, flagged in the records).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from bench.attacks.accuracy import clean_correct, image_batches, pgd_correct
from bench.attacks.threat import threat_of
from bench.config import EvalConfig, TrainConfig, param
from bench.datasets import ImageSet
from bench.models import Classifier
from bench.train import Trainable

SELECTIONS = ("val", "last", "test")


@dataclass
class FinetuneConfig(TrainConfig):
    """SLF's recipe (AdvCL's released protocol); ALF and AFF override what differs."""

    epochs: int = param(25, min=1)
    batch_size: int = param(512, min=1)
    lr: float = param(0.01, min=0.0)
    momentum: float = param(0.9, min=0.0, max=1.0)
    weight_decay: float = param(2e-4, min=0.0)
    schedule: str = param("step", choices=("cosine", "step", "constant"))
    decay_at: tuple[float, ...] = param((0.6, 0.8), min=0.0, max=1.0, help="epochs 15 and 20 of 25")
    gamma: float = param(0.1, min=0.0, max=1.0)
    selection: str = param("val", choices=SELECTIONS,
                           help="model selection: val (validation split), last (final epoch), "
                                "test (the papers' practice; flagged)")


@dataclass
class FinetuneContext:
    """What a finetuner gets besides its config and the encoder."""

    num_classes: int
    device: torch.device
    eval: EvalConfig
    selection_data: ImageSet | None = None  # the images model selection is measured on


class Finetuner(Trainable):
    Config: type = FinetuneConfig
    linear: bool = True           # encoder frozen (SLF, ALF) or trained (AFF)
    zero_init_head: bool = False  # AFF: the new head starts at zero
    gpu_share: float = 1.0        # the share of a GPU a job of it takes (bench.stages.base.Resources)
    test_settings: dict[str, Any] = {}

    def __init__(self, cfg: Any, encoder: nn.Module, ctx: FinetuneContext):
        self.cfg = cfg
        self.ctx = ctx
        self.model = Classifier(encoder, ctx.num_classes, zero_init=self.zero_init_head).to(ctx.device)
        if self.linear:
            self.model.encoder.requires_grad_(False)
            self.model.encoder.eval()
        self.best: dict[str, Any] | None = None

    # ------------------------------------------------------------ what trains

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return self.model.head.parameters() if self.linear else self.model.parameters()

    def train_mode(self) -> None:
        if self.linear:
            self.model.eval()  # the encoder's BatchNorm keeps its statistics
            self.model.head.train()
        else:
            self.model.train()

    def _selected_module(self) -> nn.Module:
        return self.model.head if self.linear else self.model

    def selection_state(self) -> dict[str, torch.Tensor]:
        """A copy of what training changes (the head, or the whole model)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self._selected_module().state_dict().items()}

    def load_selection_state(self, state: dict[str, torch.Tensor]) -> None:
        self._selected_module().load_state_dict(state)

    # ------------------------------------------------------------ model selection

    def validate(self) -> tuple[int, int, int]:
        """(clean correct, robust correct, n) on the selection images."""
        data, c = self.ctx.selection_data, self.ctx.eval
        threat = threat_of(c)  # eval.norm: the selection attack is in the evaluation's threat model
        batches = image_batches(data, c.batch_size)
        clean = clean_correct(self.model, batches)
        robust = pgd_correct(self.model, batches, eps=threat.eps, alpha=threat.alpha, steps=c.selection_steps,
                             seed=c.seed, clamp_start=c.clamp_start, norm=threat.norm)
        return int(clean.sum()), int(robust.sum()), len(data)

    def end_epoch(self, epoch: int) -> dict[str, float]:
        last = epoch + 1 >= self.cfg.epochs
        if self.ctx.selection_data is None or len(self.ctx.selection_data) == 0:
            return {}
        if self.cfg.selection == "last" and not last:
            return {}
        sa, ra, n = self.validate()
        better = self.best is None or (ra, sa) > (self.best["ra"], self.best["sa"])
        if self.cfg.selection == "last" or better:
            self.best = {"epoch": epoch + 1, "ra": ra, "sa": sa, "n": n, "state": self.selection_state()}
        return {"val_sa": sa / n, "val_ra": ra / n}

    def extra_state(self) -> dict[str, Any]:
        return {"best": self.best} if self.best is not None else {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        best = state.get("best")
        self.best = dict(best) if best else None

    def finish(self) -> dict[str, Any] | None:
        """Load the selected state into the model; return what was selected (None: the last state)."""
        if self.best is not None:
            self.load_selection_state(self.best["state"])
            return {k: v for k, v in self.best.items() if k != "state"}
        return None

    # ------------------------------------------------------------ shared pieces of the steps

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder features; without a graph when the encoder is frozen."""
        if self.linear:
            with torch.no_grad():
                return self.model.encoder(x)
        return self.model.encoder(x)
