"""A tiny deterministic training task for the data-parallel tests, run as a script on 1 or N processes.

    python tests/train/ddp_task.py OUT_DIR [--epochs 2] [--precision fp32|fp16cpu] [--bn-devices 0]

No randomness inside a step (the views are the images and their mirror images), so one process
on the whole batch and N processes on its shards train the same thing: a ResNet-18 (width 4,
BatchNorm2d everywhere) with a BatchNorm1d projection head, loss = cross-entropy + NT-Xent of
the two views. Rank 0 writes OUT_DIR/result.pt (history, state dict, run_info) and the loop's
checkpoint and curves in OUT_DIR.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench.config import TrainConfig
from bench.datasets import ImageSet
from bench.losses import nt_xent
from bench.models.resnet import ResNet18
from bench.train import Trainable, fit
from bench.train import distributed
from bench.train.precision import Precision


@dataclass
class TinyConfig(TrainConfig):
    pass


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = ResNet18(width=4)
        d = self.encoder.feature_dim
        self.head = nn.Linear(d, 10)
        self.proj = nn.Sequential(nn.Linear(d, d), nn.BatchNorm1d(d), nn.ReLU(), nn.Linear(d, 8))


class TinyTask(Trainable):
    drop_last = False
    loss = "both"
    dtype = torch.float32

    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg = cfg
        torch.manual_seed(0)
        self.model = TinyModel().to(device)

    def training_step(self, x, y, index, info):
        x = x.to(self.dtype)
        f1, f2 = self.model.encoder(x), self.model.encoder(x.flip(3))
        ce = F.cross_entropy(self.model.head(f1), y)
        contrastive = nt_xent(self.model.proj(f1), self.model.proj(f2), 0.5)
        loss = {"ce": ce, "contrastive": contrastive, "both": ce + 0.5 * contrastive}[self.loss]
        return {"loss": loss, "ce": ce, "contrastive": contrastive}


class CpuFp16(Precision):
    """fp16 autocast and a real GradScaler on the CPU, its loss scale starting where neither run
    overflows (a shard's activation gradients are N times a whole batch's, so at the default 2^16
    the N-process run backs off once more, a step apart from the single-process run)."""

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler("cpu", init_scale=2.0**8)


def tiny_data(n: int = 43) -> ImageSet:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    return ImageSet(x, y, [str(i) for i in range(10)], "tiny")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16cpu"))
    parser.add_argument("--bn-devices", type=int, default=0)
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument("--steps", type=int, default=0, help="steps per epoch (0 = all)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--loss", default="both", choices=("ce", "contrastive", "both"))
    parser.add_argument("--double", action="store_true", help="float64 model and images (comparisons to 1e-9)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: rank r on cuda:r (NCCL)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = torch.device("cuda", distributed.world_from_env().local_rank) if args.device == "cuda" else torch.device("cpu")
    world = distributed.init(device)
    cfg = TinyConfig(epochs=args.epochs, batch_size=16, lr=args.lr, weight_decay=5e-4, bn_devices=args.bn_devices,
                     steps_per_epoch=args.steps, knn_every=0)
    # fp16cpu: the fp16 code path (autocast + GradScaler) on the CPU's fp16 kernels, which
    # `train.precision=fp16` refuses there (not the GPU numerics); here it tests the loop's handling
    precision = CpuFp16("fp16", "fp16", "cpu", "float16", False, True) if args.precision == "fp16cpu" else None
    task = TinyTask(cfg, device)
    task.loss = args.loss
    if args.double:
        task.model.double()
        task.dtype = torch.float64
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = tiny_data()
    data = ImageSet(data.x.to(device), data.y.to(device), data.classes, data.name)
    history = fit(task, data, seed=3, workdir=out, precision=precision, stop_after_epoch=args.stop_after)
    if world.main:
        torch.save({"history": history, "state": task.model.state_dict(), "run_info": task.run_info},
                   out / "result.pt")
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
