"""ACL, the released "DS" variant (Jiang et al. 2020), per docs/methods.md §2.

Dual BatchNorm: clean views go through the `normal` branch, adversarial views through `pgd`,
in the backbone and the projection head alike. The attack perturbs both views jointly to
maximize their NT-Xent through `pgd` with the model in eval mode (running statistics, which
the attack leaves untouched); its random start x + U(-eps, eps) is not clamped to [0, 1], as in
the official `PGD_contrastive` (every step clamps). The downstream encoder keeps the `pgd` branch.

Optimizer and schedule as the official `train_simCLR.py`: ACL's own LARS (`optimizer/lars.py`:
the learning rate inside the momentum buffer, `lars_lr_in_buffer = True`), and a LambdaLR that
is stepped *before* each iteration, so global iteration i (from 0) trains at the schedule's value
for i + 1 (`lr_step_first`). Pretraining data: the whole training split with the last partial
batch kept (its DataLoader has no drop_last). Each of these is an option restoring the harness's
earlier behaviour (`clamp_start`, `lars_lr_in_buffer`, `lr_step_first`).

Options shared by the ACL family (off by default): AIR's invariance terms (`air_lambda1`,
`air_lambda2`, `air_kl`, air_rcs.md A) and the un-halved loss (`loss_halved = false`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench.attacks import eval_mode, pgd
from bench.augment import ACL_VIEW, make_view
from bench.config import TrainConfig, param
from bench.losses import nt_xent
from bench.method import Method
from bench.models.norm import BranchedBatchNorm1d
from bench.registry import METHODS
from bench.selection.rcs import RCSParts
from bench.train import lr_at
from methods.air_loss import KL_FORMS, acl_family_loss

BRANCHES = ("normal", "pgd")


class DualBNHead(nn.Module):
    """fc(d,d, bias) -> BN -> ReLU -> fc(no bias) -> BN -> ReLU -> fc(no bias) -> BN, each BN branched.

    No L2 normalization here: the loss takes the cosine.
    """

    def __init__(self, dim: int, branches: tuple[str, ...] = BRANCHES):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(dim, dim), BranchedBatchNorm1d(dim, branches)
        self.fc2, self.bn2 = nn.Linear(dim, dim, bias=False), BranchedBatchNorm1d(dim, branches)
        self.fc3, self.bn3 = nn.Linear(dim, dim, bias=False), BranchedBatchNorm1d(dim, branches)

    def forward(self, h: torch.Tensor, branch: str) -> torch.Tensor:
        h = F.relu(self.bn1(self.fc1(h), branch))
        h = F.relu(self.bn2(self.fc2(h), branch))
        return self.bn3(self.fc3(h), branch)


class DualBNModel(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = DualBNHead(encoder.feature_dim, encoder.branches)

    def forward(self, x: torch.Tensor, branch: str) -> torch.Tensor:
        return self.head(self.encoder(x, branch), branch)


def pair_nt_xent(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent of a batch holding view 1 then view 2 of the same images."""
    z1, z2 = z.chunk(2)
    return nt_xent(z1, z2, temperature)


def acl_loss(clean: torch.Tensor, adv: torch.Tensor, temperature: float = 0.5) -> dict[str, torch.Tensor]:
    """(NT-Xent(clean pair) + NT-Xent(adversarial pair)) / 2; each tensor is [view1; view2]."""
    clean_loss, adv_loss = pair_nt_xent(clean, temperature), pair_nt_xent(adv, temperature)
    return {"loss": (clean_loss + adv_loss) / 2, "clean_loss": clean_loss, "adv_loss": adv_loss}


def acl_attack(model: nn.Module, view1: torch.Tensor, view2: torch.Tensor, *, eps: float, alpha: float,
               steps: int, temperature: float = 0.5, clamp_start: bool = False) -> list[torch.Tensor]:
    """Both views perturbed jointly to maximize their NT-Xent through `pgd`, model in eval mode.

    `model(x, branch)` maps a [view1; view2] batch to its projections (DynACL: the swap forward).
    `clamp_start = False` leaves the uniform start unclipped, as the released code does.
    """
    def objective(advs: list[torch.Tensor]) -> torch.Tensor:
        return pair_nt_xent(model(torch.cat(advs), "pgd"), temperature)

    with eval_mode(model):
        return pgd(objective, [view1, view2], eps=eps, alpha=alpha, steps=steps, random_start="uniform",
                   clamp_start=clamp_start, freeze=model)


def iteration_lr(cfg, epoch: int, step: int, steps: int, step_first: bool) -> float:
    """ACL's per-iteration schedule; `step_first`: the official loop calls scheduler.step()
    before each forward, so iteration i of an epoch uses the schedule at progress (i + 1) / L."""
    return lr_at(cfg, epoch, step + 1 if step_first else step, steps)


@METHODS.register("acl")
class ACL(Method):
    """ACL (DS): dual-BN adversarial contrastive learning."""

    @dataclass
    class Config(TrainConfig):
        epochs: int = param(1000, min=1)
        batch_size: int = param(512, min=2)
        optimizer: str = param("lars", choices=("sgd", "lars"))
        lr: float = param(5.0, min=0.0)
        momentum: float = param(0.9, min=0.0, max=1.0)
        weight_decay: float = param(1e-6, min=0.0)
        trust_coef: float = param(1e-3, min=0.0, help="LARS trust coefficient")
        lars_lr_in_buffer: bool = param(True, help="LARS with the lr inside the momentum buffer (ACL's official "
                                                   "optimizer/lars.py); false = the torchlars form (lr outside)")
        lr_step_first: bool = param(True, help="iteration i uses the schedule at i + 1 (the official loop steps its "
                                               "scheduler before each forward); false = at i")
        warmup_epochs: int = param(10, min=0)
        min_lr: float = param(1e-6, min=0.0)
        temperature: float = param(0.5, min=1e-6)
        eps: float = param(8 / 255, min=0.0, max=1.0)
        alpha: float = param(2 / 255, min=0.0, max=1.0)
        attack_steps: int = param(5, min=0)
        clamp_start: bool = param(False, help="clip the attack's uniform start to [0, 1] (the official code does not)")
        loss_halved: bool = param(True, help="divide the loss by 2 (ACL); false = the AIR code's sum")
        air_lambda1: float = param(0.0, min=0.0, help="weight of AIR's SIR term (0 = off)")
        air_lambda2: float = param(0.0, min=0.0, help="weight of AIR's AIR term (0 = off)")
        air_kl: str = param("code", choices=KL_FORMS, help="code: the released non-log kl_div; textbook: true KL")

    branches = BRANCHES
    encoder_branch = "pgd"
    normalize = "imagenet"
    drop_last = False  # the official DataLoader keeps the last partial batch
    supports_rcs = True
    test_settings = {"attack_steps": 2}

    def build(self) -> nn.Module:
        return DualBNModel(self.new_encoder())

    def lr_at(self, epoch: int, step: int, steps: int) -> float:
        return iteration_lr(self.cfg, epoch, step, steps, self.cfg.lr_step_first)

    @property
    def uses_air(self) -> bool:
        return bool(self.cfg.air_lambda1 or self.cfg.air_lambda2)

    def views(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return make_view(x, ACL_VIEW), make_view(x, ACL_VIEW)

    def training_step(self, x, y, index, info):
        c = self.cfg
        v1, v2 = self.views(x)
        a1, a2 = acl_attack(self.model, v1, v2, eps=c.eps, alpha=c.alpha, steps=c.attack_steps,
                            temperature=c.temperature, clamp_start=c.clamp_start)
        clean = self.model(torch.cat([v1, v2]), "normal")
        adv = self.model(torch.cat([a1, a2]), "pgd")
        # AIR's originals: the un-augmented images, their own BatchNorm batch after the clean pair
        original = self.model(x, "normal") if self.uses_air else None
        return acl_family_loss(clean, adv, temperature=c.temperature, halved=c.loss_halved, original=original,
                               lambda1=c.air_lambda1, lambda2=c.air_lambda2, kl=c.air_kl)

    def rcs_parts(self, epoch: int) -> RCSParts:
        """RCS's view of this method: f, g (its Linear layers are theta), the views, ACL's attack."""
        c = self.cfg
        return RCSParts(model=self.model, encoder=self.model.encoder, head=self.model.head, views=self.views,
                        eps=c.eps, alpha=c.alpha, steps=c.attack_steps, temperature=c.temperature)
