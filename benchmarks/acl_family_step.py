"""CPU cost of one training step of the ACL family, relative to ACL's, robust to a busy machine.

    python benchmarks/acl_family_step.py [--methods acl,dynacl,acl_air,dynacl_air] [--width 8]
                                         [--batch 32] [--rounds 7] [--threads 1]

`bench profile` reports wall time, which other work on a shared machine inflates. This script
times the same step (views, attack, loss, backward, optimizer step, as `bench.train.fit` runs
it) in process CPU time with one thread, alternating the methods round by round, and prints
the best and median CPU seconds per step and the ratio of the best to ACL's best.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from bench.config import EncoderConfig, from_dict
from bench.datasets import load
from bench.datasets.synthetic import Synthetic
from bench.method import MethodContext
from bench.registry import METHODS
from bench.train import StepInfo, build_optimizer


def stepper(name: str, width: int, batch: int, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor):
    cls = METHODS.get(name)
    torch.manual_seed(0)
    method = cls(from_dict(cls.Config, {"batch_size": batch, "amp": False}, name),
                 MethodContext(EncoderConfig(width=width), 10, torch.device("cpu"), {}))
    optimizer = build_optimizer(method.trainable_parameters(), method.cfg)
    lr = method.lr_at(0, 0, 1)
    for group in optimizer.param_groups:
        group["lr"] = lr
    method.train_mode()

    def step(i: int) -> None:
        out = method.training_step(x, y, index, StepInfo(0, i, i, 1000, lr))
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="acl,dynacl,acl_air,dynacl_air")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.methods.split(",")
    data = load("synthetic", "train", cfg=Synthetic.Config(n_train=args.batch, n_test=4), val_size=0)
    x, y, index = data.images(slice(None)), data.y, data.indices
    steps = {name: stepper(name, args.width, args.batch, x, y, index) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        steps[name](0)  # warm-up
    for r in range(args.rounds):
        for name in names:
            started = time.process_time()
            steps[name](r + 1)
            times[name].append(time.process_time() - started)
    base = min(times[names[0]])
    table = Table(title=f"CPU s/step, width {args.width}, batch {args.batch}, {args.threads} thread(s), "
                        f"{args.rounds} rounds")
    for column in ("method", "best", "median", f"best / {names[0]}"):
        table.add_column(column, justify="right")
    for name in names:
        table.add_row(name, f"{min(times[name]):.3f}", f"{statistics.median(times[name]):.3f}",
                      f"{min(times[name]) / base:.2f}")
    Console(width=100).print(table)


if __name__ == "__main__":
    main()
