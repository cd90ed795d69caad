"""Training curves: history.csv and TensorBoard events per epoch, the online k-NN monitor,
`bench show`'s curve table, the report's training-curve figure, and the W&B logger."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.train import fit
from bench.train.logbook import HISTORY_CSV, TENSORBOARD_DIR, read_history_csv

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_task import TinyConfig, TinyTask, tiny_data  # noqa: E402
from helpers import TINY  # noqa: E402

SMOKE = [s for s in TINY if not s.startswith("pretrain.epochs")] + ["pretrain.epochs=3", "pretrain.knn_every=1",
                                                                    "pretrain.knn_images=40"]


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def smoke_pretraining(tmp_path_factory):
    pytest.importorskip("tensorboard", reason="TensorBoard event files need the tensorboard package")
    results = tmp_path_factory.mktemp("curves") / "results"
    run = subprocess.run([sys.executable, "-m", "bench", "run", "--methods", "simclr", "--datasets", "synthetic",
                          "--stages", "", "--results", str(results), *SMOKE], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (job,) = results.glob("pretrain-*")
    return results, job


def test_a_pretraining_writes_its_curves_as_csv_and_tensorboard_one_row_per_epoch(smoke_pretraining):
    results, job = smoke_pretraining
    rows = read_history_csv(job / HISTORY_CSV)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert {"loss", "lr", "images_per_s", "epoch_seconds", "knn_accuracy"} <= set(row)
        assert 0.0 <= row["knn_accuracy"] <= 1.0
    scalars = tensorboard_scalars(job / TENSORBOARD_DIR)
    assert [step for step, _ in scalars["epoch/loss"]] == [1, 2, 3]
    assert [v for _, v in scalars["epoch/loss"]] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert len(scalars["epoch/knn_accuracy"]) == 3
    from bench.store import Store

    record = Store(results).read(job.name)
    assert [h["knn_accuracy"] for h in record.history] == [r["knn_accuracy"] for r in rows]
    assert record.metrics["training"]["world_size"] == 1


def test_bench_show_prints_the_training_curve(smoke_pretraining):
    results, job = smoke_pretraining
    out = subprocess.run([sys.executable, "-m", "bench", "show", "--results", str(results), job.name],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "training curve" in text and "knn_accuracy" in text and "loss" in text
    table = text[text.index("training curve"):]
    assert [line.split()[1] for line in table.splitlines() if line.startswith("│")] == ["1", "2", "3"]


def test_the_reports_training_curve_figure_renders(smoke_pretraining, tmp_path):
    from bench.report.collect import load_results
    from bench.report.curves import curve_figures, panels_of
    from bench.store import Store

    results, job = smoke_pretraining
    (figure,) = curve_figures(load_results(results), tmp_path)
    assert figure.png.stat().st_size > 5000 and figure.pdf.is_file() and "SimCLR" in figure.title
    assert panels_of(Store(results).records("pretrain")) == ["loss", "knn_accuracy", "lr"]


def test_a_resumed_run_still_has_one_curve_row_per_epoch(tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard event files need the tensorboard package")
    cfg = TinyConfig(epochs=3, batch_size=16, steps_per_epoch=1, knn_every=0)
    # Event file names end in a per-process counter compared as text: number the first run's file 9
    # and the resumed run's 10, the order a resume within the same second used to read backwards.
    from tensorboard.summary.writer import event_file_writer
    event_file_writer._global_uid._value = 9
    fit(TinyTask(cfg, torch.device("cpu")), tiny_data(), seed=0, workdir=tmp_path, stop_after_epoch=2)
    history = fit(TinyTask(cfg, torch.device("cpu")), tiny_data(), seed=0, workdir=tmp_path)
    rows = read_history_csv(tmp_path / HISTORY_CSV)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and [r["loss"] for r in rows] == [h["loss"] for h in history]
    assert all("images_per_s" in r for r in rows) and "images_per_s" not in history[0]  # timings: curves only
    assert [s for s, _ in tensorboard_scalars(tmp_path / TENSORBOARD_DIR)["epoch/loss"]] == [1, 2, 3]


def test_the_wandb_logger_writes_an_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="--logger wandb needs the wandb package (pip install 'bench[wandb]')")
    monkeypatch.setenv("BENCH_LOGGERS", "wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = TinyConfig(epochs=2, batch_size=16, steps_per_epoch=1, knn_every=0)
    fit(TinyTask(cfg, torch.device("cpu")), tiny_data(), seed=0, workdir=tmp_path)
    assert list((tmp_path / "wandb").rglob("*.wandb"))


def test_an_unknown_logger_is_bad_input(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench", "run", "--methods", "simclr", "--datasets", "synthetic",
                          "--logger", "mlflow", "--results", str(tmp_path / "r"), *TINY],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--logger mlflow" in out.stderr and not (tmp_path / "r").exists()
