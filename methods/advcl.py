"""AdvCL (Fan et al., NeurIPS 2021), per docs/methods.md §1.

Multi-BN ResNet-18 (branches `normal`, `pgd`, `pgd_ce`, no input normalization), a projection
head Linear(d, d) -> BatchNorm1d (one, shared by every view) -> ReLU -> Linear(d, 128) with an
L2-normalized output, and one linear pseudo-label head per cluster count K on the d-dim feature
(d = 512 at width 64).

One training step (defaults = the paper's Table 4 row 7 with ClusterFit):

- views of each image: tau1, tau2 = SIMCLR_VIEW; x_org = WEAK_VIEW (the paper's "x");
  x_hfc = hfc(x_org, r=8), fixed during the attack;
- PGD (5 steps, eps 8/255, alpha 2/255, unclamped uniform random start, model in train mode)
  on x_cl (through `pgd`, ascending the contrastive loss over the views) and, independently,
  on x_ce (through `pgd_ce`, ascending the mean over the K heads of the summed pseudo-label CE);
- loss = C * NTXent_m(views; t=0.5) + lam * mean_K CE(head_K(x_ce), y_K), C = 0.5/0.07
  (`contrastive_scale`), lam = 0.2 (`ce_weight`). Only x_ce feeds the CE term.

BatchNorm batch statistics: `bn_shards = 1` (default) normalizes each forward with the whole
batch's statistics. The official code runs under `nn.DataParallel` (2+ GPUs required) with an
apex SyncBatchNorm that never synchronizes there, so each GPU normalizes its 512 / n_gpus images
with their own statistics; `bn_shards = N` reproduces that for every train-mode BatchNorm
(backbone branches and the projection head), N = 2 being the official minimum of 2 GPUs.
Running statistics then follow the first shard, as DataParallel keeps the first GPU's in-place
updates (`bench.train.bn_shards`; docs/fidelity.md). Pretraining data: the whole training
split, the last partial batch kept (the official DataLoader has no drop_last).

The contrastive views are the config option `views`, a tuple of names:

  ========== ========================== ========= =======
  name       image                      branch    attacked
  ========== ========================== ========= =======
  adv_x      x_org + delta              pgd       yes
  adv_tau1   tau1 + delta1              pgd       yes
  adv_tau2   tau2 + delta2              pgd       yes
  tau1       tau1                       normal    no
  tau2       tau2                       normal    no
  x_hfc      HFC of x_org (r)           normal    no
  x_lfc      LFC of x_org (r)           normal    no
  ========== ========================== ========= =======

The seven rows of the paper's Table 4 are `TABLE4_VIEWS[row]` (row 7 is the default):

  1 ("adv_tau1", "tau2")                       tau1+d1, tau2
  2 ("adv_tau1", "adv_tau2")                   tau1+d1, tau2+d2
  3 ("adv_tau1", "adv_tau2", "tau1", "tau2")   tau1+d1, tau2+d2, tau1, tau2
  4 ("adv_x", "tau1", "tau2")                  x+d, tau1, tau2
  5 ("adv_x", "tau1", "tau2", "x_lfc")         x+d, tau1, tau2, x_l
  6 ("adv_x", "tau1", "tau2", "x_lfc", "x_hfc")  x+d, tau1, tau2, x_l, x_h
  7 ("adv_x", "tau1", "tau2", "x_hfc")         x+d, tau1, tau2, x_h

Every adversarial view is attacked jointly (each along the sign of its own gradient of the one
contrastive loss) and goes through `pgd`; every clean view goes through `normal`; each view is
its own forward pass (its own BatchNorm batch statistics), as in the official code.
Table 5's "w/o ClusterFit" row is `pseudo_labels = "none"` (or `ce_weight = 0`): no heads, no
x_ce attack, no pseudo-label job.

Pseudo-labels (`pseudo_labels`): "simclr" (default; k-means on the features of a SimCLR encoder
the harness pretrains on the same unlabeled split), "imagenet" (torchvision's supervised
ImageNet ResNet-50, weights from the torch hub cache), "file:PATH" (a label file) or "none".
They are computed by their own cached job (`bench.clusterfit`) and arrive as
`ctx.inputs["pseudo_labels"][K]`, indexed by source-split position.

A-InfoNCE (ainfonce.md) is the option set `ainfonce_*` (methods/asymmetric_infonce.py): its
contrastive term replaces C * NTXent_m in the loss and, in its plain form, in the attack; the
adaptive stop degree adds two no-grad `normal`-branch forwards after the step's forwards, as the
official code does. `ainfonce_variant = "none"` (default) leaves AdvCL unchanged.

Speed: the clean views cannot change during the attack (fixed weights, and in train mode each
forward normalizes with its own batch statistics), so their projections are computed once per
step, with their graph kept for the final loss, instead of once per attack step and again at
the end (the official schedule; `benchmarks/advcl_reference.py` implements it for the tests and
the benchmark). The final loss and every gradient equal the official schedule's. The only state
it touches more often is BatchNorm running statistics: the backbone's `normal` branch (updated
by the clean views at every attack step) and the shared projection-head BatchNorm; both are
brought to exactly what the official schedule leaves (up to float rounding) by
`bench.models.bn_replay` (docs/advcl.md).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bench.attacks import pgd
from bench.config import TrainConfig, param
from bench.errors import BenchError
from bench.losses import multiview_nt_xent
from bench.method import Method
from bench.models.bn_replay import StatsLedger, branch_batchnorms, replayed_rounds
from bench.registry import METHODS
from bench.train import supcon_lr
from bench.train.bn_shards import per_shard, sharded_batchnorm
from methods.asymmetric_infonce import AdaptiveStopDegree, AInfoNCESettings, advcl_ainfonce_loss, check_advcl_views

BRANCHES = ("normal", "pgd", "pgd_ce")
CLEAN_BRANCH, ADV_BRANCH, CE_BRANCH = BRANCHES

# view name -> (which clean image it is built from, attacked?)
VIEWS: dict[str, tuple[str, bool]] = {
    "adv_x": ("x_org", True),
    "adv_tau1": ("tau1", True),
    "adv_tau2": ("tau2", True),
    "tau1": ("tau1", False),
    "tau2": ("tau2", False),
    "x_hfc": ("x_hfc", False),
    "x_lfc": ("x_lfc", False),
}
TABLE4_VIEWS: dict[int, tuple[str, ...]] = {
    1: ("adv_tau1", "tau2"),
    2: ("adv_tau1", "adv_tau2"),
    3: ("adv_tau1", "adv_tau2", "tau1", "tau2"),
    4: ("adv_x", "tau1", "tau2"),
    5: ("adv_x", "tau1", "tau2", "x_lfc"),
    6: ("adv_x", "tau1", "tau2", "x_lfc", "x_hfc"),
    7: ("adv_x", "tau1", "tau2", "x_hfc"),
}
PSEUDO_LABEL_SOURCES = ("simclr", "imagenet", "file:PATH", "none")


# ---------------------------------------------------------------- config helpers


def check_views(views: Sequence[str]) -> tuple[str, ...]:
    """The view set as a tuple, or BenchError naming what is wrong."""
    views = tuple(views)
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        raise BenchError(f"advcl.views: unknown view(s) {unknown}; choose from {', '.join(VIEWS)} "
                         f"(Table 4 rows: {', '.join(f'{r}={list(v)}' for r, v in TABLE4_VIEWS.items())})")
    if len(set(views)) != len(views):
        raise BenchError(f"advcl.views: {list(views)} names a view twice")
    if len(views) < 2:
        raise BenchError(f"advcl.views: a contrastive loss needs at least two views, got {list(views)}")
    if not any(VIEWS[v][1] for v in views):
        raise BenchError(f"advcl.views: {list(views)} has no adversarial view (adv_x, adv_tau1, adv_tau2); "
                         "the downstream `pgd` branch would never be trained")
    return views


def parse_pseudo_labels(value: str, check_file: bool = True) -> tuple[str, str | None]:
    """'simclr' -> ('simclr', None); 'file:PATH' -> ('file', absolute PATH); checks the value."""
    if value.startswith("file:"):
        path = value[len("file:"):].strip()
        if not path:
            raise BenchError("advcl.pseudo_labels: give the label file as file:PATH")
        resolved = Path(path).expanduser().resolve()
        if check_file and not resolved.is_file():
            raise BenchError(f"advcl.pseudo_labels: label file {resolved} does not exist")
        return "file", str(resolved)
    if value in ("simclr", "imagenet", "none"):
        return value, None
    raise BenchError(f"advcl.pseudo_labels: {value!r} is not one of {', '.join(PSEUDO_LABEL_SOURCES)}")


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 2 for k in ks) or len(set(ks)) != len(ks):
        raise BenchError(f"advcl.cluster_ks: need distinct cluster counts >= 2, got {list(ks)}")
    return ks


def uses_pseudo_labels(cfg: Any) -> bool:
    """Whether the config has the ClusterFit term (Table 5's "w/o ClusterFit" row has not)."""
    return cfg.ce_weight > 0 and cfg.pseudo_labels != "none"


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- losses (plain functions)


def advcl_contrastive(z: Sequence[torch.Tensor], temperature: float = 0.5,
                      scale: float = 0.5 / 0.07) -> torch.Tensor:
    """scale * multi-view NT-Xent (the official loss keeps SupCon's base temperature 0.07)."""
    return scale * multiview_nt_xent(z, temperature)


def pseudo_label_ce(logits: Sequence[torch.Tensor], labels: Sequence[torch.Tensor],
                    reduction: str = "mean") -> torch.Tensor:
    """Mean over the K heads of the cross-entropy with each head's pseudo-labels."""
    losses = [F.cross_entropy(l.float(), y, reduction=reduction) for l, y in zip(logits, labels)]
    return torch.stack(losses).mean()



# ---------------------------------------------------------------- model


class ProjectionHead(nn.Module):
    """Linear(d, h) -> BatchNorm1d(h) -> ReLU -> Linear(h, out), L2-normalized output.

    One BatchNorm shared by every view (not branched). Its `ledger` defers running-statistic
    updates during a step (`bench.models.bn_replay.StatsLedger`), so the step can apply them in
    the order the official schedule would.
    """

    def __init__(self, dim: int, hidden: int, out_dim: int = 128, bn_shards: int = 1):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, out_dim)
        self.ledger = StatsLedger()
        self.bn_shards = bn_shards  # per-GPU statistics of the official DataParallel run (`AdvCL.Config.bn_shards`)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        # The first shard goes through the ledger (its statistics are the ones a DataParallel run keeps).
        h = per_shard(self.bn, self.fc1(feature), self.bn_shards, first=lambda part: self.ledger.forward(self.bn, part))
        return F.normalize(self.fc2(F.relu(h)), dim=1)


class AdvCLModel(nn.Module):
    def __init__(self, encoder: nn.Module, ks: Sequence[int], proj_dim: int = 128, bn_shards: int = 1):
        super().__init__()
        self.encoder = encoder
        d = encoder.feature_dim
        self.head = ProjectionHead(d, d, proj_dim, bn_shards)
        self.cluster_heads = nn.ModuleDict({str(k): nn.Linear(d, k) for k in ks})

    def project(self, x: torch.Tensor, branch: str) -> torch.Tensor:
        return self.head(self.encoder(x, branch))

    def cluster_logits(self, x: torch.Tensor, branch: str = CE_BRANCH) -> list[torch.Tensor]:
        feature = self.encoder(x, branch)
        return [head(feature) for head in self.cluster_heads.values()]

    def forward(self, x: torch.Tensor, branch: str = ADV_BRANCH) -> torch.Tensor:
        return self.project(x, branch)


# ---------------------------------------------------------------- the method


@METHODS.register("advcl")
class AdvCL(Method):
    """AdvCL: adversarial + HFC contrastive views, ClusterFit pseudo-label AT regularizer."""

    @dataclass
    class Config(TrainConfig, AInfoNCESettings):
        epochs: int = param(1000, min=1)
        batch_size: int = param(512, min=2)
        lr: float = param(0.5, min=0.0)
        momentum: float = param(0.9, min=0.0, max=1.0)
        weight_decay: float = param(1e-4, min=0.0)
        warmup_epochs: int = param(10, min=0)
        warmup_from: float = param(0.01, min=0.0)
        min_lr: float = param(5e-4, min=0.0, help="eta_min of the per-epoch cosine")
        temperature: float = param(0.5, min=1e-6)
        contrastive_scale: float = param(0.5 / 0.07, min=0.0,
                                         help="C: the official loss keeps SupCon's base temperature 0.07")
        ce_weight: float = param(0.2, min=0.0, help="lambda of the pseudo-label CE (0 = no ClusterFit)")
        views: tuple[str, ...] = param(TABLE4_VIEWS[7], aliases=TABLE4_VIEWS,
                                       help="contrastive views, or a Table 4 row number 1-7 (TABLE4_VIEWS)")
        freq_radius: int = param(8, min=0, help="r of the HFC/LFC views")
        eps: float = param(8 / 255, min=0.0, max=1.0)
        alpha: float = param(2 / 255, min=0.0, max=1.0)
        attack_steps: int = param(5, min=0)
        pseudo_labels: str = param("simclr", help="simclr | imagenet | file:PATH | none")
        cluster_ks: tuple[int, ...] = param((2, 10, 50, 100, 500), help="ClusterFit K, one head each")
        proj_dim: int = param(128, min=1)
        bn_shards: int = param(1, min=1, help="BatchNorm statistics per shard of the batch, as under the official "
                                              "nn.DataParallel on N GPUs (official minimum: 2); 1 = whole batch")

    branches = BRANCHES
    encoder_branch = ADV_BRANCH
    normalize = "none"
    drop_last = False  # the official DataLoader keeps the last partial batch
    test_settings = {"attack_steps": 2}

    def __init__(self, cfg: Any, ctx):
        self.views = check_views(cfg.views)
        self._init_ainfonce(cfg)
        parse_pseudo_labels(cfg.pseudo_labels, check_file=False)  # the labels themselves come in ctx
        self.ks = check_ks(cfg.cluster_ks) if uses_pseudo_labels(cfg) else ()
        super().__init__(cfg, ctx)
        self.labels = self._pseudo_labels(ctx.inputs.get("pseudo_labels")) if self.ks else {}

    # -- configuration

    @classmethod
    def dependencies(cls, cfg: Any) -> dict[str, tuple[str, dict[str, Any]]]:
        cfg = cfg if cfg is not None else cls.Config()
        check_views(cfg.views)
        source, path = parse_pseudo_labels(cfg.pseudo_labels)
        if not uses_pseudo_labels(cfg):
            return {}
        params: dict[str, Any] = {"source": source, "ks": list(check_ks(cfg.cluster_ks)), "file": path}
        if path is not None:
            params["sha256"] = _file_digest(path)  # a changed file is a new job
        return {"pseudo_labels": ("pseudo_labels", params)}

    def build(self) -> nn.Module:
        return AdvCLModel(self.new_encoder(), self.ks, self.cfg.proj_dim, self.cfg.bn_shards)

    def min_batch_size(self) -> int:
        return 2 * self.cfg.bn_shards  # every shard of a final partial batch needs 2 images (BatchNorm1d)

    def lr_at(self, epoch: int, step: int, steps: int) -> float:
        return supcon_lr(self.cfg, epoch, step, steps)

    def _pseudo_labels(self, given: dict[Any, torch.Tensor] | None) -> dict[int, torch.Tensor]:
        if not given:
            raise BenchError("advcl needs pseudo-labels (ctx.inputs['pseudo_labels']); run its pseudo-label "
                             "job first, or set advcl.pseudo_labels=none for the run without ClusterFit")
        have = {int(k): v for k, v in given.items()}
        missing = [k for k in self.ks if k not in have]
        if missing:
            raise BenchError(f"advcl: pseudo-labels for K={missing} are missing (have K={sorted(have)})")
        out = {}
        for k in self.ks:
            labels = torch.as_tensor(have[k]).long().to(self.ctx.device)
            if labels.numel() and int(labels.max()) >= k:
                raise BenchError(f"advcl: pseudo-labels for K={k} go up to {int(labels.max())}")
            out[k] = labels
        return out

    # -- one step

    @property
    def uses_ce(self) -> bool:
        return bool(self.ks)

    def make_inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The clean images of one batch: tau1, tau2, x_org and the frequency views it needs."""
        from bench.augment import SIMCLR_VIEW, WEAK_VIEW, make_view
        from bench.frequency import hfc, lfc

        inputs = {"tau1": make_view(x, SIMCLR_VIEW), "tau2": make_view(x, SIMCLR_VIEW),
                  "x_org": make_view(x, WEAK_VIEW)}
        if "x_hfc" in self.views:
            inputs["x_hfc"] = hfc(inputs["x_org"], self.cfg.freq_radius)
        if "x_lfc" in self.views:
            inputs["x_lfc"] = lfc(inputs["x_org"], self.cfg.freq_radius)
        return inputs

    def batch_labels(self, index: torch.Tensor) -> list[torch.Tensor]:
        """Each head's pseudo-labels for the batch's source-split positions."""
        ys = []
        for k in self.ks:
            table = self.labels[k]
            if int(index.max()) >= len(table):
                raise BenchError(f"advcl: no pseudo-label (K={k}) for training image {int(index.max())}; "
                                 "the pseudo-label job was run on other data")
            ys.append(table[index])
        if ys and bool((torch.stack(ys) < 0).any()):
            raise BenchError("advcl: some training images have no pseudo-label (-1); the pseudo-label job "
                             "was run on another split (check data.val_size / data.train_limit)")
        return ys

    def training_step(self, x, y, index, info):
        # bn_shards > 1: the backbone's BatchNorms normalize per shard (the head's does it itself)
        with sharded_batchnorm(self.model.encoder, self.cfg.bn_shards):
            return self.step(self.make_inputs(x), index, info.epoch)

    def step(self, inputs: dict[str, torch.Tensor], index: torch.Tensor, epoch: int = 0) -> dict[str, torch.Tensor]:
        """The loss of one batch from its clean images (`make_inputs`): attack, then loss.

        Clean views are forwarded once (graph kept for the loss; detached copies for the attack);
        the attack and the final loss forward only the adversarial inputs.
        """
        c, model = self.cfg, self.model
        adv_views = [v for v in self.views if VIEWS[v][1]]
        clean_views = [v for v in self.views if not VIEWS[v][1]]
        labels = self.batch_labels(index) if self.uses_ce else []
        rounds = c.attack_steps + 1  # forwards of each view in the official schedule
        normal_bns = branch_batchnorms(model.encoder, CLEAN_BRANCH)
        with model.head.ledger.record() as ledger:
            with replayed_rounds(normal_bns, len(clean_views), rounds):
                z_clean = {v: model.project(inputs[VIEWS[v][0]], CLEAN_BRANCH) for v in clean_views}
            clean_stats = dict(zip(clean_views, ledger))
            del ledger[:]
            fixed = {v: z.detach() for v, z in z_clean.items()}

            def objective(advs: list[torch.Tensor]) -> torch.Tensor:
                z = {**fixed, **{v: model.project(a, ADV_BRANCH) for v, a in zip(adv_views, advs)}}
                total = self.contrastive([z[v] for v in self.views], attack=True)
                if self.uses_ce:
                    total = total + pseudo_label_ce(model.cluster_logits(advs[-1]), labels, "sum")
                return total

            bases = [inputs[VIEWS[v][0]] for v in adv_views] + ([inputs["x_org"]] if self.uses_ce else [])
            advs = pgd(objective, bases, eps=c.eps, alpha=c.alpha, steps=c.attack_steps,
                       random_start="uniform", clamp_start=False, freeze=model)
            z = {**z_clean, **{v: model.project(a, ADV_BRANCH) for v, a in zip(adv_views, advs)}}
            adv_stats = list(ledger)
        if model.head.training:  # projection-head BN: the official order (every view, every round)
            per_round = [dict(zip(adv_views, adv_stats[r * len(adv_views):(r + 1) * len(adv_views)]))
                         for r in range(rounds)]
            StatsLedger.apply(model.head.bn, [clean_stats[v] if v in clean_stats else per_round[r][v]
                                              for r in range(rounds) for v in self.views])
        out: dict[str, torch.Tensor] = {}
        stop_degree = self.stop_degree_of_step(inputs, advs, epoch, out)
        cl = self.contrastive([z[v] for v in self.views], stop_degree=stop_degree)
        out["cl_loss"] = cl
        loss = cl
        if self.uses_ce:
            ce = pseudo_label_ce(model.cluster_logits(advs[-1]), labels)
            loss = loss + c.ce_weight * ce
            out["ce_loss"] = ce
        out["loss"] = loss
        return {k: v if k == "loss" else v.detach() for k, v in out.items()}

    # -- A-InfoNCE (ainfonce.md; methods/asymmetric_infonce.py)

    def _init_ainfonce(self, cfg: Any) -> None:
        adversarial = [v for v in self.views if VIEWS[v][1]]
        check_advcl_views(cfg, self.views, adversarial)
        self.stop_degrees = AdaptiveStopDegree(cfg.ainfonce_stop_degree, cfg.ainfonce_sd_adaptive_epochs,
                                               cfg.ainfonce_d_min)

    def contrastive(self, z: list[torch.Tensor], *, attack: bool = False,
                    stop_degree: float | None = None) -> torch.Tensor:
        """The contrastive term over the views' projections (in `self.views` order)."""
        c = self.cfg
        if c.ainfonce_variant == "none":
            return advcl_contrastive(z, c.temperature, c.contrastive_scale)
        adv = next(i for i, v in enumerate(self.views) if VIEWS[v][1])  # A-InfoNCE's blocks: [adversarial, clean]
        ordered = [z[adv]] + [zi for i, zi in enumerate(z) if i != adv]
        return advcl_ainfonce_loss(ordered, c, stop_degree=stop_degree, attack=attack, temperature=c.temperature,
                                   scale=c.contrastive_scale)

    def stop_degree_of_step(self, inputs: dict[str, torch.Tensor], advs: list[torch.Tensor], epoch: int,
                            out: dict[str, torch.Tensor]) -> float | None:
        """The adaptive stop degree: after the step's forwards, under no_grad in train mode, the
        `normal`-branch features of the adversarial view's clean image and of the adversarial view
        (official `pretraining_advCL.py:317-321`; these forwards update `normal`'s statistics)."""
        if not self.stop_degrees.enabled or self.cfg.ainfonce_variant == "none":
            return None
        adv_view = next(v for v in self.views if VIEWS[v][1])
        with torch.no_grad():
            f_clean = self.model.encoder(inputs[VIEWS[adv_view][0]], CLEAN_BRANCH)
            f_adv = self.model.encoder(advs[0], CLEAN_BRANCH)
        distance = float(F.pairwise_distance(f_clean.float(), f_adv.float()).mean())
        sd = self.stop_degrees(epoch, distance, f_clean.shape[0])
        out["stop_degree"] = torch.tensor(sd)
        out["feature_distance"] = torch.tensor(distance)
        return sd

    def extra_state(self) -> dict[str, Any]:
        return {"ainfonce_stop_degree": self.stop_degrees.state_dict()} if self.stop_degrees.enabled else {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "ainfonce_stop_degree" in state:
            self.stop_degrees.load_state_dict(state["ainfonce_stop_degree"])
