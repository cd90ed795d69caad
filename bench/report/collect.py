"""Reading a results folder into report cells: evaluate records grouped over seeds.

A cell is one (method, finetuner, source, target); a method with several configurations (grid
variants, other settings) has a row, and a cell, per configuration, `method[label]`
(`bench.report.variants`). Its records (one per seed) are aggregated per
metric: the mean over seeds, the sample std over seeds (none with one seed), the per-seed n, and a
95% interval (the record's Wilson interval for one seed; a Student-t interval of the mean over
seeds otherwise), plus the Wilson interval of the pooled counts. Jobs without a record (failed,
blocked by a failed dependency, unfinished) and unreadable records are kept as `Missing` entries
so the report can say what is absent and why.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from bench.errors import BenchError
from bench.record import TEST_SELECTION_FLAG, Record, wilson_interval
from bench.report import paper
from bench.report.variants import split_setups
from bench.store import DONE, JobDir, Store

log = logging.getLogger(__name__)

METRICS = paper.METRICS
SWEEP_AXES = ("eps", "steps")
CORE_KINDS = ("pseudo_labels", "pretrain", "finetune", "evaluate")  # shown by the tables and figures
CellKey = tuple[str, str, str, str]  # method, finetuner, source, target


# ---------------------------------------------------------------- aggregates


def t_quantile(df: int) -> float:
    """The 97.5% quantile of Student's t with df degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


@dataclass
class Aggregate:
    """One metric of one cell over its seeds. Fractions in [0,1]; `pct(...)` gives percent."""

    seeds: list[int]
    values: list[float]
    n: list[int]
    correct: list[int]
    cis: list[tuple[float, float]]
    protocol: dict[str, Any] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if self.k > 1 else None

    @property
    def ci95(self) -> tuple[float, float]:
        if self.k == 1:
            return (float(self.cis[0][0]), float(self.cis[0][1]))
        half = t_quantile(self.k - 1) * float(self.std) / math.sqrt(self.k)
        return (max(0.0, self.mean - half), min(1.0, self.mean + half))

    @property
    def ci_kind(self) -> str:
        return "Wilson" if self.k == 1 else f"Student t over {self.k} seeds"

    @property
    def n_total(self) -> int:
        return sum(self.n)

    @property
    def correct_total(self) -> int:
        return sum(self.correct)

    @property
    def pooled_ci95(self) -> tuple[float, float]:
        return wilson_interval(self.correct_total, self.n_total)

    @property
    def n_label(self) -> str:
        lo, hi = min(self.n), max(self.n)
        return f"{lo}" if lo == hi else f"{lo}–{hi}"


def pct(x: float | None) -> float | None:
    return None if x is None else 100.0 * x


def aggregate(points: Iterable[tuple[int, dict[str, Any] | None]]) -> Aggregate | None:
    """Aggregate (seed, Metric dict as a record stores it) pairs; None when no seed has the metric
    (a stage that was not run, e.g. AA with eval.aa_n=0, is stored as null)."""
    agg = Aggregate([], [], [], [], [])
    for seed, m in points:
        if m is None:
            continue
        agg.seeds.append(seed)
        agg.values.append(float(m["value"]))
        agg.n.append(int(m["n"]))
        agg.correct.append(int(m["correct"]))
        agg.cis.append((float(m["ci95"][0]), float(m["ci95"][1])))
        if not agg.protocol:
            agg.protocol = dict(m["protocol"])
    return agg if agg.values else None


def sweep_x(point: dict[str, Any], axis: str) -> float:
    """The x of a sweep point: eps in units of 1/255, or the number of PGD steps (from its protocol)."""
    protocol = point["protocol"]
    return round(float(protocol["eps_255"]), 4) if axis == "eps" else float(protocol["steps"])


# ---------------------------------------------------------------- cells


@dataclass
class Cell:
    method: str  # the row: the method, or `method[variant]` for one of its configurations (bench.report.variants)
    finetuner: str
    source: str
    target: str
    records: list[Record]
    variant: str | None = None  # the configuration's label (None: the method's one configuration)
    settings: dict[str, Any] = field(default_factory=dict)  # the method's own settings (its pretraining's)

    def __post_init__(self) -> None:
        self.records.sort(key=lambda r: r.seed)
        self.metrics: dict[str, Aggregate | None] = {
            m: aggregate((r.seed, r.metrics.get(m)) for r in self.records) for m in METRICS}
        self.sweeps: dict[str, list[tuple[float, Aggregate]]] = {}
        for axis in SWEEP_AXES:
            by_x: dict[float, list[tuple[int, Any]]] = {}
            for r in self.records:
                for p in (r.metrics.get("sweeps") or {}).get(axis, []):
                    by_x.setdefault(sweep_x(p, axis), []).append((r.seed, p))
            series = [(x, aggregate(pts)) for x, pts in sorted(by_x.items())]
            self.sweeps[axis] = [(x, a) for x, a in series if a is not None]

    @property
    def key(self) -> CellKey:
        return (self.method, self.finetuner, self.source, self.target)

    @property
    def pair(self) -> tuple[str, str]:
        return (self.source, self.target)

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.records]

    @property
    def selection_on_test(self) -> bool:
        return any(TEST_SELECTION_FLAG in r.flags for r in self.records)

    @property
    def other_flags(self) -> list[str]:
        return sorted({f for r in self.records for f in r.flags if f != TEST_SELECTION_FLAG})

    @property
    def sanity_warnings(self) -> list[str]:
        """Warnings of the records (with their seed), the test-selection notice left out (it is †)."""
        out = []
        for r in self.records:
            for w in r.warnings:
                if TEST_SELECTION_FLAG in w:
                    continue
                out.append(f"seed {r.seed}: {w}" if len(self.records) > 1 else w)
        return list(dict.fromkeys(out))

    @property
    def marks(self) -> str:
        out = ""
        if self.selection_on_test:
            out += "†"
        if self.sanity_warnings:
            out += "‡"
        if self.other_flags:
            out += "§"
        return out

    @property
    def base_method(self) -> str:
        return paper.split_row(self.method)[0]

    def paper(self, metric: str) -> float | None:
        return paper.published(self.method, self.finetuner, self.source, self.target, metric)

    @property
    def label(self) -> str:
        return (f"{paper.method_label(self.method)} / {paper.finetuner_label(self.finetuner)} / "
                f"{paper.pair_label(self.source, self.target)}")


# ---------------------------------------------------------------- missing jobs


@dataclass
class Missing:
    key: str
    kind: str
    state: str  # a bench.store state other than done: damaged, running, failed, blocked, interrupted, pending
    detail: str = ""
    method: str | None = None
    finetuner: str | None = None
    source: str | None = None
    target: str | None = None
    seed: int | None = None
    blocked_by: str | None = None  # the failed job that kept this one from running
    variant: str | None = None     # the grid variant it was planned for

    @property
    def status(self) -> str:
        """The state in a few words, for a table cell."""
        if self.state == "blocked" and self.blocked_by:
            return f"blocked: {kind_of(self.blocked_by)} failed"
        return self.state

    @property
    def what(self) -> str:
        parts = [paper.method_label(self.method) if self.method else None,
                 paper.finetuner_label(self.finetuner) if self.finetuner else None,
                 paper.pair_label(self.source, self.target) if (self.source or self.target) else None,
                 f"seed {self.seed}" if self.seed is not None else None]
        return " / ".join(p for p in parts if p)


def kind_of(key: str) -> str:
    """The job kind a key starts with ("?" for a folder that is not a job's)."""
    from bench.registry import STAGES

    kinds = sorted(STAGES.names(), key=len, reverse=True)  # "pseudo_labels" before a kind "pseudo"
    return next((kind for kind in kinds if key.startswith(kind + "-")), "?")


def _missing(job_dir: JobDir) -> Missing:
    """The Missing entry of a job folder that is not done (its state from bench.store)."""
    state = job_dir.state()
    job = job_dir.job()
    detail = state.reason
    if state.name == "blocked" and state.blocked_by:  # never ran: a job it needs failed; name it and its error
        cause = job_dir.root.joinpath(state.blocked_by).joinpath("failure.json")
        error = JobDir(job_dir.root, state.blocked_by).failure() if cause.is_file() else None
        detail = f"{kind_of(state.blocked_by)} job {state.blocked_by} failed" + (f": {error}" if error else "")
    return Missing(job_dir.key, job.get("kind") or kind_of(job_dir.key), state.name, detail, job.get("method"),
                   job.get("finetuner"), job.get("source"), job.get("target"), job.get("seed"), state.blocked_by,
                   job.get("variant"))


# ---------------------------------------------------------------- the results of a folder


@dataclass
class Filters:
    methods: list[str] = field(default_factory=list)
    finetuners: list[str] = field(default_factory=list)
    datasets: list[tuple[str, str]] = field(default_factory=list)  # (source, target); "*" = any

    def active(self) -> bool:
        return bool(self.methods or self.finetuners or self.datasets)

    def match(self, method: str | None, finetuner: str | None, source: str | None, target: str | None) -> bool:
        if self.methods and method is not None and method not in self.methods:
            return False
        if self.finetuners and finetuner is not None and finetuner not in self.finetuners:
            return False
        if self.datasets and (source is not None or target is not None):
            ok = False
            for s, t in self.datasets:
                if (s == "*" or source is None or s == source) and (t == "*" or target is None or t == target):
                    ok = True
            if not ok:
                return False
        return True

    def describe(self) -> str:
        parts = []
        if self.methods:
            parts.append("--methods " + ",".join(self.methods))
        if self.finetuners:
            parts.append("--finetune " + ",".join(self.finetuners))
        if self.datasets:
            parts.append("--datasets " + ",".join(s if s == t else f"{s}:{t}" for s, t in self.datasets))
        return " ".join(parts)


def _split(values: Iterable[str] | str | None) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [p.strip() for v in values for p in str(v).split(",") if p.strip()]


def make_filters(methods=None, finetuners=None, datasets=None) -> Filters:
    pairs = []
    for item in _split(datasets):
        parts = [p.strip() for p in item.split(":")]
        if len(parts) == 1:
            pairs.append((parts[0], parts[0]))
        elif len(parts) == 2 and all(parts):
            pairs.append((parts[0], parts[1]))
        else:
            raise BenchError(f"dataset {item!r} must be NAME or SOURCE:TARGET (e.g. cifar10, cifar10:stl10, *:stl10)")
    return Filters(_split(methods), _split(finetuners), pairs)


@dataclass
class Results:
    """Everything the report shows of one results folder."""

    root: Path
    cells: dict[CellKey, Cell]
    missing: list[Missing]
    notes: list[str]
    n_records: int
    evaluate_records: int
    others: dict[str, list[Record]] = field(default_factory=dict)  # done records of other stages, by kind
    records: dict[str, Record] = field(default_factory=dict)  # every done record, by key (the jobs upstream)
    # cells of the threat models other than L-inf (eval.norm), by norm: {"L2": {CellKey: Cell}};
    # `cells` holds the L-inf ones, which the paper's tables show (bench.report.extras renders these)
    threat_cells: dict[str, dict[CellKey, Cell]] = field(default_factory=dict)

    @property
    def shown_records(self) -> int:
        return sum(len(c.records) for c in self.cells.values())

    @property
    def store(self) -> Store:
        return Store(self.root)

    @property
    def label(self) -> str:
        return str(self.root)

    def pairs(self) -> list[tuple[str, str]]:
        return paper.order_pairs(c.pair for c in self.cells.values())

    def methods(self) -> list[str]:
        return paper.order_methods(c.method for c in self.cells.values())

    def finetuners(self) -> list[str]:
        return paper.order_finetuners(c.finetuner for c in self.cells.values())

    def get(self, method: str, finetuner: str, source: str, target: str) -> Cell | None:
        return self.cells.get((method, finetuner, source, target))

    def method_label(self, method: str) -> str:
        """The row label of a method: the paper's name, or an outside model's name marked as outside
        with its format (`bench evaluate --name`, bench.report.outside)."""
        from bench.report.outside import outside_label

        return outside_label(self, method) or paper.method_label(method)

    def protocols(self) -> list[str]:
        """Distinct evaluation protocols of the shown cells, in words, each with the datasets it was used on."""
        out: dict[str, list[str]] = {}
        for cell in self.cells.values():
            ra, sa, aa = cell.metrics["ra"], cell.metrics["sa"], cell.metrics["aa"]
            parts = []
            if sa is not None:
                parts.append(f"SA n={sa.n_label}")
            if ra is not None:
                p = ra.protocol
                parts.append(f"RA PGD-{p.get('steps', '?')} eps {_num(p.get('eps_255'))}/255 alpha "
                             f"{_num(p.get('alpha_255'))}/255, {p.get('restarts', 1)} restart(s), n={ra.n_label}")
            if aa is not None:
                p = aa.protocol
                parts.append(f"AA AutoAttack {p.get('aa_version', '?')} eps {_num(p.get('eps_255'))}/255, "
                             f"n={aa.n_label}")
            else:
                parts.append("AA not run")
            where = out.setdefault("; ".join(parts), [])
            label = paper.pair_label(cell.source, cell.target)
            if label not in where:
                where.append(label)
        return [f"{', '.join(where)}: {text}" for text, where in out.items()]


def _num(x: Any) -> str:
    if isinstance(x, (int, float)):
        return f"{x:g}"
    return "?"


def threat_model(record: Record) -> str:
    """The norm an evaluate record's RA and AA are in (eval.norm; records from before it: L-inf)."""
    return str((record.config.get("eval") or {}).get("norm", "Linf"))


def _fingerprint(record: Record) -> str:
    return json.dumps(record.config, sort_keys=True, default=str)


def _finished(record: Record) -> float:
    prov = record.provenance or {}
    run = prov.get("run") if isinstance(prov.get("run"), dict) else prov
    value = run.get("finished") if isinstance(run, dict) else None
    return float(value) if isinstance(value, (int, float)) else 0.0


def load_results(root: Path | str | None, filters: Filters | None = None) -> Results:
    """Read every job folder of `root`. Raises BenchError when it holds no job folder at all, or when the
    filters match none of its evaluate records; a folder of failed or unfinished jobs only gives Results
    without cells, whose `missing` says what happened."""
    store = Store(root)
    root = store.root
    filters = filters or Filters()
    records: dict[str, Record] = {}
    missing: list[Missing] = []
    notes: list[str] = []
    for key in store.keys():
        job_dir = store.job(key)
        if not job_dir.record_path.exists() and not job_dir.job() and kind_of(key) == "?":
            continue  # not a job folder (e.g. a report written inside the results folder)
        state = job_dir.state()
        if state.name == DONE:
            records[key] = state.record
        else:
            missing.append(_missing(job_dir))
    if not records and not missing:
        raise BenchError(f"no results in {root}; run `bench run` first")
    others: dict[str, list[Record]] = {}
    for r in records.values():
        if r.kind not in CORE_KINDS and filters.match(r.method, r.finetuner, r.source, r.target):
            others.setdefault(r.kind, []).append(r)

    evaluate = [r for r in records.values() if r.kind == "evaluate"]
    if not evaluate:
        missing = [m for m in missing if filters.match(m.method, m.finetuner, m.source, m.target)]
        return Results(root, {}, missing, notes, len(records), 0, others, records)
    # a record whose inputs are gone is still a result, but say so
    for r in evaluate:
        ft = r.inputs.get("classifier")
        if ft and ft not in records and not (root / ft).is_dir():
            notes.append(f"{r.key}: its finetune job {ft} is not in {root} (copied results?)")

    shown = [r for r in evaluate if filters.match(r.method, r.finetuner, r.source, r.target)]
    if not shown:
        raise BenchError(f"no results in {root} match {filters.describe()} "
                         f"({len(evaluate)} evaluate records in all)")
    _check_filters(filters, evaluate, notes)
    # The threat model separates results: an L2 and an L-inf evaluation of one classifier are two
    # results (threat_cells), not two configurations of which one is shown. A classifier evaluated
    # as given (`bench evaluate` without --finetune) has the finetuner "none".
    groups: dict[tuple[str, CellKey], list[Record]] = {}
    for r in shown:
        key = (r.method or "?", r.finetuner or "none", r.source or r.target or "?", r.target or r.source or "?")
        groups.setdefault((threat_model(r), key), []).append(r)
    cells: dict[CellKey, Cell] = {}
    threat_cells: dict[str, dict[CellKey, Cell]] = {}
    for (threat, (method, *rest)), rs in groups.items():
        shelf = cells if threat == "Linf" else threat_cells.setdefault(threat, {})
        # each configuration of what produced the classifiers is its own labelled row (variants)
        for setup in split_setups(rs, records):
            key = (paper.row_name(method, setup.label), *rest)
            shelf[key] = _cell(key, setup.records, notes, setup.label, setup.settings)
    missing = [m for m in missing if filters.match(m.method, m.finetuner, m.source, m.target)]
    return Results(root, cells, missing, notes, len(records), len(evaluate), others, records, threat_cells)


def _cell(key: CellKey, records: list[Record], notes: list[str], variant: str | None,
          settings: dict[str, Any]) -> Cell:
    """The cell of one row's records: of several evaluate configurations, the one with the most seeds."""
    configs: dict[str, list[Record]] = {}
    for r in records:
        configs.setdefault(_fingerprint(r), []).append(r)
    chosen = max(configs.values(), key=lambda rs: (len(rs), max(_finished(r) for r in rs)))
    if len(configs) > 1:
        others = [r.key for rs in configs.values() if rs is not chosen for r in rs]
        notes.append(f"{paper.method_label(key[0])} / {paper.finetuner_label(key[1])} / "
                     f"{paper.pair_label(key[2], key[3])}: records from {len(configs)} different "
                     f"configurations; showing the one with seeds {sorted(r.seed for r in chosen)}, "
                     f"leaving out {', '.join(others)}")
    by_seed: dict[int, Record] = {}
    for r in sorted(chosen, key=_finished):
        by_seed[r.seed] = r
    return Cell(*key, records=list(by_seed.values()), variant=variant, settings=settings)


def _check_filters(filters: Filters, evaluate: list[Record], notes: list[str]) -> None:
    methods = {r.method for r in evaluate}
    finetuners = {r.finetuner for r in evaluate}
    for m in filters.methods:
        if m not in methods:
            notes.append(f"--methods {m}: no results for this method")
    for f in filters.finetuners:
        if f not in finetuners:
            notes.append(f"--finetune {f}: no results for this finetuner")
    for s, t in filters.datasets:
        if not any((s in ("*", r.source)) and (t in ("*", r.target)) for r in evaluate):
            notes.append(f"--datasets {s if s == t else f'{s}:{t}'}: no results for this dataset")


def missing_summary(missing: list[Missing]) -> str:
    """"3 job(s) without a usable record: 1 failed, 2 blocked"."""
    counts: dict[str, int] = {}
    for m in missing:
        counts[m.state] = counts.get(m.state, 0) + 1
    return f"{len(missing)} job(s) without a usable record: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


# ---------------------------------------------------------------- the artifact chain (for t-SNE)


def encoder_of(results: Results, record: Record) -> tuple[JobDir | None, Record | None, str]:
    """evaluate -> finetune -> the job that provided its encoder: (that job's folder, its record, why not found)."""
    store = results.store
    ft_key = record.inputs.get("classifier")
    if not ft_key:
        return None, None, f"{record.key} names no classifier input"
    ft = store.read(ft_key)
    if ft is not None and ft.kind == "checkpoint":  # bench evaluate of an outside classifier, as given
        return None, None, f"{ft_key} is an outside classifier evaluated as given: no encoder job of its own"
    enc_key = ft.inputs.get("encoder") if ft is not None else (store.job(ft_key).job().get("deps") or {}).get("encoder")
    if not enc_key:
        return None, None, f"finetune job {ft_key} (input of {record.key}) has no record naming its encoder job"
    job_dir = store.job(enc_key)
    state = job_dir.state()
    if not state.done:
        return None, None, f"the encoder job {enc_key} is {state.name}" + (f" ({state.reason})" if state.reason else "")
    return job_dir, state.record, ""
