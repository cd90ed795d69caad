"""Measured speed-up of RCS coreset selection over full-data training of the same method.

    python benchmarks/rcs_speedup.py [--method acl] [--fractions 0.2,0.1] [--width 8] [--n 2048]
                                     [--batch 64] [--threads 1] [--device cpu]

For one method (default `acl`; any ACL-family method works) on `--n` synthetic images:

- t_full: one training epoch on the whole pool (`bench.train.fit`);
- per fraction f: t_select, one RCS selection at the epoch-start model (candidate attacks over
  the pool, validation attacks, greedy head steps; `select.*` defaults otherwise), and t_subset,
  one training epoch on the selected images.

It prints, per fraction, the subset size, the three times, and two speed-ups:
- per epoch after the warm-up, selection included: t_full / (t_subset + t_select / every);
- over the papers' whole schedule (1000 epochs, 100 warm-up, a selection every 20 epochs, so 45
  selections): 1000 t_full / (100 t_full + 900 t_subset + 45 t_select), from the measured times.
The spec's estimate from operation counts is 3.1x (f = 0.2) and 4.4x (f = 0.1) for CIFAR-10 at
width 64 and batch 512 (air_rcs.md B.4); at this CPU-friendly size the validation set (1% of the
pool) and per-batch overheads weigh differently. On CPU the times are process CPU time (with one
thread, robust to other work on a shared machine); on CUDA, wall time.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from bench.config import EncoderConfig, SelectConfig, from_dict
from bench.datasets import load
from bench.datasets.synthetic import Synthetic
from bench.method import MethodContext
from bench.registry import METHODS
from bench.selection import RCSSelector
from bench.train import fit

EPOCHS, WARMUP, EVERY = 1000, 100, 20


def build(name: str, width: int, batch: int, device: torch.device):
    cls = METHODS.get(name)
    cfg = from_dict(cls.Config, {"batch_size": batch, "epochs": EPOCHS, "warmup_epochs": 0}, name)
    torch.manual_seed(0)
    return cls(cfg, MethodContext(EncoderConfig(width=width), 10, device, {}))


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def epoch_seconds(method, data, device) -> float:
    method.cfg.epochs = 1  # one epoch of fit: the loop's real per-epoch work (views, attack, step)
    started = clock(device)
    fit(method, data, seed=0)
    seconds = clock(device) - started
    method.cfg.epochs = EPOCHS
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="acl")
    parser.add_argument("--fractions", default="0.2,0.1")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    console = Console(width=120)
    pool = load("synthetic", "train", cfg=Synthetic.Config(n_train=args.n, n_test=8), val_size=0, device=device)
    method = build(args.method, args.width, args.batch, device)
    epoch_seconds(method, pool.first(2 * args.batch), device)  # one-time costs (allocator, kernels) first
    t_full = epoch_seconds(method, pool, device)
    table = Table(title=f"RCS vs full-data {args.method}: width {args.width}, {args.n} images, batch {args.batch}, "
                        f"{args.device}, {torch.get_num_threads()} thread(s), {'wall' if device.type == 'cuda' else 'CPU'} seconds")
    for column in ("fraction", "images", "t_full s", "t_select s", "t_subset s", "speed-up/epoch",
                   "speed-up/1000 ep"):
        table.add_column(column, justify="right")
    for fraction in (float(f) for f in args.fractions.split(",")):
        selector = RCSSelector(SelectConfig(method="rcs", fraction=fraction, warmup=0, every=EVERY), seed=0,
                               batch=args.batch)
        started = clock(device)
        chosen = selector.select(method, WARMUP, pool)
        t_select = clock(device) - started
        t_subset = epoch_seconds(method, pool.subset(chosen.to(device)), device)
        per_epoch = t_full / (t_subset + t_select / EVERY)
        selections = len(range(WARMUP, EPOCHS, EVERY))
        schedule = EPOCHS * t_full / (WARMUP * t_full + (EPOCHS - WARMUP) * t_subset + selections * t_select)
        table.add_row(f"{fraction:g}", str(len(chosen)), f"{t_full:.1f}", f"{t_select:.1f}", f"{t_subset:.1f}",
                      f"{per_epoch:.2f}x", f"{schedule:.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()
