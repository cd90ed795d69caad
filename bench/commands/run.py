"""`bench run`: expand the grid into jobs and run them (local, slurm or ray); resumable."""

from __future__ import annotations

import click

from bench.commands import data_dir_option, results_option


@click.command()
@click.option("--preset", default=None, help="a preset of bench.toml (smoke, quick, paper)")
@click.option("--methods", default=None, help="comma-separated pretraining methods [default: the preset's]")
@click.option("--finetune", default=None, help="comma-separated finetuners (slf,alf,aff) [default: the preset's]")
@click.option("--datasets", default=None,
              help="comma-separated datasets; SOURCE:TARGET pretrains on SOURCE, finetunes and tests on TARGET")
@click.option("--seeds", default=None, help="comma-separated seeds [default: the preset's, else 0]")
@click.option("--stages", default=None,
              help="comma-separated extra job kinds per encoder or classifier (see `bench list stages`)")
@click.option("--vary", multiple=True, metavar="KEY=V1,V2",
              help="run each value as its own labelled variant (e.g. --vary advcl.views=1,2,3); several terms "
                   "(repeated --vary, or space-separated in one) combine as a cartesian product; replaces the "
                   "preset's variants")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="bench.toml to read presets and [executors.*] from")
@results_option
@data_dir_option
@click.option("--dry-run", is_flag=True,
              help="print the plan (jobs, dependencies, states, estimated times) and exit")
@click.option("--estimate/--no-estimate", default=True, show_default=True,
              help="dry run: estimate each job's time from measured step profiles of this device (measured once, "
                   "cached in the user's cache folder)")
@click.option("--executor", default="local", show_default=True, help="local, slurm or ray")
@click.option("--gpus", default=None, help="local: GPU indices, one worker each (e.g. 0,1,2,3; 'none' = CPU)")
@click.option("--slots", type=int, default=None, help="local: parallel CPU workers (or workers per GPU)")
@click.option("--ray-address", default=None, help="ray: address of an existing cluster [default: start one here]")
@click.option("--partition", default=None, help="slurm: partition")
@click.option("--time-min", type=int, default=None, help="slurm: time limit per job, minutes")
@click.option("--mem-gb", type=int, default=None, help="slurm/ray: memory per job, GB")
@click.option("--cpus-per-job", type=int, default=None, help="slurm/ray: CPUs per job")
@click.option("--gpus-per-job", type=float, default=None,
              help="devices (one process each) of a data-parallel job (pretrain, finetune; docs/scaling.md); "
                   "slurm: also the GPUs of every other job; ray: a fraction < 1 shares a GPU as before")
@click.option("--logger", "loggers", default=None,
              help="extra training-curve loggers besides CSV and TensorBoard: wandb (offline unless WANDB_MODE)")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="slurm: watch the jobs until they end (else submit and exit)")
@click.argument("overrides", nargs=-1)
def command(preset, methods, finetune, datasets, seeds, stages, vary, config_path, results, data_dir, dry_run, estimate,
            executor, gpus, slots, ray_address, partition, time_min, mem_gb, cpus_per_job, gpus_per_job, loggers, wait,
            overrides) -> None:
    """Run the benchmark grid. OVERRIDES are section.key=value settings (e.g. advcl.epochs=10).

    Finished jobs are skipped and unfinished ones resume from their last checkpoint, so the same
    command continues an interrupted run. Exit code 0: all done; 1: a job failed; 2: bad input
    (nothing started, nothing written); 130: interrupted (Ctrl-C; the next run resumes).
    """
    import os

    from rich.markup import escape

    from bench import files, grid, runner
    from bench.errors import BenchError
    from bench.train.logbook import LOGGERS, LOGGERS_ENV
    from bench.executors.base import Options
    from bench.executors.local import parse_gpus
    from bench.progress import RunProgress, wide_console
    from bench.store import Store

    if loggers:
        chosen = [name.strip() for name in loggers.split(",") if name.strip()]
        unknown = [name for name in chosen if name not in LOGGERS]
        if unknown:
            raise BenchError(f"--logger {', '.join(unknown)}: unknown (known: {', '.join(LOGGERS)}); CSV and "
                             "TensorBoard curves are always written")
        os.environ[LOGGERS_ENV] = ",".join(chosen)  # the workers inherit it
    store = Store(results)
    if not dry_run:
        files.check_writable(store.root, "results folder")
    # missing data is bad input: checked (and downloaded, unless a dry run) before any job is written
    _, graph, notes = grid.plan(preset=preset, methods=methods, finetune=finetune, datasets=datasets, seeds=seeds,
                                stages=stages, overrides=overrides, config_path=config_path, data_dir=data_dir,
                                vary=vary, fetch=not dry_run)
    extra = dict(runner.executor_settings(executor, config_path))
    cli = {"partition": partition, "time_min": time_min, "mem_gb": mem_gb, "cpus_per_job": cpus_per_job,
           "gpus_per_job": gpus_per_job}
    extra.update({k: v for k, v in cli.items() if v is not None})
    options = Options(gpus=parse_gpus(gpus, check=True), slots=slots, ray_address=ray_address, wait=wait,
                      extra=extra)
    ex = runner.make_executor(executor, options)
    if dry_run:
        console = wide_console()
        guess = _estimate(graph, store, options, executor, console) if estimate else None
        console.print(runner.plan_table(graph, store, guess))
        if guess is not None:
            _print_totals(console, graph, guess, executor)
        for note in notes:
            console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
        return
    if notes:  # what the request left out (e.g. variants that need a label file)
        console = wide_console(stderr=True)
        for note in notes:
            console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    reporter = RunProgress(title=f"bench run ({executor}) -> {store.root}")
    runner.run_to_end(graph, store, ex, reporter)


def _estimate(graph, store, options, executor, console):
    """Every job's estimated time on the devices the local executor would use (bench.estimate)."""
    from bench import estimate, runner

    device = estimate.local_device(options.gpus, options.slots if executor == "local" else None)
    cache = estimate.ProfileCache()

    def measuring(what: str) -> None:
        console.print(f"[dim]measuring {what} on {device.name} (once; cached in {cache.path})[/]", highlight=False)

    return estimate.estimate_graph(graph, estimate.Costs(device, cache, on_measure=measuring),
                                   done=runner.done_keys(graph, store))


def _print_totals(console, graph, here, executor: str) -> None:
    """The whole run's estimate here and on one GPU (from measurements made on a GPU, never guessed)."""
    from bench import estimate

    where = "here" if executor == "local" else f"with jobs as on this machine (the {executor} cluster decides the total)"
    console.print(f"[bold]estimated time {where}:[/] {here.summary(graph)}", highlight=False)
    if here.device.is_cuda:
        console.print(f"[bold]on one GPU:[/] {estimate.duration(here.wall_s(graph, slots=1))}", highlight=False)
        return
    cache = estimate.ProfileCache()
    gpu = estimate.other_device(cache)
    if gpu is None:
        console.print("[bold]on one GPU:[/] unknown: no GPU step profile has been measured (the same dry run "
                      f"on a GPU machine measures them; its {cache.path.name}, copied to {cache.path}, then "
                      "serves estimates here)", highlight=False)
        return
    there = estimate.estimate_graph(graph, estimate.Costs(gpu, cache, measure=False))
    console.print(f"[bold]on one GPU[/] (profiles measured on {gpu.name}): {there.summary(graph)}", highlight=False)


__all__ = ["command"]
