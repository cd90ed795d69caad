"""Figures of the analyses (PNG + PDF, matplotlib/seaborn on Agg): paper Figures 5 and 6.

Both take plain data records, one dict per analysed model, exactly what an analysis job stores
(`bench.analysis.inversion.Inversion.to_record()`, `bench.analysis.landscape.Landscape.to_record()`)
plus the identity of the model it analysed:

    common keys   "method" (required), "label" (display name; default the method's), "source",
                  "target", "seed" (the lowest seed of a method/label is drawn)

`fim_figures(entries, folder)`, Figure 5, each entry also has

    "seeds", "images"   the seed images and their inversions: [n, H, W, 3] uint8 (as stored) or
                        floats in [0, 1]; [n, 3, H, W] is accepted too
    "values"            [steps + 1][n]: the coordinate after each step (optional: shown below each image)
    "coordinate", "direction" ("max" | "min")

One figure per (dataset pair, coordinate, direction): rows = seed images, column 1 the seed images
(those of the first entry; a note says so if others differ), then a column per method.

`landscape_figures(entries, folder)`, Figure 6, each entry also has "finetuner" (default "slf") and

    "alphas", "loss"    the 1-D curve: loss[j] at alphas[j]
    "surface"           None or {"alphas": [nx], "betas": [ny], "loss": [ny][nx]}: loss[i][j] at
                        (alphas[j], betas[i])

Per (dataset pair, finetuner): `fig6_landscape_1d_*` (every method's curve on one axis) and
`fig6_landscape_2d_*` (a contour per method, shared levels and color bar).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from bench.report import paper
from bench.report.figures import Figure, method_palette, plt_setup, save, slug

log = logging.getLogger(__name__)
Entry = dict[str, Any]
LINESTYLES = ("-", "--", ":", "-.")


def _label(e: Entry) -> str:
    return e.get("label") or paper.method_label(e["method"])


def _ordered(entries: Iterable[Entry]) -> list[Entry]:
    """One entry per (method, label), the lowest seed; in the paper's method order."""
    kept: dict[tuple[str, str], Entry] = {}
    for e in entries:
        key = (e["method"], _label(e))
        if key not in kept or (e.get("seed") or 0) < (kept[key].get("seed") or 0):
            kept[key] = e
    order = paper.order_methods(m for m, _ in kept)
    return [kept[k] for k in sorted(kept, key=lambda k: (order.index(k[0]), k[1]))]


def _group(entries: Iterable[Entry], *fields: str) -> dict[tuple, list[Entry]]:
    out: dict[tuple, list[Entry]] = {}
    for e in entries:
        out.setdefault(tuple(e.get(f) for f in fields), []).append(e)
    return out


def _pair_text(source: str | None, target: str | None) -> str:
    return paper.pair_label(source, target) if (source or target) else ""


def as_hwc_float(images: Any) -> np.ndarray:
    """[n, H, W, 3] floats in [0, 1] from uint8 or float images, channels last or first."""
    a = np.asarray(images)
    if a.ndim != 4:
        raise ValueError(f"images must be [n, H, W, 3] or [n, 3, H, W], got shape {a.shape}")
    if a.shape[-1] != 3 and a.shape[1] == 3:
        a = a.transpose(0, 2, 3, 1)
    a = a.astype(np.float32) / 255.0 if np.issubdtype(a.dtype, np.integer) else a.astype(np.float32)
    return np.clip(a, 0.0, 1.0)


# ---------------------------------------------------------------- Figure 5: feature inversion maps


def direction_text(direction: str) -> str:
    if direction == "min":
        return ("minimising [f(x0 + δ)]_i, the paper's formula as written (Engstrom et al. and Mahendran & "
                "Vedaldi maximise)")
    return ("maximising [f(x0 + δ)]_i, as Engstrom et al. do (the paper's formula writes a minimisation)")


def fim_figures(entries: list[Entry], folder: Path) -> list[Figure]:
    plt, _ = plt_setup()
    out = []
    groups = _group(entries, "source", "target", "coordinate", "direction")
    per_pair = _group(entries, "source", "target")
    for (source, target, coordinate, direction), group in groups.items():
        group = _ordered(group)
        seeds = as_hwc_float(group[0]["seeds"])
        n = len(seeds)
        differ = [_label(e) for e in group[1:] if as_hwc_float(e["seeds"]).shape != seeds.shape
                  or not np.allclose(as_hwc_float(e["seeds"]), seeds, atol=1 / 255)]
        cols = 1 + len(group)
        fig, axes = plt.subplots(n, cols, figsize=(1.45 * cols + 0.4, 1.55 * n + 0.7), squeeze=False)
        for col in range(cols):
            for row in range(n):
                ax = axes[row][col]
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
                if col == 0:
                    ax.imshow(seeds[row], interpolation="nearest")
                    if row == 0:
                        ax.set_title("seed x0", fontsize=9)
                    continue
                e = group[col - 1]
                images = as_hwc_float(e["images"])
                if row < len(images):
                    ax.imshow(images[row], interpolation="nearest")
                values = e.get("values")
                if values is not None and len(values) and row < len(values[0]):
                    ax.set_xlabel(f"{values[0][row]:.2g} → {values[-1][row]:.2g}", fontsize=7)
                if row == 0:
                    ax.set_title(_label(e), fontsize=9)
        pair = _pair_text(source, target)
        title = f"Feature inversion maps of neuron {coordinate}" + (f" — {pair}" if pair else "")
        fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        caption = (f"Feature inversion maps (paper Figure 5) of representation coordinate i = {coordinate}"
                   + (f" on {pair}" if pair else "") + f": x0 + δ {direction_text(direction)}, by projected "
                   "gradient steps on δ through each eval-mode encoder. Rows: seed images; column 1: the seeds x0; "
                   "then one column per pretraining method. Below each map: the coordinate at x0 → at x0 + δ.")
        if differ:
            caption += f" Column 1 shows {_label(group[0])}'s seed images; those of {', '.join(differ)} differ."
        parts = ["fig5_fim", source or "", target or ""]
        if len(_group(per_pair[(source, target)], "coordinate", "direction")) > 1:
            parts += [f"i{coordinate}", str(direction)]
        out.append(save(fig, folder, slug(*parts), title, caption))
    return out


# ---------------------------------------------------------------- Figure 6: adversarial loss landscape


def _styles(sns, group: list[Entry]) -> dict[str, tuple[Any, str]]:
    palette = method_palette(sns, list(dict.fromkeys(e["method"] for e in group)))
    seen: dict[str, int] = {}
    out = {}
    for e in group:
        k = seen.get(e["method"], 0)
        seen[e["method"]] = k + 1
        out[_label(e)] = (palette[e["method"]], LINESTYLES[k % len(LINESTYLES)])
    return out


def _attack_text(group: list[Entry]) -> str:
    e = next((e for e in group if e.get("settings")), None)
    if e is None:
        return "PGD"
    s = e["settings"]
    return (f"PGD-{s.get('steps')}, ε = {s.get('eps_255'):g}/255, n = {e.get('n_images') or s.get('n')} images, "
            f"directions and random starts seeded {s.get('seed')}")


def landscape_figures(entries: list[Entry], folder: Path) -> list[Figure]:
    plt, sns = plt_setup()
    out = []
    for (source, target, ft), group in _group(entries, "source", "target", "finetuner").items():
        group = _ordered(group)
        ft = ft or "slf"
        styles = _styles(sns, group)
        pair = _pair_text(source, target)
        where = ", ".join(p for p in (pair, paper.finetuner_label(ft)) if p)
        attack = _attack_text(group)

        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for e in group:
            color, style = styles[_label(e)]
            ax.plot(e["alphas"], e["loss"], color=color, linestyle=style, marker="o", markersize=3, label=_label(e))
        ax.set_yscale("log")  # the loss grows by orders of magnitude away from the minimum
        ax.set_xlabel("α (direction 1, filter-normalised)")
        ax.set_ylabel("adversarial loss (CE, log scale)")
        ax.legend(title="pretraining", loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
        title = f"Adversarial loss along a random direction — {where}"
        ax.set_title(title, fontsize=11)
        fig.tight_layout()
        caption = (f"Adversarial loss landscape (paper Figure 6, after Li et al. 2018) of each {paper.finetuner_label(ft)} "
                   f"classifier{' on ' + pair if pair else ''}: the cross-entropy on PGD examples crafted against the "
                   f"model at θ + α d ({attack}), d a random direction in weight space, filter-normalised (each "
                   "filter scaled to the norm of the weights' filter; biases and BatchNorm parameters not moved). "
                   "Log scale; flatter is better.")
        out.append(save(fig, folder, slug("fig6_landscape_1d", source or "", target or "", ft), title, caption))

        surfaced = [e for e in group if e.get("surface")]
        if not surfaced:
            continue
        from matplotlib.colors import LogNorm

        values = np.concatenate([np.asarray(e["surface"]["loss"], dtype=np.float64).ravel() for e in surfaced])
        values = values[np.isfinite(values)]
        lo, hi = max(float(values.min()), 1e-4), max(float(values.max()), 1e-4)
        levels = np.geomspace(lo, hi if hi > lo * 1.001 else lo * 1.001, 16)  # log levels, shared by every panel
        cols = min(len(surfaced), 3)
        rows = -(-len(surfaced) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 1.2, 3.3 * rows + 0.6), squeeze=False,
                                 layout="constrained")
        filled = None
        for k, ax in enumerate(axes.ravel()):
            if k >= len(surfaced):
                ax.set_visible(False)
                continue
            e = surfaced[k]
            s = e["surface"]
            z = np.asarray(s["loss"], dtype=np.float64)
            if z.shape[0] >= 2 and z.shape[1] >= 2:
                z = np.clip(z, lo, hi)
                filled = ax.contourf(s["alphas"], s["betas"], z, levels=levels, cmap="viridis", norm=LogNorm(lo, hi))
                lines = ax.contour(s["alphas"], s["betas"], z, levels=levels[::3], colors="white", linewidths=0.6)
                ax.clabel(lines, fontsize=6, fmt="%.2g")
            else:
                ax.text(0.5, 0.5, "grid too small", ha="center", va="center", transform=ax.transAxes)
            ax.plot([0], [0], marker="+", color="white", markersize=8)  # the trained weights
            ax.set_title(_label(e), fontsize=10)
            ax.set_xlabel("α")
            ax.set_ylabel("β")
            ax.grid(False)
        if filled is not None:
            bar = fig.colorbar(filled, ax=axes.ravel().tolist(), label="adversarial loss (CE, log scale)")
            bar.minorticks_off()
            bar.set_ticks(levels[::3], labels=[f"{v:.3g}" for v in levels[::3]])
        title = f"Adversarial loss surface — {where}"
        fig.suptitle(title, fontsize=11)
        caption = (f"Adversarial loss (CE on PGD examples crafted at each point; {attack}) over θ + α d1 + β d2, "
                   "two filter-normalised random directions (paper Figure 6, Li et al. 2018), one panel per "
                   f"pretraining method{' on ' + pair if pair else ''} after {paper.finetuner_label(ft)}; shared "
                   "contour levels and color bar (log scale). Flatter around the origin is better.")
        out.append(save(fig, folder, slug("fig6_landscape_2d", source or "", target or "", ft), title, caption))
    return out


# ---------------------------------------------------------------- from a results folder


def analysis_entries(results: Any, kind: str) -> tuple[list[Entry], list[str]]:
    """The entries of every done `kind` job ("fim", "landscape") of a `bench.report.collect.Results`,
    each named by its report row (`method[label]` for one of a method's several configurations),
    and notes for records whose artifacts cannot be read."""
    from bench.errors import BenchError
    from bench.report.variants import split_setups
    from bench.stages.base import get_stage

    stage = get_stage(kind)
    groups: dict[tuple, list[Any]] = {}
    for r in results.others.get(kind, []):
        groups.setdefault((r.method, r.finetuner, r.source, r.target), []).append(r)
    entries, notes = [], []
    for rs in groups.values():
        for setup in split_setups(rs, results.records):
            for r in setup.records:
                try:
                    entry = stage.figure_entry(results.store.job(r.key), r)
                except (BenchError, OSError, ValueError, KeyError) as exc:
                    notes.append(f"{kind} job {r.key}: its results cannot be read ({type(exc).__name__}: {exc})")
                    continue
                entries.append({**entry, "method": paper.row_name(r.method or "?", setup.label)})
    return entries, notes

