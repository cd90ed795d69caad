"""`bench show [KEY]`: the jobs of a results folder and their states, or one job's record."""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from bench.commands import results_option


def _kind(key: str, record: Any, job: dict[str, Any]) -> str:
    from bench.registry import STAGES

    if record is not None:
        return record.kind
    if job.get("kind"):
        return str(job["kind"])
    return next((kind for kind in STAGES.names() if key.startswith(kind + "-")), "?")


def _summary(record: Any) -> str:
    from bench.errors import BenchError
    from bench.stages.base import get_stage

    if record is None:
        return ""
    try:
        return get_stage(record.kind).summary(record)
    except BenchError:  # a kind whose plugin is not installed here
        return ""


def _find(store, key: str) -> str:
    from bench.errors import BenchError

    if store.job_dir(key).is_dir():
        return key
    matches = [k for k in store.keys() if k.startswith(key)]
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
    from bench.progress import STORE_STYLE, fmt_duration, wide_console
    from bench.store import Store

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
    for name in store.keys():
        job_dir = store.job(name)
        state = job_dir.state()
        k = _kind(name, state.record, job_dir.job())
        if kind and k != kind:
            continue
        counts[state.name] = counts.get(state.name, 0) + 1
        took = ""
        if state.record is not None:
            run = state.record.provenance.get("run") or state.record.provenance
            if isinstance(run.get("duration_s"), (int, float)):
                took = fmt_duration(run["duration_s"])
        detail = _summary(state.record) if state.done else state.reason
        table.add_row(name, k, Text(state.name, style=STORE_STYLE.get(state.name, "")), took, Text(detail))
    console.print(table)
    console.print("  ".join(f"{s} {n}" for s, n in sorted(counts.items())) or "no jobs", highlight=False)


CURVE_ROWS = 12     # epochs shown (evenly spread, first and last always)
CURVE_COLUMNS = 8   # metrics shown (the loss first)


def curve_table(rows: list[dict[str, Any]], title: str) -> Table | None:
    """A small table of a training curve: one row per shown epoch, one column per metric."""
    from bench.train.logbook import numeric

    rows = [numeric(r) for r in rows]
    if not rows:
        return None
    names: list[str] = []
    for r in rows:
        names += [k for k in r if k != "epoch" and k not in names]
    names.sort(key=lambda k: (k != "loss", not k.endswith("loss"), k in ("lr", "epoch_seconds", "images_per_s")))
    names = names[:CURVE_COLUMNS]
    n = len(rows)
    shown = sorted({round(i * (n - 1) / (CURVE_ROWS - 1)) for i in range(CURVE_ROWS)}) if n > CURVE_ROWS else range(n)
    table = Table(title=title, title_justify="left")
    table.add_column("epoch", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for i in shown:
        r = rows[i]
        table.add_row(str(int(r.get("epoch", i + 1))), *(f"{r[k]:.4g}" if k in r else "" for k in names))
    if n > CURVE_ROWS:
        table.caption = f"{len(shown)} of {n} epochs"
    return table


def _show_curve(job_dir, record, console: Console) -> None:
    from bench.train.logbook import HISTORY_CSV, read_history_csv

    csv_path = job_dir / HISTORY_CSV
    if csv_path.is_file():  # the history and each epoch's throughput, also while the job runs
        rows, where = read_history_csv(csv_path), HISTORY_CSV
    else:
        rows, where = (record.history if record is not None else []), "record history"
    table = curve_table(rows, f"training curve ({where})")
    if table is not None:
        console.print(table)


def _show_one(store, key: str, console: Console) -> None:
    import json

    from bench.progress import STORE_STYLE
    from bench.store import FAILURE, JOB_FILE, LOG, PROGRESS, read_json

    job_dir = store.job(key)
    state = job_dir.state()
    console.print(f"[bold]{key}[/]  [{STORE_STYLE.get(state.name, '')}]{state.name}[/]  ({job_dir.path})",
                  highlight=False)
    if state.reason:
        console.print(Text(state.reason), highlight=False)
    if state.record is not None:
        console.print_json(state.record.to_json())
        _show_curve(job_dir, state.record, console)
        return
    _show_curve(job_dir, None, console)
    for name in (JOB_FILE, PROGRESS, FAILURE):
        data = read_json(job_dir / name)
        if data is not None:
            console.print(f"[bold]{name}[/]")
            console.print_json(json.dumps(data, default=str))
    log = job_dir / LOG
    if log.is_file():
        tail = log.read_text(errors="replace").splitlines()[-20:]
        console.print(f"[bold]{LOG}[/] (last {len(tail)} lines)")
        console.print("\n".join(tail), highlight=False, markup=False)
