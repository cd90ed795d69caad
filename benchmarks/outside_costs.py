"""What bench.api.evaluate's measurements cost per image on this machine (the figures quoted in
docs/outside-models.md): clean accuracy, PGD-20 (L-inf and L2) and AutoAttack on a width-64
ResNet-18 classifier, and generating the 15 common corruptions of one CIFAR image.

    PYTHONPATH=. python benchmarks/outside_costs.py [--n 16] [--threads 2] [--aa]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench.attacks.accuracy import clean_correct, pgd_correct, tensor_batches
from bench.models import Classifier, ResNet18


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--aa", action="store_true", help="also time standard AutoAttack (slow on a CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = Classifier(ResNet18(width=64), 10).to(device).eval()
    x = torch.rand(args.n, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.n,), device=device)
    batches = tensor_batches(x, y, 250)
    rows = {"clean": timed(lambda: clean_correct(model, batches))}
    for norm, eps, alpha in (("Linf", 8 / 255, 2 / 255), ("L2", 0.5, 0.125)):
        rows[f"PGD-20 {norm}"] = timed(lambda: pgd_correct(model, batches, eps=eps, alpha=alpha, steps=20, seed=0,
                                                          norm=norm))
    if args.aa:
        from bench.attacks.autoattack import run_autoattack

        rows["AutoAttack standard Linf"] = timed(lambda: run_autoattack(model, x, y, eps=8 / 255, num_classes=10,
                                                                        seed=0))
    for name, seconds in rows.items():
        print(f"{name:28s} {1000 * seconds / args.n:9.1f} ms/image  ({device}, {args.threads} threads)")
    try:
        from bench.corruptions import CORRUPTIONS, generate
    except ImportError:
        return
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 3, 32, 32)).astype(np.uint8))
    generate(image, "glass_blur", 1)  # numba compiles once per process
    seconds = timed(lambda: [generate(image, c, s) for c in CORRUPTIONS for s in range(1, 6)])
    print(f"{'75 corruptions, 1 image':28s} {1000 * seconds:9.1f} ms  (CPU, imagecorruptions)")


if __name__ == "__main__":
    main()
