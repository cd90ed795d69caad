"""Expansion of a run request into a graph of jobs with dependencies.

methods x finetuners x (source dataset -> target dataset) x seeds becomes, per cell,

    [pseudo_labels] -> pretrain(method, source, seed) -> finetune(finetuner, target) -> evaluate

Each job carries only the config sections it depends on, and its key is a readable prefix plus
a hash of everything that determines its result (kind, settings, the keys of its inputs, the
datasets, the seed, and a fingerprint of the code it runs). Identical jobs get identical keys and
are deduplicated: a pretrained encoder is computed once and reused by every finetuner and target.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import bench
from bench import config as cfgmod
from bench.errors import BenchError
from bench.jobs import Job, job_to_dict

HASH_CHARS = 12


# ---------------------------------------------------------------- code fingerprints

# The harness code (files and packages of bench/) each kind of job runs besides its plugins. A
# job's key covers this code and its plugins' modules, so a code change re-runs exactly the jobs
# it can affect, and their dependents through their input keys.
_TRAINING = ("config.py", "datasets", "models", "augment.py", "frequency.py", "attacks", "losses.py", "train")
HARNESS = {
    "pretrain": (*_TRAINING, "method.py", "pretrain.py"),
    "pseudo_labels": (*_TRAINING, "clusterfit.py"),
    "finetune": (*_TRAINING, "finetune.py", "finetuners/base.py", "evaluate.py"),  # selection uses evaluate's PGD
    "evaluate": ("config.py", "datasets", "models", "attacks", "evaluate.py"),
}
_digests: dict[tuple[str, int, int], str] = {}  # (path, mtime, size) -> digest: each file parsed once per process


def source_digest(path: str | Path) -> str:
    """Hash of a Python file's code: its AST without docstrings, so comments, docstrings and
    formatting do not count. A file that does not parse is hashed as bytes."""
    path = Path(path)
    stat = path.stat()
    cache_key = (str(path), stat.st_mtime_ns, stat.st_size)
    if cache_key not in _digests:
        data = path.read_bytes()
        try:
            tree = ast.parse(data)
        except (SyntaxError, ValueError):
            text = data
        else:
            for node in ast.walk(tree):
                body = getattr(node, "body", None)
                if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                        and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                        and isinstance(body[0].value.value, str)):
                    node.body = body[1:] or [ast.Pass()]
            text = ast.dump(tree).encode()
        _digests[cache_key] = hashlib.sha256(text).hexdigest()
    return _digests[cache_key]


@functools.cache
def _harness_files(kind: str) -> tuple[tuple[str, Path], ...]:
    root = Path(bench.__file__).resolve().parent
    out: dict[str, Path] = {}
    for name in HARNESS.get(kind, ()):
        path = root / name
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            out[file.relative_to(root).as_posix()] = file
    return tuple(out.items())


def harness_files(kind: str) -> dict[str, Path]:
    """{path relative to bench/: file} of the harness code a job of `kind` runs (listed once per process)."""
    return dict(_harness_files(kind))


def plugin_files(plugin: Any) -> dict[str, Path]:
    """{module name: file} of a plugin and of the base classes it inherits from its own package,
    bench or methods (third-party plugins from entry points are covered the same way)."""
    classes = getattr(plugin, "__mro__", (plugin,))
    own = {str(getattr(plugin, "__module__", "")).partition(".")[0], "bench", "methods"}
    out: dict[str, Path] = {}
    for cls in classes:
        name = getattr(cls, "__module__", None)
        file = getattr(sys.modules.get(name or ""), "__file__", None)
        if name and file and name.partition(".")[0] in own and file.endswith(".py"):
            out[name] = Path(file)
    return out


def code_fingerprint(kind: str, plugins: Iterable[Any] = ()) -> str:
    """Digest of the code that determines the output of a `kind` job using `plugins`."""
    files = harness_files(kind)
    for plugin in plugins:
        files.update(plugin_files(plugin))
    digests = {name: source_digest(path) for name, path in sorted(files.items())}
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def job_plugins(kind: str, method: str | None, finetuner: str | None, source: str | None,
                target: str | None) -> list[Any]:
    """The registered plugins whose code a job runs: its method or finetuner and its dataset."""
    from bench.registry import DATASETS, FINETUNERS, METHODS

    names = {"pretrain": [(METHODS, method), (DATASETS, source)],
             "pseudo_labels": [(DATASETS, source)],
             "finetune": [(FINETUNERS, finetuner), (DATASETS, target)],
             "evaluate": [(DATASETS, target)]}.get(kind, [])
    return [registry.get(name) for registry, name in names if name]


# ---------------------------------------------------------------- keys

# Settings that change how a job runs but not what it computes: the job carries them (its worker
# needs them), its key leaves them out, so changing them reuses every result. Downloading or
# reading the cache gives the same images; resume is exact, so checkpoint frequency changes nothing.
NOT_IN_KEY = frozenset({"download", "checkpoint_every"})


def key_settings(config: dict[str, Any]) -> dict[str, Any]:
    return {section: ({k: v for k, v in values.items() if k not in NOT_IN_KEY} if isinstance(values, dict)
                      else values) for section, values in config.items()}


def job_hash(kind: str, config: dict[str, Any], deps: dict[str, str], source: str | None,
             target: str | None, seed: int, method: str | None = None, finetuner: str | None = None,
             code: str = "") -> str:
    payload = {"kind": kind, "config": key_settings(config), "deps": deps, "source": source, "target": target,
               "seed": seed, "method": method, "finetuner": finetuner, "code": code}
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
    code = code_fingerprint(kind, job_plugins(kind, method, finetuner, source, target))
    digest = job_hash(kind, config, deps, source, target, seed, method, finetuner, code)
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
            if job_to_dict(existing) != job_to_dict(job):  # same hash, different content: a bug
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


def _data(resolved: cfgmod.Resolved, dataset: str) -> dict[str, dict[str, Any]]:
    """The `data` section for jobs reading `dataset`, with val_size as the number of images used
    (the dataset's own size unless overridden), so keys and records name the actual split."""
    from bench.datasets import resolve_val_size

    section = cfgmod.to_dict(resolved.sections["data"])
    section["val_size"] = resolve_val_size(dataset, section["val_size"], resolved.sections.get(dataset))
    return {"data": section}


# The eval settings a finetune job uses: model selection (bench/finetune.py, Finetuner.validate)
# measures SA and PGD robustness on the first val_n validation images. The rest (n, aa_n, sweeps,
# steps, restarts, ...) belong to the evaluate job only, so adding AutoAttack images retrains nothing.
# batch_size stays: the PGD random starts come from one generator consumed batch by batch, which
# gives the same noise for any batch size on the CPU but not on CUDA (Philox offsets advance per
# call), and GPU kernels may reduce differently per batch size; either can change the selected
# epoch. (For the same reasons, and because AutoAttack reseeds every batch, evaluate keeps it too.)
SELECTION_EVAL = ("val_n", "eps", "alpha", "selection_steps", "seed", "batch_size")


def _selection(resolved: cfgmod.Resolved) -> dict[str, dict[str, Any]]:
    values = cfgmod.to_dict(resolved.sections["eval"])
    return {"eval": {k: values[k] for k in SELECTION_EVAL}}


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
        config = {**_shared(resolved, "encoder"), **_data(resolved, source), **_section(resolved, method),
                  **_section(resolved, source)}
        return graph.add(make_job("pretrain", seed=seed, config=config, deps=deps, method=method,
                                  source=source, data_dir=data_dir))

    def pseudo_labels(params: dict[str, Any], source: str, seed: int) -> Job:
        origin = params.get("source")
        config: dict[str, Any] = {"pseudo_labels": params, **_shared(resolved, "encoder"),
                                  **_data(resolved, source), **_section(resolved, source)}
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
                    ft_config = {**_shared(resolved, "encoder"), **_data(resolved, target), **_selection(resolved),
                                 **_section(resolved, finetuner), **_section(resolved, target)}
                    ft = graph.add(make_job("finetune", seed=seed, config=ft_config, deps={"pretrain": pre.key},
                                            method=method, finetuner=finetuner, source=source, target=target,
                                            data_dir=data_dir))
                    # `data` too: how the test split is loaded (download allowed or not)
                    ev_config = {**_shared(resolved, "eval"), **_data(resolved, target), **_section(resolved, target)}
                    graph.add(make_job("evaluate", seed=seed, config=ev_config, deps={"finetune": ft.key},
                                       method=method, finetuner=finetuner, source=source, target=target,
                                       data_dir=data_dir))
    return graph


def plan(**kwargs: Any) -> tuple[Request, Graph]:
    """build_request(**kwargs) + validation + expansion: raises BenchError before any work."""
    request = build_request(**kwargs)
    return request, expand(request)


# ---------------------------------------------------------------- the data a graph reads

# Which source split each kind of job reads (validation images come from the training split).
SPLIT_READ = {"pseudo_labels": ("source", "train"), "pretrain": ("source", "train"),
              "finetune": ("target", "train"), "evaluate": ("target", "test")}


def data_needed(graph: Graph, done: Callable[[str], bool] = lambda key: False
                ) -> list[tuple[str, str, Path, bool, dict[str, Any]]]:
    """(dataset, split, data dir, downloads allowed, dataset settings) read by the jobs not `done`."""
    from bench.datasets import default_data_dir

    out: dict[tuple[str, str, Path], tuple[str, str, Path, bool, dict[str, Any]]] = {}
    for job in graph:
        if job.kind not in SPLIT_READ or done(job.key):
            continue
        role, split = SPLIT_READ[job.kind]
        name = getattr(job, role)
        root = Path(job.data_dir) if job.data_dir else default_data_dir()
        download = bool(job.config.get("data", {}).get("download", True))
        out.setdefault((name, split, root), (name, split, root, download, job.config.get(name) or {}))
    return list(out.values())


def check_data(graph: Graph, *, fetch: bool = True, done: Callable[[str], bool] = lambda key: False) -> list[str]:
    """Make sure every dataset split the pending jobs read can be read, before any job is written.

    Missing splits are downloaded here, in the planning process, when downloads are allowed, so a
    failed download is bad input (BenchError) rather than a failed job. With `fetch=False` (a dry
    run) nothing is downloaded: the returned notes say what the run would download.
    """
    from bench import datasets
    from bench.registry import DATASETS

    missing = []
    for name, split, root, download, settings in data_needed(graph, done):
        plugin = DATASETS.get(name)
        cfg = cfgmod.from_dict(plugin.Config, settings, name) if plugin.Config else None
        if not datasets.available(name, split, data_dir=root, cfg=cfg):
            missing.append((name, split, root, download, cfg))
    offline = [(name, split, root) for name, split, root, download, _ in missing if not download]
    if offline:  # one message for every split that cannot be had
        root = offline[0][2]
        raise datasets.DataUnavailable([(name, split) for name, split, r in offline if r == root], root)
    if not fetch:
        return [f"{name} {split} is not in {root}: the run downloads it first" for name, split, root, _, _ in missing]
    for i, (name, split, root, _, cfg) in enumerate(missing):
        try:
            datasets.download(name, split, data_dir=root, cfg=cfg)
        except datasets.DataUnavailable as exc:
            if exc.download_error is None:
                raise
            # the splits still to fetch are missing too: name them all in the one message
            rest = [(n, s) for n, s, r, _, _ in missing[i:] if r == root]
            raise datasets.DataUnavailable(rest, root, exc.download_error) from None
    return []
