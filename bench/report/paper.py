"""The paper's published numbers (docs/methods.md §7) as data, and display names.

`paper_numbers.json` holds Tables 1-3 of Fan et al. (NeurIPS 2021) in percent. A cell is
identified by (method, finetuner, source, target); `published(...)` looks it up in every table
(Table 3's SLF values repeat Table 1's; its ALF values exist only there).

The AdvCL ablations are its top-level "table4" (a row per contrastive view set, `table4_row`) and
"table5" (a row per (f_pre setup, K), `table5_row`); `bench.report.ablations` renders them.

`references_for(...)` gives what others published for a cell (`published/acl_family.json`,
`published/deacl_ainfonce.json`, normalized to `Reference`s): each labelled by who measured it
and under which protocol; none is the harness's protocol, so the tables show them beside ours as
references, never as the value we are compared with.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

METRICS = ("aa", "ra", "sa")
METRIC_LABELS = {"aa": "AA", "ra": "RA", "sa": "SA"}
# Column labels of the extra tables (bench.report.extras): common corruptions, by severity and by kind
CORRUPTION_LABELS = {"gaussian_noise": "Gauss", "shot_noise": "Shot", "impulse_noise": "Impulse",
                     "defocus_blur": "Defocus", "glass_blur": "Glass", "motion_blur": "Motion", "zoom_blur": "Zoom",
                     "snow": "Snow", "frost": "Frost", "fog": "Fog", "brightness": "Bright", "contrast": "Contrast",
                     "elastic_transform": "Elastic", "pixelate": "Pixel", "jpeg_compression": "JPEG"}
METRIC_LABELS.update({"mca": "mCA", **{f"sev{s}": f"sev {s}" for s in range(1, 6)}, **CORRUPTION_LABELS})
# Paper order of the rows; methods the paper does not have come after, alphabetically.
METHOD_ORDER = ("supervised_at", "apdpe", "rocl", "acl", "advcl")
FINETUNER_ORDER = ("slf", "aff", "alf")
DATASET_ORDER = ("cifar10", "cifar100", "stl10")
EXTRA_LABELS = {"simclr": "SimCLR", "synthetic": "synthetic"}
EXTRA_FINETUNER_LABELS = {"none": "as given"}  # an outside classifier evaluated without finetuning


@functools.lru_cache(maxsize=1)
def numbers() -> dict[str, Any]:
    """The parsed paper_numbers.json."""
    text = resources.files("bench.report").joinpath("paper_numbers.json").read_text()
    return json.loads(text)


@functools.lru_cache(maxsize=1)
def _index() -> dict[tuple[str, str, str, str], dict[str, float]]:
    out: dict[tuple[str, str, str, str], dict[str, float]] = {}
    for table in numbers()["tables"].values():
        for row in table["rows"]:
            key = (row["method"], row["finetuner"], row["source"], row["target"])
            values = out.setdefault(key, {})
            for metric in METRICS:
                if metric in row:
                    values[metric] = float(row[metric])
    return out


def row_name(method: str, variant: str | None = None) -> str:
    """A report row: the method, or `method[variant]` for one of its several configurations."""
    return f"{method}[{variant}]" if variant else method


def split_row(name: str) -> tuple[str, str | None]:
    """`advcl[views=4]` -> ("advcl", "views=4"); `advcl` -> ("advcl", None)."""
    if name.endswith("]") and "[" in name:
        method, _, variant = name[:-1].partition("[")
        return method, variant
    return name, None


def published(method: str | None, finetuner: str | None, source: str | None, target: str | None,
              metric: str | None = None) -> Any:
    """The paper's value(s) in percent for a cell: a dict of metrics, or one float, or None. A variant
    row (`method[label]`) has none: it is not the configuration the paper's Tables 1-3 report."""
    values = _index().get((method or "", finetuner or "", source or "", target or ""))
    if metric is None:
        return dict(values) if values else None
    return values.get(metric) if values else None


def method_label(name: str | None) -> str:
    if not name:
        return "?"
    name, variant = split_row(name)
    label = numbers()["methods"].get(name) or EXTRA_LABELS.get(name) or published_labels().get(name) or name
    return f"{label} [{variant}]" if variant else label


@functools.lru_cache(maxsize=1)
def published_labels() -> dict[str, str]:
    """Display names of the methods the published/*.json files name (DeACL, DynACL++, ...)."""
    folder = resources.files("bench.report").joinpath("published")
    out: dict[str, str] = {}
    for name in PUBLISHED_FILES:
        table = json.loads(folder.joinpath(name).read_text())
        out.update(table.get("methods") or {})
        for row in table["rows"]:
            if row.get("label") and not row.get("settings"):
                out.setdefault(row["method"], row["label"])
    return out


def finetuner_label(name: str | None) -> str:
    if not name:
        return "?"
    return numbers()["finetuners"].get(name) or EXTRA_FINETUNER_LABELS.get(name) or name.upper()


def dataset_label(name: str | None) -> str:
    if not name:
        return "?"
    return numbers()["datasets"].get(name) or EXTRA_LABELS.get(name) or name


def pair_label(source: str | None, target: str | None) -> str:
    """'CIFAR-10' for an in-domain cell, 'CIFAR-10 → STL-10' for a cross-dataset one."""
    if source and target and source != target:
        return f"{dataset_label(source)} → {dataset_label(target)}"
    return dataset_label(target or source)


def _order(names, preferred) -> list[str]:
    names = list(dict.fromkeys(n for n in names if n is not None))
    known = [n for n in preferred if n in names]
    return known + sorted(n for n in names if n not in preferred)


def order_methods(names) -> list[str]:
    """Methods in the paper's order; a method's variant rows follow it, in natural order (row2 < row10)."""
    import re

    names = list(dict.fromkeys(n for n in names if n is not None))
    bases = _order((split_row(n)[0] for n in names), METHOD_ORDER)

    def key(name: str) -> tuple:
        base, variant = split_row(name)
        parts = [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", variant or "")]
        return (bases.index(base), variant is not None, [(isinstance(p, str), p) for p in parts])

    return sorted(names, key=key)


def order_finetuners(names) -> list[str]:
    return _order(names, FINETUNER_ORDER)


def order_datasets(names) -> list[str]:
    return _order(names, DATASET_ORDER)


def order_pairs(pairs) -> list[tuple[str, str]]:
    pairs = list(dict.fromkeys(pairs))
    rank = {d: i for i, d in enumerate(order_datasets([d for p in pairs for d in p]))}
    return sorted(pairs, key=lambda p: (rank.get(p[0], 0), rank.get(p[1], 0)))


# ---------------------------------------------------------------- Tables 4 and 5 (AdvCL ablations)


def table4() -> dict[str, Any]:
    return numbers()["table4"]


def table5() -> dict[str, Any]:
    return numbers()["table5"]


def table4_row(views) -> dict[str, Any] | None:
    """Table 4's row for a view set (names as methods/advcl.py VIEWS, any order) or a row number 1-7."""
    rows = table4()["rows"]
    if isinstance(views, int):
        return next((r for r in rows if r["row"] == views), None)
    wanted = frozenset(views)
    return next((r for r in rows if frozenset(r["views"]) == wanted), None)


def table5_row(f_pre: str, k: int | str | None) -> dict[str, Any] | None:
    """Table 5's row for an f_pre setup ("none", "cifar10_simclr", "imagenet_supervised",
    "imagenet_simclr") and K (an int, "ensemble", or None for the run without ClusterFit)."""
    return next((r for r in table5()["rows"] if r["f_pre"] == f_pre and r["k"] == k), None)


def f_pre_label(key: str, tex: bool = False) -> str:
    entry = table5()["f_pre"].get(key)
    return (entry["tex" if tex else "label"] if entry else key)


# ---------------------------------------------------------------- numbers published elsewhere


PUBLISHED_FILES = ("acl_family.json", "deacl_ainfonce.json")


@dataclass(frozen=True)
class Reference:
    """A number published for one of our cells by someone else than Fan et al., under their protocol.

    Normalized from `published/*.json` (the ACL family's rows name their source `origin` and
    carry `label`, `citation`, `settings`; DeACL / A-InfoNCE rows name it `source_label` and
    carry `cite`, `std`): values in percent, `source` who measured them, `protocol` how.
    """

    method: str
    finetuner: str | None     # None: the source does not say
    source: str
    target: str
    values: dict[str, float]  # aa / ra / sa, percent; a metric the source did not report is absent
    source_label: str         # "paper", "README", "authors' leaderboard", "RobustSSL_Benchmark reproduction", ...
    protocol: str
    citation: str = ""
    label: str = ""           # the row's name at its source (a variant: "DynACL-RCS")
    settings: tuple[tuple[str, Any], ...] = ()  # harness settings that make our run the variant
    note: str = ""
    std: tuple[tuple[str, float], ...] = ()
    file: str = ""

    @property
    def variant(self) -> bool:
        return bool(self.settings)

    def text(self) -> str:
        """'AA 45.09, SA 75.41' (with ± std where the source gives one)."""
        std = dict(self.std)
        return ", ".join(f"{METRIC_LABELS[m]} {self.values[m]:.2f}" + (f" ± {std[m]:.2f}" if m in std else "")
                         for m in METRICS if m in self.values)


def _reference(row: dict[str, Any], table: dict[str, Any], file: str) -> Reference:
    source_label = row.get("source_label") or row.get("origin") or "unlabelled"
    protocol = row.get("protocol") or (table.get("origins", {}).get(source_label, {}) or {}).get("protocol", "")
    return Reference(
        method=row["method"], finetuner=row.get("finetuner"), source=row["source"], target=row["target"],
        values={m: float(row[m]) for m in METRICS if row.get(m) is not None}, source_label=source_label,
        protocol=protocol, citation=row.get("citation") or row.get("cite") or "", label=row.get("label") or "",
        settings=tuple(sorted((row.get("settings") or {}).items())), note=row.get("note") or "",
        std=tuple(sorted((row.get("std") or {}).items())), file=file)


@functools.lru_cache(maxsize=1)
def references() -> tuple[Reference, ...]:
    """Every row of the published/*.json files, normalized (one loader for both layouts)."""
    out: list[Reference] = []
    folder = resources.files("bench.report").joinpath("published")
    for name in PUBLISHED_FILES:
        table = json.loads(folder.joinpath(name).read_text())
        out += [_reference(row, table, name) for row in table["rows"]]
    return tuple(out)


def references_for(method: str | None, finetuner: str | None, source: str | None,
                   target: str | None) -> list[Reference]:
    """The published references of a cell: rows for its method, finetuner and datasets."""
    return [r for r in references() if (r.method, r.finetuner, r.source, r.target) == (method, finetuner, source, target)]
