"""Progress of a run: a live rich table on a terminal, plain lines otherwise, a summary at the end.

Executors report state changes (`update`) and worker progress (`progress`, read from each
job's progress.json); `tick` redraws at most a few times a second.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from bench.executors.base import (BLOCKED, CACHED, DONE, ELSEWHERE, FAILED, LOCKED, PENDING, RUNNING,
                                  SUBMITTED, Outcome)
from bench.grid import Graph

STYLE = {PENDING: "dim", RUNNING: "bold cyan", LOCKED: "yellow", DONE: "green", CACHED: "green dim",
         ELSEWHERE: "green", FAILED: "bold red", BLOCKED: "red dim", SUBMITTED: "blue"}
# the states of job folders (bench.store), as `bench show` and dry runs print them
STORE_STYLE = {"done": "green", "damaged": "bold magenta", "running": "bold cyan", "failed": "bold red",
               "blocked": "red dim", "interrupted": "yellow", "pending": "dim"}
STATE_ORDER = (RUNNING, LOCKED, FAILED, PENDING, BLOCKED, DONE, ELSEWHERE, SUBMITTED, CACHED)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def fraction(info: dict[str, Any]) -> float | None:
    """How far a job is (0..1) from its progress info, if it says."""
    try:
        if "epochs" in info and "epoch" in info:
            steps = max(1, int(info.get("steps") or 1))
            step = int(info.get("step") or steps)
            return min(1.0, ((int(info["epoch"]) - 1) * steps + step) / (int(info["epochs"]) * steps))
        if "done" in info and "total" in info and info["total"]:
            return min(1.0, float(info["done"]) / float(info["total"]))
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return None


def describe(info: dict[str, Any] | None) -> str:
    if not info:
        return ""
    parts = []
    if "epoch" in info and "epochs" in info:
        parts.append(f"epoch {info['epoch']}/{info['epochs']}")
        if info.get("steps"):
            parts.append(f"step {info.get('step')}/{info['steps']}")
    elif "done" in info and "total" in info:
        parts.append(f"{info.get('phase', '')} {info['done']}/{info['total']}".strip())
    elif info.get("phase"):
        parts.append(str(info["phase"]))
    if isinstance(info.get("loss"), (int, float)):
        parts.append(f"loss {info['loss']:.3g}")
    return " ".join(parts)


def state_counts(states: dict[str, str]) -> str:
    """'done 3  failed 1 ...' (rich markup): the footer of the live table and of the summary."""
    n: dict[str, int] = {}
    for state in states.values():
        n[state] = n.get(state, 0) + 1
    return "  ".join(f"[{STYLE.get(s, '')}]{s} {n[s]}[/]" for s in STATE_ORDER if n.get(s))


def wide_console(**kwargs: Any) -> Console:
    """A console for tables: the terminal's width, or 160 columns when writing to a file or pipe."""
    console = Console(**kwargs)
    if not console.is_terminal and "COLUMNS" not in __import__("os").environ:
        console = Console(width=160, **kwargs)
    return console


class RunProgress:
    """The reporter of `bench run` (see bench.executors.base.Reporter)."""

    def __init__(self, console: Console | None = None, out: Console | None = None, live: bool | None = None,
                 title: str = "bench run"):
        self.console = console or Console(stderr=True)
        self.out = out or wide_console()
        self.live_mode = self.console.is_terminal if live is None else live
        self.title = title
        self.graph: Graph | None = None
        self.states: dict[str, str] = {}
        self.slots: dict[str, str | None] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self.first: dict[str, tuple[float, float]] = {}  # key -> (time, fraction) first seen
        self.eta: dict[str, float | None] = {}
        self.started: dict[str, float] = {}
        self.t0 = time.time()
        self._live: Live | None = None
        self._last_draw = 0.0
        self._last_epoch: dict[str, Any] = {}

    # ------------------------------------------------------------ Reporter

    def begin(self, graph: Graph, states: dict[str, str]) -> None:
        self.graph = graph
        self.states = {k: states.get(k, PENDING) for k in graph.keys()}
        self.t0 = time.time()
        todo = sum(1 for s in self.states.values() if s != CACHED)
        if self.live_mode:
            self._live = Live(self._render(), console=self.console, refresh_per_second=4, transient=True)
            self._live.start()
        else:
            self.console.print(f"{self.title}: {len(self.states)} jobs, {todo} to run, "
                               f"{len(self.states) - todo} already done", highlight=False, soft_wrap=True)

    def update(self, key: str, state: str, slot: str | None = None, error: str | None = None) -> None:
        previous = self.states.get(key)
        self.states[key] = state
        if slot:
            self.slots[key] = slot
        if state == RUNNING:
            self.started.setdefault(key, time.time())
        if state != RUNNING:
            self.eta.pop(key, None)
        if not self.live_mode and state != previous:
            where = f" on {slot}" if slot and state == RUNNING else ""
            took = ""
            if state in (DONE, FAILED) and key in self.started:
                took = f" in {fmt_duration(time.time() - self.started[key])}"
            why = f": {error}" if error and state == FAILED else ""
            self.console.print(f"{time.strftime('%H:%M:%S')} {state:>9} {key}{where}{took}{why}", highlight=False,
                               soft_wrap=True, markup=False)
        self.tick()

    def progress(self, key: str, info: dict[str, Any]) -> None:
        self.info[key] = info
        if info.get("slot") and not self.slots.get(key):
            self.slots[key] = str(info["slot"])
        f = fraction(info)
        now = time.time()
        if f is not None:
            if key not in self.first:
                self.first[key] = (now, f)
            t0, f0 = self.first[key]
            self.eta[key] = (1 - f) * (now - t0) / (f - f0) if f > f0 else None
        if not self.live_mode and "epoch" in info and info.get("epoch") != self._last_epoch.get(key):
            self._last_epoch[key] = info.get("epoch")
            eta = self.eta.get(key)
            self.console.print(f"{time.strftime('%H:%M:%S')} {'progress':>9} {key} {describe(info)}"
                               + (f" eta {fmt_duration(eta)}" if eta else ""), highlight=False, soft_wrap=True,
                               markup=False)

    def tick(self) -> None:
        if self._live is None:
            return
        now = time.time()
        if now - self._last_draw >= 0.25:
            self._last_draw = now
            self._live.update(self._render())

    def end(self, outcomes: dict[str, Outcome]) -> None:
        for key, out in outcomes.items():
            self.states[key] = out.state
        if self._live is not None:
            self._live.update(self._render())
            self._live.stop()
            self._live = None
        self.out.print(summary_table(self.graph, outcomes, self.states, time.time() - self.t0))

    # ------------------------------------------------------------ drawing

    def _render(self):
        table = Table(title=f"{self.title}  ({fmt_duration(time.time() - self.t0)})", title_justify="left",
                      expand=False)
        for col in ("job", "kind", "state", "device", "progress", "ETA"):
            table.add_column(col, no_wrap=True)
        rank = {s: i for i, s in enumerate(STATE_ORDER)}
        keys = sorted(self.states, key=lambda k: rank.get(self.states[k], 99))
        height = max(8, self.console.size.height - 6)
        shown = keys[:height]
        for key in shown:
            state = self.states[key]
            kind = self.graph[key].kind if self.graph and key in self.graph else ""
            info = self.info.get(key) if state == RUNNING else None
            table.add_row(key, kind, Text(state, style=STYLE.get(state, "")), self.slots.get(key) or "",
                          describe(info), fmt_duration(self.eta.get(key)) if state == RUNNING else "")
        hidden = len(keys) - len(shown)
        footer = Text.from_markup(state_counts(self.states) + (f"  (+{hidden} more not shown)" if hidden else ""))
        return Group(table, footer)


def summary_table(graph: Graph | None, outcomes: dict[str, Outcome], states: dict[str, str],
                  elapsed: float) -> Group:
    table = Table(title=f"summary ({fmt_duration(elapsed)})", title_justify="left")
    for col in ("job", "kind", "state", "device", "time", "note"):
        table.add_column(col, overflow="fold")
    for key, state in states.items():
        out = outcomes.get(key, Outcome(state))
        kind = graph[key].kind if graph is not None and key in graph else ""
        took = fmt_duration(out.finished - out.started) if out.started and out.finished else ""
        note = ""
        if state == FAILED:
            note = f"{out.error or 'failed'} (log: {out.log})"
        elif state == BLOCKED and out.blocked_by:
            note = f"needs {out.blocked_by}"
        table.add_row(key, kind, Text(state, style=STYLE.get(state, "")), out.slot or "", took, note)
    return Group(table, Text.from_markup(state_counts(states)))
