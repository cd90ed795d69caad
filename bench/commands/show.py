"""`bench show [KEY]`: the jobs of a results folder and their states, or one job's record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from bench.commands import results_option


def job_state(store, key: str) -> str:
    from bench.executors.base import is_locked
    from bench.worker import FAILURE, JOB_FILE

    d = store.job_dir(key)
    if store.has(key):
        return "done"
    if is_locked(store, key):
        return "running"
    if (d / FAILURE).is_file():
        return "failed"
    if (d / "checkpoint.pt").is_file():
        return "interrupted"
    if (d / JOB_FILE).is_file():
        return "not finished"
    return "empty"


STYLE = {"done": "green", "running": "bold cyan", "failed": "bold red", "interrupted": "yellow",
         "not finished": "dim", "empty": "dim"}


def _metric(value: Any) -> str:
    if isinstance(value, dict) and isinstance(value.get("value"), (int, float)):
        return f"{100 * value['value']:.1f}"
    if isinstance(value, float):
        return f"{value:.3g}"
    return ""


def _summary(record) -> str:
    if record is None:
        return ""
    parts = []
    for name in ("sa", "ra", "aa"):
        shown = _metric(record.metrics.get(name))
        if shown:
            parts.append(f"{name.upper()} {shown}")
    if not parts and record.history:
        last = record.history[-1]
        if isinstance(last.get("loss"), (int, float)):
            parts.append(f"loss {last['loss']:.3g} (epoch {last.get('epoch', len(record.history))})")
    return "  ".join(parts)


def _kind(key: str, record) -> str:
    if record is not None:
        return record.kind
    for kind in ("pseudo_labels", "pretrain", "finetune", "evaluate"):
        if key.startswith(kind + "-"):
            return kind
    return "?"


def _find(store, key: str) -> str:
    from bench.errors import BenchError

    if store.job_dir(key).is_dir():
        return key
    matches = sorted(p.name for p in store.root.glob(f"{key}*") if p.is_dir()) if store.root.is_dir() else []
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise BenchError(f"no job {key!r} in {store.root}")
    raise BenchError(f"{key!r} matches {len(matches)} jobs: {', '.join(matches[:5])}{' ...' if len(matches) > 5 else ''}")


@click.command()
@results_option
@click.option("--kind", default=None, help="only jobs of this kind")
@click.argument("key", required=False)
def command(results, kind, key) -> None:
    """List the jobs in the results folder with their states, or show the record of job KEY (or a prefix)."""
    from bench.errors import BenchError
    from bench.store import Store

    from bench.progress import wide_console

    store = Store(results)
    console = wide_console()
    if key:
        _show_one(store, _find(store, key), console)
        return
    if not store.root.is_dir():
        raise BenchError(f"results folder {store.root} does not exist")
    table = Table(title=f"jobs in {store.root}", title_justify="left")
    for col in ("job", "kind", "state", "time", "summary"):
        table.add_column(col, overflow="fold")
    counts: dict[str, int] = {}
    for d in sorted(p for p in store.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            record = store.read(d.name)
        except BenchError as exc:
            table.add_row(d.name, "?", Text("unreadable", style="red"), "", str(exc))
            continue
        k = _kind(d.name, record)
        if kind and k != kind:
            continue
        state = job_state(store, d.name)
        counts[state] = counts.get(state, 0) + 1
        took = ""
        if record is not None:
            run = record.provenance.get("run") or record.provenance
            if isinstance(run.get("duration_s"), (int, float)):
                from bench.progress import fmt_duration

                took = fmt_duration(run["duration_s"])
        table.add_row(d.name, k, Text(state, style=STYLE.get(state, "")), took, _summary(record))
    console.print(table)
    console.print("  ".join(f"{s} {n}" for s, n in sorted(counts.items())) or "no jobs", highlight=False)


def _show_one(store, key: str, console: Console) -> None:
    import json

    from bench.worker import FAILURE, JOB_FILE, LOG, PROGRESS, read_json

    record = store.read(key)
    state = job_state(store, key)
    console.print(f"[bold]{key}[/]  [{STYLE.get(state, '')}]{state}[/]  ({store.job_dir(key)})")
    if record is not None:
        console.print_json(record.to_json())
        return
    d = store.job_dir(key)
    for name in (JOB_FILE, PROGRESS, FAILURE):
        data = read_json(d / name)
        if data is not None:
            console.print(f"[bold]{name}[/]")
            console.print_json(json.dumps(data, default=str))
    log = Path(d / LOG)
    if log.is_file():
        tail = log.read_text(errors="replace").splitlines()[-20:]
        console.print(f"[bold]{LOG}[/] (last {len(tail)} lines)")
        console.print("\n".join(tail), highlight=False, markup=False)
