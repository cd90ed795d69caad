"""Training curves of a job, written as it trains: one row per epoch.

- `<job dir>/history.csv`: every per-epoch metric (the step metrics' epoch means, e.g. the loss
  and its terms, the learning rate, throughput, the online k-NN accuracy, the selection size),
  rewritten whole from the run's history at each epoch end, so a resumed run still has exactly
  one row per epoch;
- `<job dir>/tensorboard/`: TensorBoard event files (`torch.utils.tensorboard`, tag
  `epoch/<metric>`, step = epoch); a resumed run purges the events of epochs it trains again;
- Weights & Biases (`bench run --logger wandb`, which sets `BENCH_LOGGERS=wandb` for the workers;
  needs `pip install 'bench[wandb]'`): one run per job, named and resumed by the job key,
  offline unless WANDB_MODE says otherwise.

Only process 0 of a data-parallel job writes them. Nothing here is an artifact of the job: the
curves are also in its record's `history`.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from bench import files

log = logging.getLogger(__name__)

HISTORY_CSV = "history.csv"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
LOGGERS_ENV = "BENCH_LOGGERS"
LOGGERS = ("wandb",)  # besides the CSV and TensorBoard files, which every training job writes


def requested_loggers() -> list[str]:
    return [name.strip() for name in os.environ.get(LOGGERS_ENV, "").split(",") if name.strip()]


def numeric(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def history_csv(history: list[dict[str, Any]]) -> str:
    """The history as CSV text: `epoch` first, then every other column in order of first appearance."""
    columns = ["epoch"]
    for row in history:
        columns += [k for k in row if k not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for i, row in enumerate(history):
        writer.writerow({"epoch": i + 1, **{k: v for k, v in row.items() if not isinstance(v, (dict, list))}})
    return out.getvalue()


def read_history_csv(path: Path) -> list[dict[str, float]]:
    """A history.csv back as rows of numbers (what `bench show` prints for a running job)."""
    rows = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            parsed = {}
            for k, v in row.items():
                try:
                    parsed[k] = float(v)
                except (TypeError, ValueError):
                    continue
            rows.append(parsed)
    return rows


def _wait_past_newest_event_file(folder: Path) -> None:
    """TensorBoard reads a folder's event files in name order, and a name starts with the second it
    was created in, then a per-process counter compared as text ("10" < "9"). A resumed run's file
    made in the same second as the earlier one could sort first and be read before it (its purge
    then drops the wrong epochs), so start the new file in a later second."""
    fields = [p.name.split(".") for p in folder.glob("events.out.tfevents.*")]
    stamps = [int(f[3]) for f in fields if len(f) > 3 and f[3].isdigit()]
    while stamps and int(time.time()) <= max(stamps):
        time.sleep(0.05)


class EpochLog:
    """The writers of one training run in `workdir`; `write(history)` after each epoch."""

    def __init__(self, workdir: Path, start_epoch: int, config: dict[str, Any] | None = None):
        self.workdir = Path(workdir)
        self.tensorboard = self._tensorboard(start_epoch)
        self.wandb = self._wandb(config) if "wandb" in requested_loggers() else None
        self.logged = start_epoch

    def _tensorboard(self, start_epoch: int) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # tensorboard is a dependency; a broken install only loses the events
            log.warning("no TensorBoard events (%s): pip install tensorboard", exc)
            return None
        folder = self.workdir / TENSORBOARD_DIR
        _wait_past_newest_event_file(folder)
        return SummaryWriter(str(folder), purge_step=start_epoch + 1 if start_epoch else None)

    def _wandb(self, config: dict[str, Any] | None) -> Any:
        try:
            import wandb
        except ImportError:
            log.warning("--logger wandb: wandb is not installed (pip install 'bench[wandb]'); not logging to it")
            return None
        os.environ.setdefault("WANDB_MODE", "offline")
        (self.workdir / WANDB_DIR).mkdir(parents=True, exist_ok=True)
        return wandb.init(project=os.environ.get("WANDB_PROJECT", "bench"), name=self.workdir.name,
                          id=self.workdir.name[-64:], resume="allow", dir=str(self.workdir / WANDB_DIR),
                          config=config or {}, reinit=True)

    def write(self, history: list[dict[str, Any]]) -> None:
        files.write_quick(self.workdir / HISTORY_CSV, history_csv(history))
        for epoch in range(self.logged + 1, len(history) + 1):
            values = numeric(history[epoch - 1])
            values.pop("epoch", None)
            if self.tensorboard is not None:
                for name, value in values.items():
                    self.tensorboard.add_scalar(f"epoch/{name}", value, epoch)
            if self.wandb is not None:
                self.wandb.log(values, step=epoch)
        self.logged = len(history)
        if self.tensorboard is not None:
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
