"""`bench evaluate SOURCE --format F`: an outside model under the harness's protocol, as jobs.

A classifier is evaluated directly; an encoder (`--finetune slf,alf,...`) is finetuned with each
finetuner and seed, then evaluated. The graph is the harness's own: a checkpoint job (the import,
`bench.stages.checkpoint`) -> finetune jobs -> evaluate jobs (+ `--stages`, e.g. corruptions),
planned by the same stages, keyed by content, run by the same runner and executors into the same
results folder, so they are cached, resume, and appear in `bench report` as rows named `--name`
beside the harness's methods (marked as outside, with their format).

Everything that can be wrong with the input is found before anything is written (exit code 2):
the format, the name, the settings, a checkpoint whose keys do not fit its layout, a model whose
number of outputs is not the target's number of classes, a `module:function` that does not import
(the model is loaded here once for that), the data.
"""

from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path
from typing import Any

import click

from bench.commands import data_dir_option, results_option

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
LOADER_ARGS = ("source", "branch", "want", "device")  # given by the checkpoint stage, not options


def _value(raw: str) -> Any:
    """A KEY=VALUE option's value: TOML when it parses (2, true, {k = 1}, [1, 2]), else the text."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def format_options(fmt: str, items: tuple[str, ...], weights: str | None) -> dict[str, Any]:
    """The format's own options from --option KEY=VALUE (and --weights), checked against its loader."""
    from bench.checkpoints import FORMATS
    from bench.errors import BenchError

    accepted = [p for p in inspect.signature(FORMATS[fmt].load).parameters.values()
                if p.kind is p.KEYWORD_ONLY and p.name not in LOADER_ARGS]
    names = [p.name for p in accepted]
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise BenchError(f"--option {item!r}: KEY=VALUE (e.g. normalize=imagenet)")
        if key not in names:
            raise BenchError(f"--option {key}: the {fmt} format has no such option"
                             + (f"; its options: {', '.join(names)}" if names else " (it takes none)"))
        options[key] = _value(raw)
    if weights is not None:
        if "weights" not in names:
            raise BenchError(f"--weights: the {fmt} format takes none (only the module format does)")
        options["weights"] = str(Path(weights).expanduser().resolve())
    return options


def default_name(source: str, fmt: str) -> str:
    """The row name when --name is not given: the file's stem, the module's, or the zoo name."""
    from bench.checkpoints import FORMATS

    text = str(source)
    if FORMATS[fmt].source == "code":
        text = text.rpartition(":")[0]
    stem = Path(text).stem if FORMATS[fmt].source != "name" else text
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", stem).lstrip("_.+-")[:64] or "outside"


def check_name(name: str, explicit: bool) -> str:
    from bench.errors import BenchError
    from bench.registry import METHODS

    if not NAME.fullmatch(name):
        raise BenchError(f"--name {name!r}: letters, digits and _ . + - (up to 64, starting with a letter or digit)")
    if name in METHODS:
        hint = "" if explicit else " (derived from the source's name)"
        raise BenchError(f"name {name!r}{hint} is a harness method's: its rows would merge with that method's. "
                         f"Give another with --name")
    return name


def _settings(preset: str | None, overrides: tuple[str, ...], config_path: str | None) -> dict[str, Any]:
    from bench import config as cfgmod

    settings: dict[str, Any] = {}
    if preset is not None:  # only the preset's settings ([presets.NAME.set]); the grid is this command's
        table = cfgmod.get_preset(preset, cfgmod.find_config_file(config_path))
        settings.update(cfgmod.flatten(table.get("set", {})))
    settings.update(cfgmod.parse_overrides(overrides))
    return settings


def plan_outside(*, source: str, fmt: str, name: str | None = None, finetune: str | None = None,
                 datasets: str = "cifar10", seeds: str | None = None, branch: str | None = None,
                 weights: str | None = None, options: tuple[str, ...] = (), stages: str | None = None,
                 preset: str | None = None, overrides: tuple[str, ...] = (), config_path: str | None = None,
                 data_dir: str | None = None, fetch: bool = True,
                 results: str | Path | None = None) -> tuple[Any, Any, list[str]]:
    """(request, graph, notes) of `bench evaluate`: every check first (BenchError), nothing written.
    `results`: the results folder, whose other models must not carry the same name."""
    from bench import datasets as ds, grid
    from bench.checkpoints import FORMATS, load_model
    from bench.errors import BenchError
    from bench.stages.base import Cell, get_stage
    from bench.stages.checkpoint import check_params, class_count, load_outside
    from bench.store import Store

    if fmt not in FORMATS:
        load_model(source, fmt)  # the unknown-format message, with its did-you-mean
    finetuners = grid.split_list(finetune) or []
    pairs = list(dict.fromkeys(grid.parse_dataset(x) for x in grid.split_list(datasets) or []))
    if not pairs:
        raise BenchError("--datasets: at least one target (e.g. cifar10, or cifar10:stl10)")
    seed_list = grid.parse_seeds(grid.split_list(seeds) or ["0"])
    if not finetuners and len(seed_list) > 1:
        raise BenchError("--seeds: the seeds are finetuning seeds; a classifier evaluated directly has one "
                         "evaluation (eval.seed sets its attacks' seed)")
    request = grid.Request(methods=[], finetuners=finetuners, datasets=pairs, seeds=seed_list,
                           settings=_settings(preset, overrides, config_path), stages=grid.split_list(stages) or [],
                           preset=preset, data_dir=str(Path(data_dir).resolve()) if data_dir else None)
    resolved = grid.validate(request)
    row = check_name(name or default_name(source, fmt), name is not None)
    want = "encoder" if finetuners else "classifier"
    params = {"source": source, "format": fmt, "want": want, "branch": branch,
              "options": format_options(fmt, options, weights), "name": row}

    # the model, loaded here once per input size: a layout, class-count or import problem stops now
    sizes = {src: ds.dataset_image_size(src, resolved.sections.get(src)) for src, _ in pairs}
    for size in sorted(set(sizes.values())):
        loaded = load_outside(check_params({**params, "image_size": size}))
        for src, target in pairs:
            if want != "classifier" or sizes[src] != size:
                continue
            outputs, classes = class_count(loaded.model, size), ds.dataset(target, resolved.sections.get(target)).num_classes
            if outputs != classes:
                looks = " (it looks like an encoder: finetune it with --finetune slf)" \
                    if outputs == getattr(getattr(loaded.model, "encoder", loaded.model), "feature_dim", None) else ""
                raise BenchError(f"{source}: the model has {outputs} outputs but {target} has {classes} classes{looks}")
    splits = [(t, "test") for _, t in pairs] + ([(t, "train") for _, t in pairs] if finetuners else [])
    notes = grid.check_data(request, resolved, fetch=fetch, splits=list(dict.fromkeys(splits)))

    graph = grid.Graph()
    planner = grid.Planner(resolved, graph, request.data_dir)
    extras = [get_stage(n) for n in request.stages]
    for src, target in pairs:
        cell = Cell(method=row, source=src, target=target, seed=0)
        model = planner.need("checkpoint", {**params, "image_size": sizes[src]}, cell)
        if want == "classifier":
            _evaluate(planner, cell, model, extras)
            continue
        for stage in extras:
            if stage.attach == "encoder":
                stage.plan(planner, {}, cell, model)
        for seed in seed_list:
            for finetuner in finetuners:
                ft_cell = cell.replace(finetuner=finetuner, seed=seed)
                _evaluate(planner, ft_cell, planner.need("finetune", {}, ft_cell, model), extras)
    if results is not None:
        _check_name_is_this_model(Store(results), row, graph)
    return request, graph, notes


IDENTITY = ("format", "source", "digests", "branch", "options")  # what makes two checkpoint jobs one model


def _check_name_is_this_model(store: Any, row: str, graph: Any) -> None:
    """A row name already given to another model in the results folder would mix the two models'
    records in one report row (seeds of one, seeds of the other): refused."""
    from bench.errors import BenchError

    planned = [{k: job.config["checkpoint"].get(k) for k in IDENTITY} for job in graph if job.kind == "checkpoint"]
    for record in store.records("checkpoint"):
        if record.method != row:
            continue
        other = {k: record.config.get("checkpoint", {}).get(k) for k in IDENTITY}
        if other not in planned:
            raise BenchError(f"--name {row} already names another model in {store.root} (job {record.key}: "
                             f"{other['format']} {other['source']}); give this one another name, or remove that "
                             f"model's jobs first")


def _evaluate(planner: Any, cell: Any, classifier: Any, extras: list[Any]) -> None:
    planner.need("evaluate", {}, cell, classifier)
    for stage in extras:
        if stage.attach == "classifier":
            stage.plan(planner, {}, cell, classifier)


@click.command()
@click.argument("source")
@click.option("--format", "fmt", required=True, metavar="FORMAT",
              help="the checkpoint's layout: bench, advcl, acl, rocl, apdpe, dynacl, solo_learn, torchvision, "
                   "robustbench, module (`module` RUNS YOUR CODE; see docs/outside-models.md)")
@click.option("--name", default=None, help="the row name in `bench report` [default: from SOURCE's name]")
@click.option("--finetune", default=None,
              help="comma-separated finetuners (slf,alf,aff): SOURCE is an encoder, finetuned with each, then "
                   "evaluated [default: SOURCE is a classifier, evaluated directly]")
@click.option("--datasets", default="cifar10", show_default=True,
              help="comma-separated targets; SOURCE:TARGET says the model was pretrained on SOURCE (its input "
                   "size and the report's cross-dataset table)")
@click.option("--seeds", default=None, help="comma-separated finetuning seeds [default: 0]")
@click.option("--branch", default=None, help="the BatchNorm branch to keep (default: the family's downstream one)")
@click.option("--weights", default=None, type=click.Path(dir_okay=False),
              help="module format: a state-dict file loaded strictly into the model the function builds")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="a format option, repeatable: normalize=imagenet, stem_padding=2, kwargs={k = 2}, ...")
@click.option("--stages", default=None, help="comma-separated extra job kinds per classifier (e.g. corruptions)")
@click.option("--preset", default=None, help="take the settings of a preset of bench.toml (its grid is not used)")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="bench.toml to read presets and [executors.*] from")
@results_option
@data_dir_option
@click.option("--dry-run", is_flag=True, help="print the plan (jobs, dependencies, states) and exit")
@click.option("--executor", default="local", show_default=True, help="local, slurm or ray")
@click.option("--gpus", default=None, help="local: GPU indices, one worker each (e.g. 0,1; 'none' = CPU)")
@click.option("--slots", type=int, default=None, help="local: parallel CPU workers (or workers per GPU)")
@click.argument("overrides", nargs=-1)
def command(source, fmt, name, finetune, datasets, seeds, branch, weights, options, stages, preset, config_path,
            results, data_dir, dry_run, executor, gpus, slots, overrides) -> None:
    """Evaluate an outside model SOURCE (a checkpoint file, a RobustBench name or module:function) with
    the harness's protocol. OVERRIDES are section.key=value settings (eval.n=1000, eval.norm=L2, slf.epochs=5).

    Finished jobs are skipped and unfinished ones resume, as with `bench run`. Exit code 0: all done;
    1: a job failed; 2: bad input (nothing started, nothing written); 130: interrupted.
    """
    from bench import files, runner
    from bench.executors.base import Options
    from bench.executors.local import parse_gpus
    from bench.progress import RunProgress, wide_console
    from bench.store import Store

    store = Store(results)
    if not dry_run:
        files.check_writable(store.root, "results folder")
    _, graph, notes = plan_outside(source=source, fmt=fmt, name=name, finetune=finetune, datasets=datasets,
                                   seeds=seeds, branch=branch, weights=weights, options=options, stages=stages,
                                   preset=preset, overrides=overrides, config_path=config_path, data_dir=data_dir,
                                   fetch=not dry_run, results=store.root)
    options_ = Options(gpus=parse_gpus(gpus, check=True), slots=slots,
                       extra=dict(runner.executor_settings(executor, config_path)))
    ex = runner.make_executor(executor, options_)
    console = wide_console()
    if dry_run:
        console.print(runner.plan_table(graph, store))
        for note in notes:
            console.print(f"[yellow]note:[/] {note}", highlight=False)
        return
    reporter = RunProgress(title=f"bench evaluate ({executor}) -> {store.root}")
    runner.run_to_end(graph, store, ex, reporter)
    _print_results(console, graph, store)


def _print_results(console: Any, graph: Any, store: Any) -> None:
    from bench.stages.base import get_stage

    for job in graph:
        record = store.read(job.key) if job.kind in ("evaluate", "corruptions") else None
        if record is not None:
            cell = " / ".join(p for p in (job.method, job.finetuner or "as given", job.target) if p)
            console.print(f"{cell}: {get_stage(job.kind).summary(record)}  [dim]({job.key})[/]", highlight=False)


__all__ = ["command", "plan_outside"]
