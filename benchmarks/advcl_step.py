"""AdvCL training step: our schedule against the straightforward per-view one.

    python benchmarks/advcl_step.py [--width 4] [--batch 128] [--repeats 5] [--threads 1] [--device cpu]

Both schedules compute the same math on the same weights, views and random starts:

- naive (`benchmarks/advcl_reference.py`, what the official code does): every view — the adversarial
  ones and the fixed tau1, tau2, HFC — forwarded at every attack step, and all of them again
  for the loss: attack 5 x (5 forwards + 2 input-gradient backwards) + 5 forwards + backward;
- ours (`AdvCL.step`): the fixed views forwarded once (graph kept for the loss, detached copies
  for the attack): 3 forwards + attack 5 x (2 forwards + 2 input backwards) + 2 forwards + backward,
  with the weights frozen during the attack (no weight-gradient work in its backwards).

The script first checks that both give the same loss, the same gradient for every parameter
and the same BatchNorm running statistics (allclose), then times step + backward, alternating
the two schedules, and reports the best and median wall time and the best process CPU time of
each, and the speed ratios (target >= 1.4x on CPU for the smoke model at batch 128). Other work
on the machine inflates single runs, so the best times are the figure to compare. Exit code 1
if the two schedules disagree.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.table import Table

from bench.config import EncoderConfig, from_dict
from bench.datasets import load
from bench.datasets.synthetic import Synthetic
from bench.method import MethodContext
from bench.models import bn_state
from methods.advcl import TABLE4_VIEWS, AdvCL

sys.path.insert(0, str(Path(__file__).resolve().parent))
from advcl_reference import naive_step  # noqa: E402


def build(width: int, batch: int, device: torch.device, views: tuple[str, ...], attack_steps: int,
          pseudo_labels: str, seed: int) -> tuple[AdvCL, dict[str, torch.Tensor], torch.Tensor]:
    """The method (fresh weights), one batch's clean views and its source indices, all fixed."""
    data = load("synthetic", "train", cfg=Synthetic.Config(n_train=max(2 * batch, 64), n_test=8), val_size=0,
                device=device)
    cfg = from_dict(AdvCL.Config, {"batch_size": batch, "views": list(views), "attack_steps": attack_steps,
                                   "pseudo_labels": pseudo_labels}, "advcl")
    size = int(data.indices.max()) + 1
    generator = torch.Generator().manual_seed(seed)
    labels = {k: torch.randint(k, (size,), generator=generator).to(device) for k in cfg.cluster_ks}
    ctx = MethodContext(EncoderConfig(width=width), data.num_classes, device, {"pseudo_labels": labels})
    torch.manual_seed(seed)
    method = AdvCL(cfg, ctx)
    method.train_mode()
    x, index = data.images(slice(0, batch)), data.indices[:batch]
    torch.manual_seed(seed + 1)
    inputs = method.make_inputs(x)
    return method, inputs, index


def run_once(method: AdvCL, schedule: Callable, inputs, index, state: dict[str, torch.Tensor],
             seed: int) -> tuple[tuple[float, float], dict[str, Any]]:
    """Restore `state`, run schedule + backward with the random starts seeded.

    Returns ((wall seconds, process CPU seconds), results).
    """
    method.model.load_state_dict(state)
    method.model.zero_grad(set_to_none=True)
    device = next(method.model.parameters()).device
    torch.manual_seed(seed)
    sync(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    out = schedule(method, inputs, index)
    out["loss"].backward()
    sync(device)
    seconds = (time.perf_counter() - started, time.process_time() - cpu_started)
    grads = {n: p.grad.detach().clone() for n, p in method.model.named_parameters() if p.grad is not None}
    return seconds, {"loss": out["loss"].detach(), "grads": grads, "bn": bn_state(method.model)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ours(method: AdvCL, inputs, index):
    return method.step(inputs, index)


def compare(a: dict[str, Any], b: dict[str, Any], rtol: float, atol: float) -> dict[str, Any]:
    """Largest differences between two runs and whether everything is allclose."""
    loss_ok = torch.allclose(a["loss"], b["loss"], rtol=rtol, atol=atol)
    ga, gb = a["grads"], b["grads"]
    same_params = set(ga) == set(gb)
    grad_diff = max((ga[k] - gb[k]).abs().max().item() for k in ga) if same_params else float("inf")
    grads_ok = same_params and all(torch.allclose(ga[k], gb[k], rtol=rtol, atol=atol) for k in ga)
    bn_diff = max((a["bn"][k].double() - b["bn"][k].double()).abs().max().item() for k in a["bn"])
    bn_ok = all(torch.allclose(a["bn"][k].double(), b["bn"][k].double(), rtol=rtol, atol=atol) for k in a["bn"])
    return {"loss": (float(a["loss"]), float(b["loss"])), "grad_diff": grad_diff, "bn_diff": bn_diff,
            "ok": loss_ok and grads_ok and bn_ok, "loss_ok": loss_ok, "grads_ok": grads_ok, "bn_ok": bn_ok}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=4, help="encoder width (4 = the smoke preset's, 64 = the paper's ResNet-18)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each schedule")
    parser.add_argument("--attack-steps", type=int, default=5)
    parser.add_argument("--row", type=int, default=7, choices=sorted(TABLE4_VIEWS), help="Table 4 view set")
    parser.add_argument("--pseudo-labels", default="simclr", help="'none' drops the CE term and its attack")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    device = torch.device(args.device)
    method, inputs, index = build(args.width, args.batch, device, TABLE4_VIEWS[args.row], args.attack_steps,
                                  args.pseudo_labels, args.seed)
    state = copy.deepcopy(method.model.state_dict())
    console.print(f"AdvCL step: width {args.width}, batch {args.batch}, views {list(method.views)}, "
                  f"{args.attack_steps} attack steps, CE {'on' if method.uses_ce else 'off'}, "
                  f"{device} ({torch.get_num_threads()} threads)")

    # same weights, views and random starts: same loss, gradients and BN statistics
    _, a = run_once(method, ours, inputs, index, state, args.seed)
    _, b = run_once(method, naive_step, inputs, index, state, args.seed)
    check = compare(a, b, rtol=1e-4, atol=1e-5)
    console.print(f"loss ours {check['loss'][0]:.6f} naive {check['loss'][1]:.6f}; max |grad diff| "
                  f"{check['grad_diff']:.2e}; max |BN stat diff| {check['bn_diff']:.2e} -> "
                  + ("[green]equal (allclose)[/green]" if check["ok"] else "[red]DIFFERENT[/red]"))

    wall: dict[str, list[float]] = {"ours": [], "naive": []}
    cpu: dict[str, list[float]] = {"ours": [], "naive": []}
    schedules = {"ours": ours, "naive": naive_step}
    for r in range(args.repeats):  # alternate the order so drift hits both alike
        for name in (("ours", "naive") if r % 2 == 0 else ("naive", "ours")):
            (seconds, cpu_seconds), _ = run_once(method, schedules[name], inputs, index, state, args.seed)
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
    table = Table(title="AdvCL step + backward (seconds)")
    for col in ("schedule", "wall best", "wall median", "CPU best", "wall, every run"):
        table.add_column(col)
    for name in wall:
        table.add_row(name, f"{min(wall[name]):.3f}", f"{statistics.median(wall[name]):.3f}",
                      f"{min(cpu[name]):.3f}", " ".join(f"{t:.2f}" for t in wall[name]))
    console.print(table)
    best = min(wall["naive"]) / min(wall["ours"])
    median = statistics.median(wall["naive"]) / statistics.median(wall["ours"])
    cpu_best = min(cpu["naive"]) / min(cpu["ours"])
    console.print(f"speed-up (naive / ours): wall best {best:.2f}x, wall median {median:.2f}x, "
                  f"CPU time best {cpu_best:.2f}x (target >= 1.4x; on a shared machine trust the best times)")
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
