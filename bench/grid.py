"""Expansion of a run request into a graph of jobs with dependencies.

methods x finetuners x (source dataset -> target dataset) x seeds becomes, per cell,

    [method dependencies] -> pretrain -> [post-processing stages] -> finetune -> evaluate [+ stages]

Every job is planned by its stage (`bench.stages`): the stage picks the config sections the job
depends on and asks the `Planner` for the jobs it needs (a method's dependencies name a stage
and its parameters). The planner makes each job's key: a readable prefix plus a hash of
everything that determines its result — kind, settings, the keys of its inputs, the datasets,
the seed, the content fingerprint of the data it reads, and the fingerprint of the code it runs
(`bench.fingerprint`). Identical jobs get identical keys and are one job: a pretrained encoder
is computed once and reused by every finetuner and target.

Variants (`Request.variants`: `--vary advcl.views=4,7`, or a preset's named variants) are a grid
axis: each is planned with its own resolved config into the same graph, so the jobs they have in
common (a pseudo-label job, a SimCLR pretraining, the data fingerprints) are one job. The variant
label rides on each job (`Job.variant`, `Record.variant`) and is never part of a key; a job that
several variants share carries none.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from bench import config as cfgmod
from bench.errors import BenchError
from bench.fingerprint import code_fingerprint
from bench.jobs import Job, job_to_dict
from bench.stages.base import Cell, Stage, get_stage

HASH_CHARS = 12

# Settings that change how a job runs but not what it computes: the job carries them (its worker
# needs them), its key leaves them out, so changing them reuses every result. Downloading or
# reading the cache gives the same images; resume is exact, so checkpoint frequency changes nothing.
NOT_IN_KEY = frozenset({"download", "checkpoint_every",
                        # fast paths and monitoring (bench.train.fastpath, bench.train.knn): float-level only
                        "channels_last", "cudnn_benchmark", "compile", "knn_every", "knn_images"})
# Settings left out of the key at the value that computes what every job computed before they
# existed, so adding them re-keys nothing (per-device BatchNorm, bench.train.distributed).
KEY_DEFAULTS = {"bn_devices": 0}

# --methods accepts these besides method names; a method joins a named group through its `groups`.
ALL_METHODS = "all"


# ---------------------------------------------------------------- keys


def key_settings(config: dict[str, Any]) -> dict[str, Any]:
    def kept(k: str, v: Any) -> bool:
        return k not in NOT_IN_KEY and not (k in KEY_DEFAULTS and v == KEY_DEFAULTS[k])

    return {section: ({k: v for k, v in values.items() if kept(k, v)} if isinstance(values, dict)
                      else values) for section, values in config.items()}


def job_hash(kind: str, config: dict[str, Any], deps: dict[str, str], source: str | None, target: str | None,
             seed: int, method: str | None = None, finetuner: str | None = None, code: str = "",
             data: dict[str, Any] | None = None) -> str:
    payload = {"kind": kind, "config": key_settings(config), "deps": deps, "source": source, "target": target,
               "seed": seed, "method": method, "finetuner": finetuner, "code": code, "data": data or {}}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]


def _datasets_part(source: str | None, target: str | None) -> str:
    if source and target and source != target:
        return f"{source}-{target}"
    return source or target or "none"


def make_job(kind: str, *, seed: int, config: dict[str, Any], deps: dict[str, str] | None = None,
             method: str | None = None, finetuner: str | None = None, source: str | None = None,
             target: str | None = None, variant: str | None = None, data_dir: str | None = None,
             label: str | None = None, plugins: Iterable[Any] = (), data: dict[str, Any] | None = None) -> Job:
    """A job of stage `kind` and its key: `<kind>-<names>-<datasets>-s<seed>-<hash>`. The hash
    covers the code of the stage and of `plugins` and the fingerprint of `data`."""
    from bench.registry import STAGES

    deps = dict(deps or {})
    code = code_fingerprint([STAGES.get(kind), *plugins])
    digest = job_hash(kind, config, deps, source, target, seed, method, finetuner, code, data)
    names = [n for n in (label or method, finetuner) if n]
    parts = [kind, *names, _datasets_part(source, target), f"s{seed}", digest]
    key = "-".join(p.replace("/", "_") for p in parts)
    return Job(kind=kind, key=key, seed=seed, method=method, finetuner=finetuner, source=source, target=target,
               variant=variant, config=config, deps=deps, data=dict(data or {}), data_dir=data_dir)


# ---------------------------------------------------------------- the graph


def _content(job: Job) -> dict[str, Any]:
    """What makes two jobs the same job (the variant label is only a label)."""
    return {k: v for k, v in job_to_dict(job).items() if k != "variant"}


@dataclass
class Graph:
    """Jobs in a topological order (every job after the jobs it depends on)."""

    jobs: dict[str, Job] = field(default_factory=dict)

    def add(self, job: Job) -> Job:
        existing = self.jobs.get(job.key)
        if existing is not None:
            if _content(existing) != _content(job):  # same hash, different content: a bug
                raise RuntimeError(f"two different jobs share the key {job.key}")
            if existing.variant != job.variant:  # shared by several variants: it belongs to none of them
                existing = self.jobs[job.key] = dataclasses.replace(existing, variant=None)
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
    """What to run, before expansion: names, dataset pairs, seeds, extra stages and dotted settings."""

    methods: list[str]
    finetuners: list[str]
    datasets: list[tuple[str, str]]  # (source, target)
    seeds: list[int]
    settings: dict[str, Any] = field(default_factory=dict)
    stages: list[str] = field(default_factory=list)  # request-level stages beside evaluate
    preset: str | None = None
    data_dir: str | None = None
    variants: list[cfgmod.Variant] = field(default_factory=list)  # none: the one configuration of `settings`
    notes: list[str] = field(default_factory=list)  # what the request left out, and why


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


def method_groups() -> dict[str, list[str]]:
    """Named groups of methods: `all`, and every group a method declares in its `groups`."""
    from bench.registry import METHODS

    groups: dict[str, list[str]] = {ALL_METHODS: METHODS.names()}
    for name, plugin in METHODS.items():
        for group in getattr(plugin, "groups", ()):
            groups.setdefault(group, []).append(name)
    return groups


def expand_methods(names: list[str]) -> list[str]:
    """Method names with groups (`all`, `acl_family`, ...) replaced by their members, in order."""
    from bench.registry import METHODS

    groups = method_groups()
    out: list[str] = []
    for name in names:
        out.extend(groups[name] if name in groups and name not in METHODS else [name])
    return list(dict.fromkeys(out))


def build_request(*, preset: str | None = None, methods: str | list[str] | None = None,
                  finetune: str | list[str] | None = None, datasets: str | list[str] | None = None,
                  seeds: str | list[Any] | None = None, stages: str | list[str] | None = None,
                  overrides: Iterable[str] = (), config_path: str | Path | None = None,
                  data_dir: str | None = None, vary: Iterable[str] = ()) -> Request:
    """Combine a preset of bench.toml (grid, `set` and `variants` tables) with flags and key=value
    overrides. `vary` (`--vary KEY=V1,V2 ...`) replaces the preset's variants: the cartesian product
    of its terms' values, each a variant."""
    grid: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    variants: list[cfgmod.Variant] = []
    notes: list[str] = []
    if preset is not None:
        table = cfgmod.get_preset(preset, cfgmod.find_config_file(config_path))
        grid = {k: v for k, v in table.items() if k not in ("set", "variants")}
        settings.update(cfgmod.flatten(table.get("set", {})))
        variants, notes = cfgmod.preset_variants(table.get("variants", {}), preset)
        if table.get("variants") and not variants:
            raise BenchError(f"preset {preset}: every variant was left out: " + "; ".join(notes))
    elif config_path is not None:
        cfgmod.find_config_file(config_path)  # a named config file must exist
    overridden = cfgmod.parse_overrides(overrides)
    settings.update(overridden)
    vary = [v for v in vary if str(v).strip()]
    if vary:
        variants, notes = cfgmod.parse_vary(vary), []
    clash = sorted({k for v in variants for k in v.settings if k in overridden})
    if clash:
        raise BenchError(f"{', '.join(clash)}: set by an override and by the variants; the variants set it "
                         "(drop the override, or vary it with --vary)")
    m = split_list(methods) if methods is not None else split_list(grid.get("methods"))
    f = split_list(finetune) if finetune is not None else split_list(grid.get("finetune"))
    d = split_list(datasets) if datasets is not None else split_list(grid.get("datasets"))
    s = split_list(seeds) if seeds is not None else split_list(grid.get("seeds", [0]))
    extra = split_list(stages) if stages is not None else split_list(grid.get("stages", []))
    if not m:
        raise BenchError("no methods to run: pass --methods a,b or --preset NAME (see bench.toml)")
    if not d:
        raise BenchError("no datasets to run on: pass --datasets cifar10[,cifar10:stl10] or --preset NAME")
    return Request(methods=expand_methods(m), finetuners=list(dict.fromkeys(f or [])),
                   datasets=list(dict.fromkeys(parse_dataset(x) for x in d)), seeds=parse_seeds(s or ["0"]),
                   settings=settings, stages=list(dict.fromkeys(extra or [])), preset=preset,
                   data_dir=str(Path(data_dir).resolve()) if data_dir else None, variants=variants, notes=notes)


def validate(request: Request) -> cfgmod.Resolved:
    """Check every name and setting (every variant's too); return the resolved config of every plugin
    the run may need (the request's own settings, without its variants')."""
    from bench.registry import DATASETS, FINETUNERS, METHODS

    for name in request.methods:
        METHODS.get(name)
    for name in request.finetuners:
        FINETUNERS.get(name)
    for source, target in request.datasets:
        DATASETS.get(source)
        DATASETS.get(target)
    for name in request.stages:
        stage = get_stage(name)
        if stage.attach not in ("encoder", "classifier"):
            raise BenchError(f"--stages {name}: the {name} stage is not one a grid can add per encoder or per "
                             f"classifier; those are: {', '.join(attachable_stages())}")
    resolved = _resolve(request.settings, request)
    variant_configs(request)  # every variant's settings are checked too
    return resolved


def _resolve(settings: dict[str, Any], request: Request) -> cfgmod.Resolved:
    from bench.registry import DATASETS, FINETUNERS, METHODS, STAGES

    # Resolve with every registered plugin so that dependencies (e.g. the SimCLR model AdvCL's
    # pseudo-labels come from) have their sections too.
    plugins = [*METHODS.names(), *FINETUNERS.names(), *DATASETS.names(), *STAGES.names()]
    resolved = cfgmod.resolve(settings, plugins)
    cfgmod.check_selection(resolved["select"], [METHODS.get(m) for m in request.methods])
    return resolved


def variant_configs(request: Request,
                    resolved: cfgmod.Resolved | None = None) -> list[tuple[str | None, cfgmod.Resolved]]:
    """(label, resolved config) of each variant of the request: its settings over the request's; one
    unlabelled configuration when it has no variants. Two variants that resolve alike are an error."""
    if not request.variants:
        return [(None, resolved or _resolve(request.settings, request))]
    out: list[tuple[str | None, cfgmod.Resolved]] = []
    seen: dict[str, str] = {}
    for variant in request.variants:
        try:
            config = _resolve({**request.settings, **variant.settings}, request)
        except BenchError as exc:
            raise BenchError(f"variant {variant.label!r}: {exc}") from None
        text = json.dumps(config.as_dict(), sort_keys=True, default=list)
        if text in seen:
            raise BenchError(f"variants {seen[text]!r} and {variant.label!r} have the same settings: they would be "
                             "one configuration (drop one)")
        seen[text] = variant.label
        out.append((variant.label, config))
    return out


def attachable_stages() -> list[str]:
    from bench.registry import STAGES

    return [name for name, cls in STAGES.items() if cls.attach in ("encoder", "classifier") and name != "evaluate"]


# ---------------------------------------------------------------- planning


class Planner:
    """What stages plan their jobs with: resolved config sections, data fingerprints, the graph."""

    def __init__(self, resolved: cfgmod.Resolved, graph: Graph, data_dir: str | None,
                 fingerprints: dict[tuple[str, str, str], dict[str, Any]] | None = None):
        self.resolved = resolved
        self.graph = graph
        self.data_dir = data_dir
        self.fingerprints = fingerprints if fingerprints is not None else {}

    # ------------------------------------------------------------ config sections

    def section(self, name: str) -> dict[str, Any]:
        """The values of a shared section or a plugin's section ({} for a plugin without settings)."""
        if name in self.resolved.sections:
            return cfgmod.to_dict(self.resolved.sections[name])
        return {}

    def sections(self, *names: str) -> dict[str, dict[str, Any]]:
        """{name: values} of each named section that has settings."""
        return {n: self.section(n) for n in names if n in self.resolved.sections}

    def plugin_section(self, name: str, overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """A plugin's section with `overrides` (its own keys) applied and validated."""
        if name not in self.resolved.sections:
            if overrides:
                raise BenchError(f"{name} has no settings to override (got {', '.join(overrides)})")
            return {}
        cfg = copy.deepcopy(self.resolved.sections[name])
        for key, value in overrides.items():
            cfgmod.apply(name, cfg, key, value)
        return {name: cfgmod.to_dict(cfg)}

    def data(self, dataset: str) -> dict[str, dict[str, Any]]:
        """The `data` section for jobs reading `dataset`, with val_size as the number of images used
        (the dataset's own size unless overridden), plus the dataset's own section."""
        from bench.datasets import resolve_val_size

        section = self.section("data")
        section["val_size"] = resolve_val_size(dataset, section["val_size"], self.resolved.sections.get(dataset))
        return {"data": section, **self.sections(dataset)}

    def fingerprint(self, dataset: str, split: str) -> dict[str, Any]:
        """The content fingerprint of a dataset's split (computed once per run)."""
        from bench.datasets import fingerprint

        cfg = self.resolved.sections.get(dataset)
        part = "test" if split == "test" else "train"
        # variants may set the dataset's own settings (synthetic.n_train): those are other data
        key = (dataset, part, json.dumps(cfgmod.to_dict(cfg), sort_keys=True) if cfg is not None else "")
        if key not in self.fingerprints:
            self.fingerprints[key] = fingerprint(dataset, part, data_dir=self.data_dir, cfg=cfg)
        return self.fingerprints[key]

    # ------------------------------------------------------------ jobs

    def add(self, stage: Stage, cell: Cell, *, config: dict[str, Any], deps: dict[str, str] | None = None,
            label: str | None = None) -> Job:
        """The job of `stage` for `cell`, keyed by its content, added to the graph (or the identical
        one already there)."""
        data = {}
        for role, split in stage.reads:
            dataset = getattr(cell, role)
            if dataset:
                data[f"{dataset}/{split}"] = self.fingerprint(dataset, split)
        job = make_job(stage.kind, seed=cell.seed, config=config, deps=deps, method=cell.method,
                       finetuner=cell.finetuner, source=cell.source, target=cell.target, variant=cell.variant,
                       data_dir=self.data_dir, label=label, plugins=stage.plugins(cell), data=data)
        return self.graph.add(job)

    def need(self, stage: str, params: dict[str, Any], cell: Cell, upstream: Job | None = None) -> Job:
        """Plan the job of `stage` with `params` (a dependency, or the next job of a chain)."""
        return get_stage(stage).plan(self, dict(params), cell, upstream)

    def encoder(self, cell: Cell) -> Job:
        """The job whose encoder the finetuners get: the method's pretraining, then its post-stages."""
        from bench.registry import METHODS

        plugin = METHODS.get(cell.method)
        cfg = self.resolved.sections.get(cell.method)
        base = getattr(plugin, "pretrain_as", None)  # a method whose pretraining is another's (DynACL++: DynACL)
        params = {"method": base, "settings": plugin.pretrain_settings(cfg), "select": True} if base else {}
        job = self.need("pretrain", params, cell)
        for stage, params in plugin.post_stages(cfg):
            job = self.need(stage, params, cell, upstream=job)
        return job


def expand(request: Request, resolved: cfgmod.Resolved | None = None,
           fingerprints: dict[tuple[str, str, str], dict[str, Any]] | None = None) -> Graph:
    """The job graph of a request (validating it first when `resolved` is not given)."""
    resolved = resolved or validate(request)
    graph = Graph()
    fingerprints = fingerprints if fingerprints is not None else {}
    extras = [get_stage(name) for name in request.stages]
    # Each variant is planned with its own config into the one graph: the jobs they have in common
    # (the same content, so the same key) are one job, e.g. the pseudo-labels of every view set.
    for variant, config in variant_configs(request, resolved):
        planner = Planner(config, graph, request.data_dir, fingerprints)
        for method in request.methods:
            for source, target in request.datasets:
                for seed in request.seeds:
                    cell = Cell(method=method, source=source, target=target, seed=seed, variant=variant)
                    encoder = planner.encoder(cell)
                    for stage in extras:
                        if stage.attach == "encoder":
                            stage.plan(planner, {}, cell, encoder)  # a stage may plan nothing for a cell
                    for finetuner in request.finetuners:
                        ft_cell = cell.replace(finetuner=finetuner)
                        classifier = planner.need("finetune", {}, ft_cell, encoder)
                        planner.need("evaluate", {}, ft_cell, classifier)
                        for stage in extras:
                            if stage.attach == "classifier":
                                stage.plan(planner, {}, ft_cell, classifier)
    return graph


def plan(*, fetch: bool = True, **kwargs: Any) -> tuple[Request, Graph, list[str]]:
    """build_request(**kwargs), validation, the data (downloaded first when allowed and `fetch`),
    expansion: raises BenchError before any work. Returns the request, the graph and notes."""
    request = build_request(**kwargs)
    resolved = validate(request)
    notes = list(request.notes)
    for _, config in variant_configs(request, resolved):
        notes += [n for n in check_data(request, config, fetch=fetch) if n not in notes]
    return request, expand(request, resolved), notes


# ---------------------------------------------------------------- the data a request reads


def data_needed(request: Request, resolved: cfgmod.Resolved,
                splits: list[tuple[str, str]] | None = None) -> list[tuple[str, str, Path, bool, Any]]:
    """(dataset, source split, data dir, downloads allowed, dataset config) the grid's jobs read
    (or the (dataset, split) pairs of `splits`, for graphs that are not a grid: `bench evaluate`)."""
    from bench.datasets import default_data_dir

    root = Path(request.data_dir) if request.data_dir else default_data_dir()
    download = bool(resolved.sections["data"].download)
    wanted: list[tuple[str, str]] = list(splits or [])
    for source, target in request.datasets if splits is None else ():
        wanted += [(source, "train"), (target, "train")] if request.finetuners else [(source, "train")]
        if request.finetuners:
            wanted.append((target, "test"))
        for name in request.stages:  # what the extra stages read (fim: the source's test images)
            stage = get_stage(name)
            if stage.attach == "encoder" or request.finetuners:
                wanted += [(source if role == "source" else target, split) for role, split in stage.reads]
    return [(name, split, root, download, resolved.sections.get(name)) for name, split in dict.fromkeys(wanted)]


def check_data(request: Request, resolved: cfgmod.Resolved, *, fetch: bool = True,
               splits: list[tuple[str, str]] | None = None) -> list[str]:
    """Make sure every dataset split the grid reads can be read, before any job is written.

    Missing splits are downloaded here, in the planning process, when downloads are allowed, so a
    failed download is bad input (BenchError) rather than a failed job. With `fetch=False` (a dry
    run) nothing is downloaded: the returned notes say what the run would download.
    """
    from bench import datasets

    missing = [(name, split, root, download, cfg) for name, split, root, download, cfg
               in data_needed(request, resolved, splits)
               if not datasets.available(name, split, data_dir=root, cfg=cfg)]
    offline = [(name, split, root) for name, split, root, download, _ in missing if not download]
    if offline:  # one message for every split that cannot be had
        root = offline[0][2]
        raise datasets.DataUnavailable([(name, split) for name, split, r in offline if r == root], root)
    if not fetch:
        return [f"{name} {split} is not in {root}: the run downloads it first (keys shown are provisional)"
                for name, split, root, _, _ in missing]
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

