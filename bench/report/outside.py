"""Outside models in the report: rows named by `bench evaluate --name`, marked as outside.

An outside cell is an ordinary cell (its jobs' `method` is the user's name) whose model came
through a checkpoint job (`bench.stages.checkpoint`). The checkpoint records that carry a name
(a method's own dependency, such as DeACL's file teacher, has none) say which names are outside
and in which format; the tables label such a row "NAME (outside: FORMAT)".
"""

from __future__ import annotations

from typing import Any

KIND = "checkpoint"


def outside_models(results: Any) -> dict[str, list[dict[str, Any]]]:
    """{row name: [the facts of each of its checkpoint records]} of a results folder."""
    out: dict[str, list[dict[str, Any]]] = {}
    for record in (results.others or {}).get(KIND, []):
        if record.method:
            out.setdefault(record.method, []).append(dict(record.metrics, key=record.key))
    return out


def outside_label(results: Any, method: str | None) -> str | None:
    """"NAME (outside: FORMAT)" for an outside row, else None."""
    facts = outside_models(results).get(method or "")
    if not facts:
        return None
    formats = sorted({str(f.get("format")) for f in facts})
    return f"{method} (outside: {', '.join(formats)})"
