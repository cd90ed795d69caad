"""DeACL (Zhang et al., ECCV 2022), per ../shared/spec/methods/deacl.md.

Two stages: a non-robust SimCLR teacher T (its own cached job), then adversarial distillation
into a student S initialized from it (every backbone weight and buffer).

- Teacher (`teacher`): "simclr_solo" (default) = a pretrain job of the harness `simclr` with
  `recipe = solo` (methods.simclr.SOLO_RECIPE) and the student's encoder options, on the student's
  source dataset (or `teacher_source`); "file:PATH" = a solo-learn checkpoint whose `backbone.*`
  weights (torchvision layout) load strictly: a job of the `checkpoint` stage (format
  `solo_learn`, bench.checkpoints.solo_learn), the same import `bench evaluate` uses. The teacher
  arrives as `ctx.inputs["teacher"]`: an encoder (nn.Module), frozen here and always in eval mode.
- Architecture (this method's own encoder options): the torchvision-layout CIFAR ResNet-18,
  conv1 padding 2 (`stem_padding = 2`), CIFAR-10 mean/std inside the model, one BatchNorm set,
  no projection head (the loss works on the pooled features).
- One step (official `solo/methods/mocov2_distillation_AT.py:202-326`): x = WEAK_VIEW of the
  batch; t = T(x) in eval mode under no_grad; PGD on S in eval mode from x + U(-eps, eps)
  (not clamped), 5 steps of 2/255 in the 8/255 ball, ascending -sum_i cos(S(x'_i), t_i), input
  gradients only; one train-mode forward of [x; x'] -> s, a;
  L = -mean_i cos(s_i, t_i) - gamma mean_i cos(a_i, s_i), gamma = `robust_weight` (the code's
  trades_k = 2); neither s nor t detached in the formula (t needs no gradient).
- SGD lr 0.5, momentum 0.9, wd 5e-4 on every student parameter; per-epoch linear warm-up from
  0.003 over 10 epochs, then cosine to 0 (`linear_warmup_cosine_lr`); 100 epochs, batch 256,
  drop_last. The online linear probe is monitoring only and dropped. Export: the student.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.attacks import eval_mode, pgd
from bench.augment import WEAK_VIEW, make_view
from bench.checkpoints import load_model
from bench.checkpoints.identity import sha256
from bench.config import EncoderConfig, TrainConfig, param
from bench.errors import BenchError
from bench.method import Method
from bench.models import encoder_from_config, encoder_options
from bench.registry import METHODS
from methods.simclr import SOLO_RECIPE, linear_warmup_cosine_lr

TEACHERS = ("simclr_solo", "file:PATH")
NORMALIZE, STEM_PADDING = "cifar10", 2  # DeACL's own architecture (deacl.md §2)


@dataclass(frozen=True)
class RandomTeacher:
    """Stand-in for the teacher job's encoder (tests, `bench profile`): a random-init encoder with
    the student's architecture, built when the method knows its encoder settings."""

    seed: int = 0


def parse_teacher(value: str, check_file: bool = True) -> tuple[str, str | None]:
    """'simclr_solo' -> ('simclr_solo', None); 'file:PATH' -> ('file', absolute PATH)."""
    if value == "simclr_solo":
        return value, None
    if value.startswith("file:"):
        path = value[len("file:"):].strip()
        if not path:
            raise BenchError("deacl.teacher: give the checkpoint as file:PATH")
        resolved = Path(path).expanduser().resolve()
        if check_file and not resolved.is_file():
            raise BenchError(f"deacl.teacher: teacher checkpoint {resolved} does not exist")
        return "file", str(resolved)
    raise BenchError(f"deacl.teacher: {value!r} is not one of {', '.join(TEACHERS)}")


# ---------------------------------------------------------------- loss and attack (plain functions)


def deacl_loss(s: torch.Tensor, a: torch.Tensor, t: torch.Tensor,
               robust_weight: float = 2.0) -> dict[str, torch.Tensor]:
    """L = -mean cos(s, t) - gamma mean cos(a, s): clean distillation + adversarial-to-clean term."""
    clean = -F.cosine_similarity(s.float(), t.float(), dim=1).mean()
    robust = -F.cosine_similarity(a.float(), s.float(), dim=1).mean()
    return {"loss": clean + robust_weight * robust, "distill_loss": clean, "robust_loss": robust}


def deacl_attack(student: nn.Module, x: torch.Tensor, target: torch.Tensor, *, eps: float, alpha: float,
                 steps: int) -> torch.Tensor:
    """PGD pushing S(x') away from the teacher's feature, S in eval mode, unclamped uniform start."""
    def objective(advs: list[torch.Tensor]) -> torch.Tensor:
        return -F.cosine_similarity(student(advs[0]).float(), target.float(), dim=1).sum()

    with eval_mode(student):
        return pgd(objective, x, eps=eps, alpha=alpha, steps=steps, random_start="uniform", clamp_start=False,
                   freeze=student)


# ---------------------------------------------------------------- the method


class DistillationModel(nn.Module):
    """The student encoder (the only trained module; the teacher is kept outside)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


@METHODS.register("deacl")
class DeACL(Method):
    """DeACL: adversarial feature distillation from a frozen SimCLR teacher into a student copy."""

    @dataclass
    class Config(TrainConfig):
        epochs: int = param(100, min=1)
        batch_size: int = param(256, min=2)
        lr: float = param(0.5, min=0.0)
        momentum: float = param(0.9, min=0.0, max=1.0)
        weight_decay: float = param(5e-4, min=0.0)
        warmup_epochs: int = param(10, min=0, help="per-epoch linear warm-up (lr reached at warmup_epochs - 1)")
        warmup_from: float = param(0.003, min=0.0)
        min_lr: float = param(0.0, min=0.0, help="eta_min of the per-epoch cosine")
        eps: float = param(8 / 255, min=0.0, max=1.0)
        alpha: float = param(2 / 255, min=0.0, max=1.0)
        attack_steps: int = param(5, min=0)
        robust_weight: float = param(2.0, min=0.0, help="gamma (the code's trades_k): weight of -cos(adv, clean)")
        teacher: str = param("simclr_solo", help="simclr_solo (a cached simclr recipe=solo job) | file:PATH "
                                                 "(a solo-learn checkpoint, backbone.* loaded strictly)")
        teacher_source: str = param("", help="dataset the simclr_solo teacher pretrains on ('' = the student's)")
        teacher_epochs: int = param(0, min=0, help="epochs of the simclr_solo teacher (0 = the run's simclr.epochs)")
        teacher_batch_size: int = param(SOLO_RECIPE["batch_size"], min=0,
                                        help="batch size of the simclr_solo teacher (0 = the run's simclr.batch_size)")

    branches = ("normal",)
    encoder_branch = "normal"
    normalize = NORMALIZE
    stem_padding = STEM_PADDING
    test_settings = {"attack_steps": 2}

    def __init__(self, cfg: Any, ctx):
        self.teacher = self._teacher(cfg, ctx)
        super().__init__(cfg, ctx)

    # -- configuration

    @classmethod
    def dependencies(cls, cfg: Any) -> dict[str, tuple[str, dict[str, Any]]]:
        """{"teacher": (stage, params)}: a simclr pretrain job with the solo recipe, or a checkpoint
        job importing the file (solo-learn layout).

        `encoder` fills the shared encoder settings left to the method (stem_padding = -1,
        normalize = "method") with DeACL's own values, so the teacher's architecture is the
        student's whatever the run sets.
        """
        cfg = cfg if cfg is not None else cls.Config()
        kind, path = parse_teacher(cfg.teacher)
        own = {"stem_padding": STEM_PADDING, "normalize": NORMALIZE}
        if kind == "file":
            return {"teacher": ("checkpoint", {"source": path, "sha256": sha256(path), "format": "solo_learn",
                                               "want": "encoder", "encoder": own})}
        settings = {k: v for k, v in SOLO_RECIPE.items() if k not in ("epochs", "batch_size")}
        if cfg.teacher_epochs:
            settings["epochs"] = cfg.teacher_epochs
        if cfg.teacher_batch_size:
            settings["batch_size"] = cfg.teacher_batch_size
        params: dict[str, Any] = {"method": "simclr", "settings": settings, "encoder": own}
        if cfg.teacher_source:
            params["source"] = cfg.teacher_source
        return {"teacher": ("pretrain", params)}

    @classmethod
    def placeholder_teacher(cls, encoder: EncoderConfig | None = None, seed: int = 0,
                            device: torch.device | str = "cpu") -> nn.Module | RandomTeacher:
        """A random-init teacher with DeACL's architecture for `encoder` (tests, profiling); without
        encoder settings, a `RandomTeacher` the method resolves with its own."""
        if encoder is None:
            return RandomTeacher(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            teacher = encoder_from_config(encoder, cls.branches, cls.normalize, cls.stem_padding)
        return teacher.to(device).eval()

    def _teacher(self, cfg: Any, ctx) -> nn.Module:
        """The frozen, eval-mode teacher (a private copy) from `ctx.inputs["teacher"]`."""
        given = ctx.inputs.get("teacher")
        kind, path = parse_teacher(cfg.teacher, check_file=False)
        if isinstance(given, RandomTeacher):
            given = self.placeholder_teacher(ctx.encoder, given.seed)
        elif isinstance(given, (str, Path)):
            given = self.load_teacher_file(given, ctx.encoder)
        elif given is None:
            if kind != "file":
                raise BenchError("deacl needs its teacher (ctx.inputs['teacher']): run the simclr_solo teacher "
                                 "job first, or set deacl.teacher=file:PATH")
            given = self.load_teacher_file(path, ctx.encoder)
        if not isinstance(given, nn.Module):
            raise BenchError(f"deacl: the teacher must be an encoder module, got {type(given).__name__}")
        want = encoder_options(ctx.encoder, self.normalize, self.stem_padding)
        have = {"normalize": given.normalize.kind, "stem_padding": getattr(given, "stem_padding", 1)}
        if have != want or getattr(given, "width", ctx.encoder.width) != ctx.encoder.width:
            raise BenchError(f"deacl: the teacher's architecture {have} (width {getattr(given, 'width', '?')}) is "
                             f"not the student's {want} (width {ctx.encoder.width})")
        teacher = copy.deepcopy(given).to(ctx.device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher

    @classmethod
    def load_teacher_file(cls, path: str | Path, encoder: EncoderConfig) -> nn.Module:
        """A solo-learn checkpoint's backbone in DeACL's encoder (strict: every key, every shape),
        through the `solo_learn` checkpoint format (what the teacher's checkpoint job runs)."""
        options = encoder_options(encoder, cls.normalize, cls.stem_padding)
        teacher = load_model(path, "solo_learn", want="encoder", **options).model
        if teacher.width != encoder.width:
            raise BenchError(f"teacher checkpoint {path} does not fit the student's encoder: it has width "
                             f"{teacher.width}, encoder.width is {encoder.width}")
        return teacher.eval()

    def build(self) -> nn.Module:
        student = self.new_encoder()
        student.load_state_dict(self.teacher.state_dict(), strict=True)  # every weight and buffer
        return DistillationModel(student)

    def train_mode(self) -> None:
        self.model.train()
        self.teacher.eval()

    def lr_at(self, epoch: int, step: int, steps: int) -> float:
        c = self.cfg
        return linear_warmup_cosine_lr(c.lr, epoch, c.warmup_epochs, c.epochs, c.warmup_from, c.min_lr)

    # -- one step

    def step(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Distillation loss of one batch of (already augmented) images."""
        c, student = self.cfg, self.model.encoder
        self.teacher.eval()
        with torch.no_grad():
            target = self.teacher(x)
        x_adv = deacl_attack(student, x, target, eps=c.eps, alpha=c.alpha, steps=c.attack_steps)
        s, a = student(torch.cat([x, x_adv])).chunk(2)  # one train-mode forward: BN over clean + adversarial
        out = deacl_loss(s, a, target, c.robust_weight)
        return {k: v if k == "loss" else v.detach() for k, v in out.items()}

    def training_step(self, x, y, index, info):
        return self.step(make_view(x, WEAK_VIEW))
