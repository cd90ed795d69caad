"""Expansion of a run request into a graph of jobs with dependencies.

methods x finetuners x (source dataset -> target dataset) x seeds becomes, per cell,

    [pseudo_labels] -> pretrain(method, source, seed) -> finetune(finetuner, target) -> evaluate

Each job carries only the config sections it depends on, and its key is a readable prefix plus
a hash of everything that determines its result (kind, sections, the keys of its inputs, the
datasets, the seed, the code version). Identical jobs get identical keys and are deduplicated:
a pretrained encoder is computed once and reused by every finetuner and target dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import bench
from bench import config as cfgmod
from bench.errors import BenchError
from bench.jobs import Job

# Bump when a change in the code changes results: every job key changes, so nothing stale is reused.
CODE_VERSION = 1
HASH_CHARS = 12


# ---------------------------------------------------------------- keys


def code_version() -> str:
    return f"{bench.__version__}+{CODE_VERSION}"


def job_hash(kind: str, config: dict[str, Any], deps: dict[str, str], source: str | None,
             target: str | None, seed: int, method: str | None = None, finetuner: str | None = None) -> str:
    payload = {"kind": kind, "config": config, "deps": deps, "source": source, "target": target,
               "seed": seed, "method": method, "finetuner": finetuner, "code": code_version()}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]


def _datasets_part(source: str | None, target: str | None) -> str:
    if source and target and source != target:
        return f"{source}-{target}"
    return source or target or "none"


def make_job(kind: str, *, seed: int, config: dict[str, Any], deps: dict[str, str] | None = None,
             method: str | None = None, finetuner: str | None = None, source: str | None = None,
             target: str | None = None, data_dir: str | None = None, label: str | None = None) -> Job:
    """Build a job and its key: `<kind>-<names>-<datasets>-s<seed>-<hash>`."""
    deps = dict(deps or {})
    digest = job_hash(kind, config, deps, source, target, seed, method, finetuner)
    names = [n for n in (label or method, finetuner) if n]
    parts = [kind, *names, _datasets_part(source, target), f"s{seed}", digest]
    key = "-".join(p.replace("/", "_") for p in parts)
    return Job(kind=kind, key=key, seed=seed, method=method, finetuner=finetuner, source=source,
               target=target, config=config, deps=deps, data_dir=data_dir)


# ---------------------------------------------------------------- the graph


@dataclass
class Graph:
    """Jobs in a topological order (every job after the jobs it depends on)."""

    jobs: dict[str, Job] = field(default_factory=dict)

    def add(self, job: Job) -> Job:
        existing = self.jobs.get(job.key)
        if existing is not None:
            if _job_dict(existing) != _job_dict(job):  # same hash, different content: a bug
                raise RuntimeError(f"two different jobs share the key {job.key}")
            return existing
        for dep in job.deps.values():
            if dep not in self.jobs:
                raise RuntimeError(f"job {job.key} depends on {dep}, which is not in the graph yet")
        self.jobs[job.key] = job
        return job

    def __len__(self) -> int:
        return len(self.jobs)

    def __iter__(self) -> Iterator[Job]:
        return iter(self.jobs.values())

    def __contains__(self, key: str) -> bool:
        return key in self.jobs

    def __getitem__(self, key: str) -> Job:
        return self.jobs[key]

    def keys(self) -> list[str]:
        return list(self.jobs)

    def deps(self, key: str) -> list[str]:
        return list(dict.fromkeys(self.jobs[key].deps.values()))

    def dependents(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {k: [] for k in self.jobs}
        for job in self.jobs.values():
            for dep in dict.fromkeys(job.deps.values()):
                if dep in out:
                    out[dep].append(job.key)
        return out

    def descendants(self, key: str) -> list[str]:
        """Every job that needs `key`, directly or not, in topological order."""
        children = self.dependents()
        seen: set[str] = set()
        stack = [key]
        while stack:
            for child in children.get(stack.pop(), []):
                if child not in seen:
                    seen.add(child)
                    stack.append(child)
        return [k for k in self.jobs if k in seen]

    def depth(self) -> dict[str, int]:
        """Length of the longest chain of jobs starting at each job (scheduling priority)."""
        children = self.dependents()
        out: dict[str, int] = {}
        for key in reversed(list(self.jobs)):
            out[key] = 1 + max((out[c] for c in children[key]), default=0)
        return out

    def subgraph(self, keys: Iterable[str]) -> "Graph":
        """The jobs in `keys`; dependencies outside it are taken as satisfied."""
        wanted = set(keys)
        return Graph({k: j for k, j in self.jobs.items() if k in wanted})

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for job in self.jobs.values():
            out[job.kind] = out.get(job.kind, 0) + 1
        return out


def _job_dict(job: Job) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(job), sort_keys=True, default=list))


def job_to_dict(job: Job) -> dict[str, Any]:
    return _job_dict(job)


def job_from_dict(data: dict[str, Any]) -> Job:
    names = {f.name for f in dataclasses.fields(Job)}
    return Job(**{k: v for k, v in data.items() if k in names})


# ---------------------------------------------------------------- the request


@dataclass
class Request:
    """What to run, before expansion: names, dataset pairs, seeds and dotted settings."""

    methods: list[str]
    finetuners: list[str]
    datasets: list[tuple[str, str]]  # (source, target)
    seeds: list[int]
    settings: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None
    data_dir: str | None = None


def split_list(value: str | Iterable[Any] | None) -> list[str] | None:
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(item).strip() for item in items if str(item).strip()]


def parse_dataset(item: str) -> tuple[str, str]:
    parts = [p.strip() for p in str(item).split(":")]
    if len(parts) == 1 and parts[0]:
        return parts[0], parts[0]
    if len(parts) == 2 and all(parts):
        return parts[0], parts[1]
    raise BenchError(f"dataset {item!r} must be NAME or SOURCE:TARGET (e.g. cifar10 or cifar10:stl10)")


def parse_seeds(items: list[str]) -> list[int]:
    seeds = []
    for item in items:
        try:
            seed = int(item)
        except (TypeError, ValueError):
            raise BenchError(f"seed {item!r} is not an integer (e.g. --seeds 0,1,2)") from None
        if seed < 0:
            raise BenchError(f"seed {seed} must be >= 0")
        seeds.append(seed)
    return list(dict.fromkeys(seeds))


def build_request(*, preset: str | None = None, methods: str | list[str] | None = None,
                  finetune: str | list[str] | None = None, datasets: str | list[str] | None = None,
                  seeds: str | list[Any] | None = None, overrides: Iterable[str] = (),
                  config_path: str | Path | None = None, data_dir: str | None = None) -> Request:
    """Combine a preset of bench.toml (grid and `set` table) with flags and key=value overrides."""
    grid: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    if preset is not None:
        table = cfgmod.get_preset(preset, cfgmod.find_config_file(config_path))
        grid = {k: v for k, v in table.items() if k != "set"}
        settings.update(cfgmod.flatten(table.get("set", {})))
    elif config_path is not None:
        cfgmod.find_config_file(config_path)  # a named config file must exist
    settings.update(cfgmod.parse_overrides(overrides))
    m = split_list(methods) if methods is not None else split_list(grid.get("methods"))
    f = split_list(finetune) if finetune is not None else split_list(grid.get("finetune"))
    d = split_list(datasets) if datasets is not None else split_list(grid.get("datasets"))
    s = split_list(seeds) if seeds is not None else split_list(grid.get("seeds", [0]))
    if not m:
        raise BenchError("no methods to run: pass --methods a,b or --preset NAME (see bench.toml)")
    if not d:
        raise BenchError("no datasets to run on: pass --datasets cifar10[,cifar10:stl10] or --preset NAME")
    return Request(methods=list(dict.fromkeys(m)), finetuners=list(dict.fromkeys(f or [])),
                   datasets=list(dict.fromkeys(parse_dataset(x) for x in d)), seeds=parse_seeds(s or ["0"]),
                   settings=settings, preset=preset,
                   data_dir=str(Path(data_dir).resolve()) if data_dir else None)


# ---------------------------------------------------------------- expansion


def _section(resolved: cfgmod.Resolved, name: str) -> dict[str, dict[str, Any]]:
    """{name: values} for a plugin that has settings, {} for one that has none."""
    if name in resolved.sections:
        return {name: cfgmod.to_dict(resolved.sections[name])}
    return {}


def _shared(resolved: cfgmod.Resolved, *names: str) -> dict[str, dict[str, Any]]:
    return {n: cfgmod.to_dict(resolved.sections[n]) for n in names}


def validate(request: Request) -> cfgmod.Resolved:
    """Check every name and setting; return the resolved config of every plugin the run may need."""
    from bench.registry import DATASETS, FINETUNERS, METHODS

    for name in request.methods:
        METHODS.get(name)
    for name in request.finetuners:
        FINETUNERS.get(name)
    for source, target in request.datasets:
        DATASETS.get(source)
        DATASETS.get(target)
    # Resolve with every registered plugin so that dependencies (e.g. the SimCLR model AdvCL's
    # pseudo-labels come from) have their sections too.
    plugins = [*METHODS.names(), *FINETUNERS.names(), *DATASETS.names()]
    return cfgmod.resolve(request.settings, plugins)


def expand(request: Request, resolved: cfgmod.Resolved | None = None) -> Graph:
    """The job graph of a request (validating it first when `resolved` is not given)."""
    from bench.registry import METHODS

    resolved = resolved or validate(request)
    graph = Graph()
    data_dir = request.data_dir

    def pretrain(method: str, source: str, seed: int) -> Job:
        plugin = METHODS.get(method)
        method_cfg = resolved.sections.get(method)
        deps: dict[str, str] = {}
        needs = plugin.dependencies(method_cfg) if hasattr(plugin, "dependencies") else {}
        for role, params in (needs or {}).items():
            if role != "pseudo_labels":
                raise BenchError(f"method {method} needs {role!r}, which no job kind provides")
            deps[role] = pseudo_labels(dict(params or {}), source, seed).key
        config = {**_shared(resolved, "encoder", "data"), **_section(resolved, method), **_section(resolved, source)}
        return graph.add(make_job("pretrain", seed=seed, config=config, deps=deps, method=method,
                                  source=source, data_dir=data_dir))

    def pseudo_labels(params: dict[str, Any], source: str, seed: int) -> Job:
        origin = params.get("source")
        config: dict[str, Any] = {"pseudo_labels": params, **_shared(resolved, "encoder", "data"),
                                  **_section(resolved, source)}
        deps: dict[str, str] = {}
        if not params.get("file") and isinstance(origin, str) and origin in METHODS:
            config.update(_section(resolved, origin))
            deps["pretrain"] = pretrain(origin, source, seed).key
        label = origin if isinstance(origin, str) and origin else ("file" if params.get("file") else None)
        return graph.add(make_job("pseudo_labels", seed=seed, config=config, deps=deps, source=source,
                                  data_dir=data_dir, label=label))

    for method in request.methods:
        for source, target in request.datasets:
            for seed in request.seeds:
                pre = pretrain(method, source, seed)
                for finetuner in request.finetuners:
                    ft_config = {**_shared(resolved, "encoder", "data", "eval"), **_section(resolved, finetuner),
                                 **_section(resolved, target)}
                    ft = graph.add(make_job("finetune", seed=seed, config=ft_config, deps={"pretrain": pre.key},
                                            method=method, finetuner=finetuner, source=source, target=target,
                                            data_dir=data_dir))
                    # `data` too: how the test split is loaded (download allowed or not)
                    ev_config = {**_shared(resolved, "eval", "data"), **_section(resolved, target)}
                    graph.add(make_job("evaluate", seed=seed, config=ev_config, deps={"finetune": ft.key},
                                       method=method, finetuner=finetuner, source=source, target=target,
                                       data_dir=data_dir))
    return graph


def plan(**kwargs: Any) -> tuple[Request, Graph]:
    """build_request(**kwargs) + validation + expansion: raises BenchError before any work."""
    request = build_request(**kwargs)
    return request, expand(request)
