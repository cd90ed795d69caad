"""`bench export JOB`: a job's model for use without bench, a plain state dict plus a JSON model card.

JOB is a finetune job (its classifier), a pretrain or lpaft job (its encoder) or a checkpoint job
(the imported model), by key or unique key prefix. The card (`bench.export`) has RobustBench's
model-info fields; its numbers come from the evaluate record(s) of that classifier in the results
folder (one threat model per card: L-inf by default, `--norm L2` for the L2 evaluation; every
other evaluation is listed under `bench.evaluations`), and the mean corruption accuracy from its
corruptions record when there is one. An encoder's card has no accuracies.
"""

from __future__ import annotations

from typing import Any

import click

from bench.commands import results_option


def _finished(record: Any) -> float:
    value = (record.provenance or {}).get("finished")
    return float(value) if isinstance(value, (int, float)) else 0.0


def _evaluations(store: Any, key: str, kind: str) -> list[Any]:
    """The done records of `kind` whose classifier input is job `key`, the latest first."""
    found = [r for r in store.records(kind) if r.inputs.get("classifier") == key]
    return sorted(found, key=_finished, reverse=True)


def _architecture(model: Any, record: Any) -> str | None:
    from bench.models.files import describable

    if record.kind == "checkpoint" and record.metrics.get("architecture"):
        return str(record.metrics["architecture"])
    encoder = getattr(model, "encoder", model)
    if describable(encoder):
        padding = getattr(encoder, "stem_padding", 1)
        return (f"ResNet-18 (CIFAR 3x3 stem{'' if padding == 1 else f', padding {padding}'}), width {encoder.width}"
                f", in-model normalization {encoder.normalize.kind}")
    return None


def export_job(store: Any, key: str, out: str, *, name: str | None = None, norm: str | None = None,
               card: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """Write `<out>/<name>.pt` and `<name>.json` for job `key` of `store`; return both paths."""
    from bench.commands.show import _find
    from bench.errors import BenchError
    from bench.export import CARD_FIELDS, export_model
    from bench.stages.base import get_stage

    key = _find(store, key)
    state = store.state(key)
    if not state.done:
        raise BenchError(f"job {key} is {state.name}" + (f" ({state.reason})" if state.reason else "")
                         + ": only a finished job can be exported")
    record = state.record
    kind = record.metrics.get("kind") if record.kind == "checkpoint" else get_stage(record.kind).provides
    if kind not in ("encoder", "classifier"):
        raise BenchError(f"job {key} is a {record.kind} job, which provides no model; export a finetune job "
                         f"(classifier), a pretrain or lpaft job (encoder) or a checkpoint job")
    unknown = set(card or {}) - set(CARD_FIELDS)
    if unknown:
        raise BenchError(f"--card {', '.join(sorted(unknown))}: not a RobustBench model-info field; those are "
                         f"{', '.join(CARD_FIELDS)}")
    metrics: dict[str, Any] = {}
    extra: dict[str, Any] = {"job": key, "job_kind": record.kind, "method": record.method,
                             "finetuner": record.finetuner, "source": record.source, "target": record.target,
                             "seed": record.seed}
    if kind == "classifier":
        evaluations = _evaluations(store, key, "evaluate")
        norms = {r.key: (r.config.get("eval") or {}).get("norm", "Linf") for r in evaluations}
        wanted = norm or ("Linf" if "Linf" in norms.values() or not norms else next(iter(norms.values())))
        chosen = next((r for r in evaluations if norms[r.key] == wanted), None)
        if norm is not None and chosen is None:
            raise BenchError(f"job {key} has no finished {norm} evaluation in {store.root} "
                             f"(it has: {', '.join(sorted(set(norms.values()))) or 'none'})")
        if chosen is not None:
            metrics = {m: chosen.metrics.get(m) for m in ("sa", "ra", "aa")}
            extra.update(evaluate_job=chosen.key, eval_settings=chosen.config.get("eval"))
        extra["evaluations"] = [{"job": r.key, "threat_model": norms[r.key]} for r in evaluations]
        corrupted = _evaluations(store, key, "corruptions")
        if corrupted:
            metrics["corruptions"] = corrupted[0].metrics
            extra["corruptions_job"] = corrupted[0].key
            extra["corruptions_source"] = corrupted[0].metrics.get("source")
    model = get_stage(record.kind).load(store.job(key), "cpu")
    return export_model(model, out, name=name or key, metrics=metrics, dataset=record.target or record.source,
                        architecture=_architecture(model, record), card=card, extra=extra)


@click.command()
@click.argument("key")
@results_option
@click.option("--out", type=click.Path(file_okay=False), default="export", show_default=True,
              help="folder for <name>.pt and <name>.json")
@click.option("--name", default=None, help="file name without extension [default: the job key]")
@click.option("--norm", type=click.Choice(["Linf", "L2"]), default=None,
              help="whose numbers the card carries when the classifier was evaluated under both [default: L-inf]")
@click.option("--card", "card_items", multiple=True, metavar="FIELD=VALUE",
              help="a RobustBench model-info field, repeatable: authors=..., venue=..., link=..., name=...")
def command(key, results, out, name, norm, card_items) -> None:
    """Export job KEY's classifier or encoder: a plain state dict (torch.load(path, weights_only=True)) and a
    JSON model card with RobustBench's fields (architecture, threat model, eps, clean and AutoAttack accuracy,
    n and the protocol of every number). Exit code 2: no such job, not finished, or provides no model."""
    from rich.console import Console

    from bench.commands.evaluate import _value
    from bench.errors import BenchError
    from bench.store import Store

    card: dict[str, Any] = {}
    for item in card_items:
        field, sep, raw = item.partition("=")
        if not sep or not field.strip():
            raise BenchError(f"--card {item!r}: FIELD=VALUE (e.g. authors='A. Author')")
        card[field.strip()] = _value(raw) if raw.strip() in ("true", "false") or raw.strip().isdigit() else raw
    weights, card_path = export_job(Store(results), key, out, name=name, norm=norm, card=card)
    Console(stderr=True).print(f"[bold green]wrote[/] {weights} and {card_path}", highlight=False)


__all__ = ["command", "export_job"]
