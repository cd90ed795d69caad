"""Report figures (seaborn / matplotlib, written as PNG and PDF).

- `sweep_figures`: RA against eps and against PGD steps, one line per pretraining method, one
  figure per dataset pair and finetuner (the paper's Figure 3 uses SLF). Bands: 95% intervals.
- `scatter_figures`: SA against RA, one panel per finetuner, one color per method, one marker
  shape per finetuner (paper Figure 1); hollow markers are the paper's published values.
  `x_metric="aa"` draws it with AutoAttack on the x axis (the appendix's Figure 1 under AutoAttack),
  the paper's AA values hollow where Tables 1-2 publish them.
- Figures 5 and 6 (feature inversion, loss landscape): `bench.report.analysis_figures`.
- Axis labels name the attack as the records' protocols give it (steps, eps), not the paper's.
- t-SNE of encoder features: `bench.report.tsne`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from bench.report import paper
from bench.report.collect import Aggregate, Results, pct

log = logging.getLogger(__name__)
MARKERS = {"slf": "o", "aff": "D", "alf": "s"}
EXTRA_MARKERS = ("^", "v", "P", "X", "*", "h")


@dataclass
class Figure:
    name: str
    title: str
    caption: str
    png: Path
    pdf: Path


def plt_setup():
    """pyplot on the Agg backend (no display needed), seaborn's theme."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    return plt, sns


def slug(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "_".join(p for p in parts if p)).strip("-")


def save(fig, folder: Path, name: str, title: str, caption: str) -> Figure:
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    png, pdf = folder / f"{name}.png", folder / f"{name}.pdf"
    fig.savefig(png, dpi=130, bbox_inches="tight")
    fig.savefig(pdf, bbox_inches="tight")
    plt.close(fig)
    return Figure(name, title, caption, png, pdf)


# Fixed colors (tab10 positions) so a method keeps its color in every figure and every filtered report;
# AdvCL is red as in the paper's figures.
FIXED_COLORS = {"supervised_at": 0, "rocl": 1, "acl": 2, "advcl": 3, "apdpe": 4, "simclr": 5}


def method_palette(sns, methods: list[str]) -> dict[str, tuple]:
    """A color per row: a method's fixed color; the variant rows of a method (`advcl[views=4]`) get
    shades of their method's color, darker to lighter in row order."""
    tab10 = sns.color_palette("tab10", 10)
    free = [i for i in range(10) if i not in FIXED_COLORS.values()]
    bases = list(dict.fromkeys(paper.split_row(m)[0] for m in methods))
    others = [m for m in bases if m not in FIXED_COLORS]
    extra = sns.color_palette("husl", len(others)) if len(others) > len(free) else [tab10[i] for i in free]
    base_color = {m: tab10[FIXED_COLORS[m]] for m in bases if m in FIXED_COLORS}
    base_color.update({m: extra[i] for i, m in enumerate(others)})
    out = {}
    for base in bases:
        rows = [m for m in methods if paper.split_row(m)[0] == base]
        for k, m in enumerate(rows):
            out[m] = shade(base_color[base], k, len(rows)) if len(rows) > 1 else base_color[base]
    return out


def shade(color: tuple, k: int, n: int) -> tuple:
    """The k-th of n shades of `color` (lightness from 0.3 to 0.75, its hue and saturation kept)."""
    import colorsys

    h, _, s = colorsys.rgb_to_hls(*color[:3])
    return colorsys.hls_to_rgb(h, 0.3 + 0.45 * k / max(n - 1, 1), s)


def marker_for(finetuner: str, finetuners: list[str]) -> str:
    if finetuner in MARKERS:
        return MARKERS[finetuner]
    extra = [f for f in finetuners if f not in MARKERS]
    return EXTRA_MARKERS[extra.index(finetuner) % len(EXTRA_MARKERS)]


# ---------------------------------------------------------------- Figure 3: attack strength


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, (int, float)) else "?"


def attack_label(aggs: list[Aggregate], what: str = "both") -> str:
    """The PGD settings of these aggregates' protocols: "PGD-20, 8/255"; `what` = "steps" or "eps" for one part.
    Distinct settings are all named (joined by " / "), so a mixed figure says so."""
    parts = []
    for a in aggs:
        steps, eps = f"PGD-{_num(a.protocol.get('steps'))}", f"{_num(a.protocol.get('eps_255'))}/255"
        text = {"steps": steps, "eps": f"ε = {eps}", "both": f"{steps}, {eps}"}[what]
        if text not in parts:
            parts.append(text)
    return " / ".join(parts)


def sweep_figures(results: Results, folder: Path) -> list[Figure]:
    import pandas as pd

    plt, sns = plt_setup()
    palette = method_palette(sns, results.methods())
    out = []
    for source, target in results.pairs():
        for ft in results.finetuners():
            cells = [c for c in results.cells.values() if c.pair == (source, target) and c.finetuner == ft
                     and any(c.sweeps.get(axis) for axis in ("eps", "steps"))]
            if not cells:
                continue
            cells.sort(key=lambda c: paper.order_methods(results.methods()).index(c.method))
            rows = []
            for c in cells:
                for axis in ("eps", "steps"):
                    for x, a in c.sweeps.get(axis, []):
                        lo, hi = a.ci95
                        rows.append({"axis": axis, "x": x, "RA (%)": pct(a.mean), "low": pct(lo), "high": pct(hi),
                                     "method": paper.method_label(c.method), "key": c.method, "seeds": a.k})
            df = pd.DataFrame(rows)
            fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
            labels = {paper.method_label(c.method): palette[c.method] for c in cells}
            # what the sweeps held fixed: the steps of the eps axis, the eps of the steps axis
            eps_steps = attack_label([a for c in cells for _, a in c.sweeps.get("eps", [])], "steps")
            steps_eps = attack_label([a for c in cells for _, a in c.sweeps.get("steps", [])], "eps")
            for ax, axis, xlabel in ((axes[0], "eps", f"ε (× 1/255), {eps_steps}"),
                                     (axes[1], "steps", f"PGD steps, {steps_eps}")):
                part = df[df["axis"] == axis] if len(df) else df
                if len(part):
                    sns.lineplot(data=part, x="x", y="RA (%)", hue="method", style="method", markers=True,
                                 dashes=False, palette=labels, ax=ax, errorbar=None, legend=ax is axes[1])
                    alpha = 0.15 if len(labels) <= 3 else 0.06  # many overlapping bands stay readable
                    for method, g in part.groupby("method"):
                        g = g.sort_values("x")
                        ax.fill_between(g["x"], g["low"], g["high"], color=labels[method], alpha=alpha, linewidth=0)
                else:
                    ax.text(0.5, 0.5, "no sweep", ha="center", va="center", transform=ax.transAxes)
                if axis == "steps":
                    ax.set_xscale("log")
                ax.set_xlabel(xlabel)
                ax.set_ylabel("RA (%)")
            if axes[1].get_legend() is not None:
                sns.move_legend(axes[1], "upper left", bbox_to_anchor=(1.02, 1), title="pretraining")
            pair = paper.pair_label(source, target)
            title = f"RA against attack strength — {pair}, {paper.finetuner_label(ft)}"
            fig.suptitle(title)
            fig.tight_layout()
            caption = (f"Robust accuracy under PGD as eps grows ({eps_steps}) and as the number of steps grows "
                       f"({steps_eps}), after {paper.finetuner_label(ft)} on {pair} (the paper's Figure 3 uses SLF). "
                       f"Bands: 95% intervals (Student t over seeds, or the Wilson interval of a single seed).")
            out.append(save(fig, folder, slug("fig3_ra_sweeps", source, target, ft), title, caption))
    return out


# ---------------------------------------------------------------- Figure 1: SA vs RA


def _bar(a: Aggregate) -> list[list[float]]:
    """The asymmetric error bar of a point: its 95% interval (inside [0, 100])."""
    lo, hi = a.ci95
    return [[pct(a.mean - lo)], [pct(hi - a.mean)]]


def aa_label(aggs: list[Aggregate]) -> str:
    """The AutoAttack settings of these aggregates' protocols: "AutoAttack standard, 8/255"."""
    parts = []
    for a in aggs:
        text = f"AutoAttack {a.protocol.get('aa_version', '?')}, {_num(a.protocol.get('eps_255'))}/255"
        if text not in parts:
            parts.append(text)
    return " / ".join(parts)


def axis_label(aggs: list[Aggregate], metric: str) -> str:
    return f"AA (%) — {aa_label(aggs)}" if metric == "aa" else f"RA (%) — {attack_label(aggs)}"


def scatter_figures(results: Results, folder: Path, x_metric: str = "ra") -> list[Figure]:
    """Paper Figure 1: SA against RA (`x_metric="ra"`) or against AutoAttack accuracy (`"aa"`)."""
    from matplotlib.lines import Line2D

    if x_metric not in ("ra", "aa"):
        raise ValueError(f"x_metric must be 'ra' or 'aa', not {x_metric!r}")
    x_name = paper.METRIC_LABELS[x_metric]

    plt, sns = plt_setup()
    methods = results.methods()
    palette = method_palette(sns, methods)
    finetuners = results.finetuners()
    out = []
    for source, target in results.pairs():
        cells = [c for c in results.cells.values() if c.pair == (source, target)
                 and c.metrics[x_metric] is not None and c.metrics["sa"] is not None]
        fts = [f for f in finetuners if any(c.finetuner == f for c in cells)]
        if not fts:
            continue
        fig, axes = plt.subplots(1, len(fts), figsize=(4.6 * len(fts) + 1.8, 4.4), squeeze=False)
        for ax, ft in zip(axes[0], fts):
            marker = marker_for(ft, finetuners)
            any_paper = False
            for c in sorted((c for c in cells if c.finetuner == ft), key=lambda c: methods.index(c.method)):
                ra, sa = c.metrics[x_metric], c.metrics["sa"]
                color = palette[c.method]
                x, y = pct(ra.mean), pct(sa.mean)
                ax.errorbar(x, y, xerr=_bar(ra), yerr=_bar(sa), fmt="none",
                            ecolor=color, alpha=0.6, capsize=3, zorder=2)
                sns.scatterplot(x=[x], y=[y], color=color, marker=marker, s=110, edgecolor="black", ax=ax,
                                zorder=3, legend=False)
                p_ra, p_sa = c.paper(x_metric), c.paper("sa")
                if p_ra is not None and p_sa is not None:
                    any_paper = True
                    ax.scatter([p_ra], [p_sa], facecolors="none", edgecolors=[color], marker=marker, s=110,
                               linewidths=1.8, zorder=3)
                    ax.plot([p_ra, x], [p_sa, y], color=color, linestyle=":", linewidth=1, zorder=1)
            ax.set_title(f"{paper.finetuner_label(ft)}" + (" (hollow: paper)" if any_paper else ""))
            ax.set_xlabel(axis_label([c.metrics[x_metric] for c in cells if c.finetuner == ft], x_metric))
            ax.set_ylabel("SA (%)")
            ax.margins(0.15)
        handles = [Line2D([], [], color=palette[m], marker="o", linestyle="", markersize=8,
                          label=paper.method_label(m)) for m in methods if any(c.method == m for c in cells)]
        handles += [Line2D([], [], color="gray", marker=marker_for(f, finetuners), linestyle="", markersize=8,
                           label=paper.finetuner_label(f)) for f in fts]
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        pair = paper.pair_label(source, target)
        title = f"SA against {x_name} — {pair}"
        fig.suptitle(title)
        fig.tight_layout()
        what = ("robust accuracy" if x_metric == "ra" else
                "accuracy under AutoAttack (the paper's Figure 1 under AutoAttack)")
        caption = (f"Standard accuracy against {what} on {pair}, one panel per finetuner (paper Figure 1: "
                   f"upper right is better). Filled: ours (error bars: 95% intervals); hollow, joined by a dotted "
                   f"line: the paper's published value.")
        out.append(save(fig, folder, slug(f"fig1_sa_vs_{x_metric}", source, target), title, caption))
    return out
