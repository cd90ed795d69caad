"""ACL, the released "DS" variant (Jiang et al. 2020), per METHODS.md §2.

Dual BatchNorm: clean views go through the `normal` branch, adversarial views through `pgd`,
in the backbone and the projection head alike. The attack perturbs both views jointly to
maximize their NT-Xent through `pgd` with the model in eval mode (running statistics, which
the attack leaves untouched); its random start x + U(-eps, eps) is not clamped to [0, 1], as in
the official `PGD_contrastive` (every step clamps). The downstream encoder keeps the `pgd` branch.

Optimizer and schedule as the official `train_simCLR.py`: ACL's own LARS (`optimizer/lars.py`:
the learning rate inside the momentum buffer, `lars_lr_in_buffer = True`), and a LambdaLR that
is stepped *before* each iteration, so global iteration i (from 0) trains at the schedule's value
for i + 1 (`ACL.lr_at`). Pretraining data: the whole training split with the last partial batch
kept (its DataLoader has no drop_last).
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
from bench.train import lr_at

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


def acl_attack(model: DualBNModel, view1: torch.Tensor, view2: torch.Tensor, *, eps: float, alpha: float,
               steps: int, temperature: float = 0.5) -> list[torch.Tensor]:
    """Both views perturbed jointly to maximize their NT-Xent through `pgd`, model in eval mode."""
    def objective(advs: list[torch.Tensor]) -> torch.Tensor:
        return pair_nt_xent(model(torch.cat(advs), "pgd"), temperature)

    with eval_mode(model):
        return pgd(objective, [view1, view2], eps=eps, alpha=alpha, steps=steps, random_start="uniform",
                   clamp_start=False, freeze=model)


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
        warmup_epochs: int = param(10, min=0)
        min_lr: float = param(1e-6, min=0.0)
        temperature: float = param(0.5, min=1e-6)
        eps: float = param(8 / 255, min=0.0, max=1.0)
        alpha: float = param(2 / 255, min=0.0, max=1.0)
        attack_steps: int = param(5, min=0)

    branches = BRANCHES
    encoder_branch = "pgd"
    normalize = "imagenet"
    drop_last = False  # the official DataLoader keeps the last partial batch
    test_settings = {"attack_steps": 2}

    def build(self) -> nn.Module:
        return DualBNModel(self.new_encoder())

    def lr_at(self, epoch: int, step: int, steps: int) -> float:
        # The official LambdaLR is stepped before each iteration: iteration i trains at lambda(i + 1).
        return lr_at(self.cfg, epoch, step + 1, steps)

    def training_step(self, x, y, index, info):
        c = self.cfg
        v1, v2 = make_view(x, ACL_VIEW), make_view(x, ACL_VIEW)
        a1, a2 = acl_attack(self.model, v1, v2, eps=c.eps, alpha=c.alpha, steps=c.attack_steps,
                            temperature=c.temperature)
        clean = self.model(torch.cat([v1, v2]), "normal")
        adv = self.model(torch.cat([a1, a2]), "pgd")
        return acl_loss(clean, adv, c.temperature)
