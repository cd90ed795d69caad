"""Training curves of the pretrainings: one figure per method, from the records' per-epoch history.

Panels: the loss (and its terms, every history metric whose name ends in "loss"), the online
k-NN accuracy of the encoder where the run measured it (`pretrain.knn_every`), and the learning
rate; one line per pretraining (dataset and seed). Pretrainings of the methods the report shows
are drawn (all of them when it shows no evaluation yet).
"""

from __future__ import annotations

import math
from pathlib import Path
from bench.record import Record
from bench.report import paper
from bench.report.collect import Results
from bench.report.figures import Figure, plt_setup, save, slug


def _series(records: list[Record], name: str) -> list[tuple[str, list[int], list[float]]]:
    out = []
    for r in records:
        points = [(int(row.get("epoch", i + 1)), float(row[name])) for i, row in enumerate(r.history)
                  if isinstance(row.get(name), (int, float)) and math.isfinite(float(row[name]))]
        if points:
            label = f"{r.source} s{r.seed}" + (f" {r.variant}" if r.variant else "")
            out.append((label, [p[0] for p in points], [p[1] for p in points]))
    return out


def panels_of(records: list[Record]) -> list[str]:
    """The history metrics drawn: loss terms, then k-NN accuracy, then the learning rate."""
    names: list[str] = []
    for r in records:
        for row in r.history:
            names += [k for k, v in row.items() if k not in names and isinstance(v, (int, float))
                      and not isinstance(v, bool)]
    losses = sorted((k for k in names if k.endswith("loss")), key=lambda k: (k != "loss", k))
    return losses + [k for k in ("knn_accuracy", "lr") if k in names]


def training_curve_figure(method: str, records: list[Record], folder: Path) -> Figure | None:
    """One method's pretraining curves (None when no record has a history)."""
    records = [r for r in records if r.history]
    panels = panels_of(records)
    if not panels:
        return None
    plt, sns = plt_setup()
    from matplotlib.ticker import MaxNLocator

    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, panels):
        for label, epochs, values in _series(records, name):
            ax.plot(epochs, values, marker="o" if len(epochs) < 20 else None, markersize=3, label=label)
        ax.set_title(name.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if name == "knn_accuracy":
            ax.set_ylim(0, 1)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize="small")
    label = paper.method_label(method)
    fig.suptitle(f"{label}: pretraining curves")
    fig.tight_layout()
    n = len(records)
    caption = (f"{label} pretraining, per epoch, {n} run(s): {', '.join(panels)}. k-NN accuracy: weighted "
               "20-NN vote on a fixed labelled subset of the training images (bench.train.knn).")
    return save(fig, folder, slug("curves", method), f"{label}: pretraining curves", caption)


def curve_figures(results: Results, folder: Path) -> list[Figure]:
    """A training-curve figure per pretraining method of the results folder."""
    shown = {paper.split_row(name)[0] for name in results.methods()}  # rows may be variants: advcl[views=4]
    by_method: dict[str, list[Record]] = {}
    for record in results.store.records("pretrain"):
        if record.method and (not shown or record.method in shown):
            by_method.setdefault(record.method, []).append(record)
    figures = []
    for method in paper.order_methods(by_method):
        records = sorted(by_method[method], key=lambda r: (r.source or "", r.seed))
        figure = training_curve_figure(method, records, folder)
        if figure is not None:
            figures.append(figure)
    return figures


__all__ = ["curve_figures", "panels_of", "training_curve_figure"]
