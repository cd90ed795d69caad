"""Distinct configurations of one method as separate, labelled report rows.

The records of one (method, finetuner, dataset pair), or of one analysis of a method, may come
from several configurations of what produced them: the grid's variants (`--vary advcl.views=4,7`,
a preset's named variants) or runs with other settings. A record's *setup* is the configuration
of every job upstream of it (its inputs, their inputs, ...: the finetuning, the pretraining and
its post-processing, the pseudo-labels, ...), read from their records; its own config is left out
(evaluate settings are handled by `bench.report.collect`, which keeps one per row). Records with
the same setup are one row (their seeds); each distinct setup is its own row, labelled by its
variant label (`Record.variant`) or, when its records have none, by the settings that tell it
apart from the others (those of the job nearest to the record that differ, e.g. `views=[...]`).

A row's name is `paper.row_name(method, label)`: the method itself when it has one unlabelled
configuration, `method[label]` otherwise.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

from bench.record import Record

# settings that change how a job runs, not what it computes (bench.grid.NOT_IN_KEY)
OPERATIONAL = frozenset({"download", "checkpoint_every"})
MAX_LABEL_SETTINGS = 3


@dataclass
class Setup:
    """One configuration of a method's records: its label (None: the method's only, unlabelled one),
    its records, and the method's own settings (its pretraining's section, e.g. advcl's views)."""

    label: str | None
    records: list[Record]
    settings: dict[str, Any] = field(default_factory=dict)


def upstream(record: Record, index: dict[str, Record]) -> list[tuple[str, Record]]:
    """(path of input roles, record) of every job upstream of `record` that has a record in `index`."""
    out: list[tuple[str, Record]] = []
    stack = [(role, key) for role, key in sorted(record.inputs.items())]
    seen: set[str] = set()
    while stack:
        path, key = stack.pop(0)
        found = index.get(key)
        if found is None or key in seen:
            continue  # copied results without their inputs: nothing to tell setups apart by
        seen.add(key)
        out.append((path, found))
        stack += [(f"{path}/{role}", k) for role, k in sorted(found.inputs.items())]
    return out


def setup_settings(record: Record, index: dict[str, Record]) -> dict[str, Any]:
    """`path|section.key` -> value for every setting of every job upstream of `record`."""
    out: dict[str, Any] = {}
    for path, r in upstream(record, index):
        for section, values in r.config.items():
            if isinstance(values, dict):
                out.update({f"{path}|{section}.{k}": v for k, v in values.items() if k not in OPERATIONAL})
            else:
                out[f"{path}|{section}"] = values
    return out


def method_settings(record: Record, index: dict[str, Record]) -> dict[str, Any]:
    """The method's own settings: the section named after it in the nearest upstream record having one."""
    for _, r in upstream(record, index):
        if isinstance(r.config.get(record.method or ""), dict):
            return dict(r.config[record.method])
    return {}


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_text(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _fingerprint(settings: dict[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


def difference(settings: dict[str, Any], others: list[dict[str, Any]], drop_sections: Iterable[str] = ()) -> str:
    """The settings of `settings` that differ in `others`, nearest job first, as `key=value, ...`."""
    keys = sorted(set(settings).union(*others))
    differing = [k for k in keys if any(o.get(k) != settings.get(k) for o in others)]
    if not differing:
        return ""
    depth = min(k.split("|", 1)[0].count("/") for k in differing)
    nearest = [k for k in differing if k.split("|", 1)[0].count("/") == depth]
    drop = set(drop_sections)
    parts = []
    for k in nearest:
        name = k.split("|", 1)[1]
        section, _, short = name.partition(".")
        parts.append(f"{short if section in drop and short else name}={_text(settings.get(k, '—'))}")
    parts = list(dict.fromkeys(parts))
    return ", ".join(parts[:MAX_LABEL_SETTINGS]) + (", …" if len(parts) > MAX_LABEL_SETTINGS else "")


def natural(text: str) -> list[Any]:
    """A sort key that orders `row2` before `row10` and `K=10` before `K=100`."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def split_setups(records: list[Record], index: dict[str, Record]) -> list[Setup]:
    """The configurations of one group of records (one method's cell or analysis), labelled."""
    by_setup: dict[str, list[Record]] = {}
    settings: dict[str, dict[str, Any]] = {}
    for r in records:
        # without the records upstream (copied results), the variant label is all there is to go by
        s = setup_settings(r, index) or ({"|variant": r.variant} if r.variant else {})
        text = _fingerprint(s)
        by_setup.setdefault(text, []).append(r)
        settings[text] = s
    groups = list(by_setup.items())
    labelled = any(r.variant for r in records)
    if len(groups) == 1 and not labelled:
        return [Setup(None, groups[0][1], method_settings(groups[0][1][0], index))]
    first = records[0]
    drop = [first.method or "", first.finetuner or ""]
    out = []
    for text, rs in groups:
        others = [settings[t] for t, _ in groups if t != text]
        derived = difference(settings[text], others, drop) if others else ""
        names = Counter(r.variant for r in rs if r.variant)
        label = names.most_common(1)[0][0] if names else (derived or "default")
        out.append((label, derived, rs))
    counts = Counter(label for label, _, _ in out)
    setups = []
    for label, derived, rs in out:
        if counts[label] > 1 and derived and derived != label:  # two configurations under one label
            label = f"{label} ({derived})"
        setups.append(Setup(label, rs, method_settings(rs[0], index)))
    return sorted(setups, key=lambda s: natural(s.label or ""))
