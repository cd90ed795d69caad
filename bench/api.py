"""The Python API: evaluate any classifier (or finetune any encoder, then evaluate it) with the
harness's protocol, from a few lines of code. `evaluate` is also `bench.evaluate` (top level).

    import bench.api as api
    from bench.checkpoints import load_model

    model = load_model("model.pt", "acl").model                 # an ACL encoder (pgd branch)
    result = api.evaluate(model, "cifar10", finetune="slf")     # SLF on CIFAR-10, then SA / PGD-20
    print(result.summary())

`evaluate(model, data, ...)` takes any `nn.Module` mapping float images in [0,1] (N x 3 x H x W)
to logits (or, with `finetune=`, to features), and data as a dataset name (loaded through
bench.datasets: the test split), a uint8 `ImageSet`, or a pair (x, y) of tensors: x float in
[0,1] (used exactly, not requantized) or uint8. It returns an `Evaluation`: every number a
`bench.record.Metric` (value, n, correct, Wilson 95% interval, the full protocol).

Defaults and their cost (ResNet-18 at width 64, 32x32 images; see docs/outside-models.md for
measured figures): clean accuracy on n=1000 images (seconds anywhere); PGD-20 on pgd_n=n=1000
images (minutes on a CPU, seconds on a GPU); AutoAttack off (aa_n=0: the standard AutoAttack
costs about 10-30x PGD-20, i.e. hours on a CPU for 1000 images; set aa_n on a GPU); sweeps off
(sweep_n=0: 7 eps points x PGD-20 plus one PGD-100 run); corruptions off (corruptions_n=0).
The paper protocol is n = pgd_n = aa_n = 10000, sweep_n = 1000.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from bench.config import EvalConfig, from_dict
from bench.datasets import ImageSet
from bench.errors import BenchError
from bench.record import Metric, plain

log = logging.getLogger(__name__)
Progress = Callable[[dict[str, Any]], None]
AA_SKIPPED = ("AutoAttack was not run (aa_n=0): PGD-20 robust accuracy alone is an upper bound on robustness; "
              "set aa_n (on a GPU) for the standard evaluation")


class FloatImages(ImageSet):
    """An ImageSet whose `x` is float in [0,1]: evaluated exactly as given (no uint8 rounding)."""

    def images(self, index: torch.Tensor | slice) -> torch.Tensor:
        return self.x[index].float()

    def subset(self, index: torch.Tensor | slice) -> "FloatImages":
        src = self.indices if self.indices is not None else torch.arange(len(self.y), device=self.y.device)
        return FloatImages(self.x[index], self.y[index], self.classes, self.name, src[index])

    def to(self, device: torch.device | str) -> "FloatImages":
        idx = self.indices.to(device) if self.indices is not None else None
        return FloatImages(self.x.to(device), self.y.to(device), self.classes, self.name, idx)


@dataclass
class Evaluation:
    """The result of `evaluate`: metrics with their protocols, the sanity warnings, the flags."""

    sa: Metric
    ra: Metric
    aa: Metric | None = None
    sweeps: dict[str, list[Metric]] | None = None
    corruptions: Any = None                      # bench.corruptions.CorruptionResult
    warnings: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)   # the eval.* settings used
    model: nn.Module | None = None               # the classifier evaluated (the finetuned one with finetune=)
    finetune: dict[str, Any] | None = None       # finetuner, selected epoch and validation metrics

    @property
    def metrics(self) -> dict[str, Any]:
        """JSON-native, in an evaluate record's shape (plus `corruptions`)."""
        out = plain({"sa": self.sa, "ra": self.ra, "aa": self.aa, "sweeps": self.sweeps})
        if self.corruptions is not None:
            out["corruptions"] = self.corruptions.metrics()
        return out

    def summary(self) -> str:
        def pct(m: Metric | None) -> str:
            return "-" if m is None else f"{100 * m.value:.2f}% (n={m.n})"

        p = self.ra.protocol
        threat = f"{p['norm']} eps {p['eps_255']:g}/255" if p["norm"] == "Linf" else f"L2 eps {p['eps']:g}"
        lines = [f"SA {pct(self.sa)}", f"RA PGD-{p['steps']} {threat}: {pct(self.ra)}", f"AA: {pct(self.aa)}"]
        if self.corruptions is not None:
            lines.append(f"mean corruption accuracy ({self.corruptions.source}): {pct(self.corruptions.mean)}")
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings])


# ---------------------------------------------------------------- inputs


def _device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def as_image_set(data: Any, *, classes: list[str] | int | None = None, device: torch.device,
                 data_dir: str | Path | None = None, image_size: int | None = None,
                 data_settings: dict[str, Any] | None = None) -> ImageSet:
    """A test set from a dataset name (with its dotted settings, e.g. {"synthetic.n_test": 64}),
    an ImageSet, or (x, y) tensors."""
    if isinstance(data, str):
        from bench import datasets
        from bench.config import DataConfig, resolve

        resolved = resolve(dict(data_settings or {}), [data])
        data_cfg: DataConfig = resolved["data"]
        return datasets.load(data, "test", data_dir=data_dir, download=data_cfg.download, device=device,
                             image_size=image_size, cfg=resolved.sections.get(data))
    if isinstance(data, ImageSet):
        return data.to(device)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise BenchError("data=(x, y) needs two tensors")
        if x.dim() != 4 or x.shape[1] != 3:
            raise BenchError(f"images must be N x 3 x H x W, got {tuple(x.shape)}")
        if len(x) != len(y) or y.dim() != 1:
            raise BenchError(f"{len(x)} images and labels of shape {tuple(y.shape)}: one label per image")
        y = y.long()
        if isinstance(classes, int) or classes is None:
            count = classes if isinstance(classes, int) else int(y.max()) + 1
            names = [str(i) for i in range(count)]
        else:
            names = [str(c) for c in classes]
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(names)):
            raise BenchError(f"labels run from {int(y.min())} to {int(y.max())}, outside the {len(names)} classes")
        if x.dtype == torch.uint8:
            return ImageSet(x, y, names, "tensors").to(device)
        if not torch.is_floating_point(x):
            raise BenchError(f"images must be uint8 or float in [0, 1], got {x.dtype}")
        if len(x) and (float(x.min()) < 0 or float(x.max()) > 1):
            raise BenchError(f"float images must lie in [0, 1] (got {float(x.min()):.3g} .. {float(x.max()):.3g}): "
                             f"normalization belongs inside the model, where attacks see it")
        return FloatImages(x.float(), y, names, "tensors").to(device)
    raise BenchError(f"data: a dataset name, an ImageSet or (x, y) tensors, not {type(data).__name__}")


def check_outputs(model: nn.Module, data: ImageSet) -> None:
    """The model must return (N, number of classes) logits."""
    probe = data.images(slice(0, min(2, len(data))))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(probe)
    except Exception as exc:
        raise BenchError(f"the model failed on a batch of {tuple(probe.shape)} images ({type(exc).__name__}: {exc})") \
            from exc
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(probe):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BenchError(f"the model returns {shape} for {len(probe)} images: a classifier returns (N, classes) "
                         f"logits (an encoder needs finetune=)")
    if out.shape[1] != data.num_classes:
        encoder = out.shape[1] == getattr(model, "feature_dim", None)
        raise BenchError(f"the model has {out.shape[1]} outputs but {data.name} has {data.num_classes} classes"
                         + (" (it looks like an encoder: its outputs are its feature_dim; pass finetune=)"
                            if encoder else ""))


def eval_config(*, n: int, aa_n: int, sweep_n: int, norm: str, eps: float | None, alpha: float | None,
                steps: int, restarts: int, aa_version: str, aa_budget: float, seed: int, batch_size: int,
                settings: dict[str, Any] | None = None) -> EvalConfig:
    """A validated EvalConfig from the API's arguments (eps/alpha in the chosen norm)."""
    values: dict[str, Any] = {"n": n, "aa_n": aa_n, "sweep_n": sweep_n, "norm": norm, "steps": steps,
                              "restarts": restarts, "aa_version": aa_version, "aa_budget": aa_budget, "seed": seed,
                              "batch_size": batch_size}
    prefix = "l2_" if norm == "L2" else ""
    if eps is not None:
        values[prefix + "eps"] = eps
        values[prefix + "alpha"] = alpha if alpha is not None else eps / 4
    elif alpha is not None:
        values[prefix + "alpha"] = alpha
    values.update({k.removeprefix("eval."): v for k, v in (settings or {}).items()})
    return from_dict(EvalConfig, values, "eval")


# ---------------------------------------------------------------- the evaluation


def evaluate(model: nn.Module, data: Any = "cifar10", *, n: int = 1000, pgd_n: int | None = None, aa_n: int = 0,
             sweep_n: int = 0, corruptions_n: int = 0, norm: str = "Linf", eps: float | None = None,
             alpha: float | None = None, steps: int = 20, restarts: int = 1, aa_version: str = "standard",
             aa_budget: float = 1.0, seed: int = 0, batch_size: int = 250, device: torch.device | str | None = None,
             data_dir: str | Path | None = None, classes: list[str] | int | None = None,
             image_size: int | None = None, finetune: str | None = None,
             finetune_settings: dict[str, Any] | None = None, data_settings: dict[str, Any] | None = None,
             corruptions_source: str = "auto",
             settings: dict[str, Any] | None = None, workdir: str | Path | None = None,
             on_progress: Progress | None = None) -> Evaluation:
    """Evaluate a classifier with the harness's protocol.

    n: clean-accuracy images (the first n of the test set); pgd_n: PGD images (default n);
    aa_n: AutoAttack images (0 = skip); sweep_n: images per attack-strength point (0 = skip);
    corruptions_n: images per corruption and severity (0 = skip; official CIFAR-C files under
    data_dir when present, else generated and flagged). norm: "Linf" or "L2"; eps/alpha: the
    radius and step in that norm (default 8/255 and 2/255, or 0.5 and 0.125; alpha defaults to
    eps/4). finetune: a finetuner name (slf, alf, aff) to train a head (or the whole model) on
    `data`'s training split first; `model` is then an encoder. settings: more eval.* settings;
    finetune_settings: dotted settings for the finetuning (e.g. {"slf.epochs": 5}); data_settings:
    the dataset's own and data.* settings (e.g. {"synthetic.n_test": 64}), for both. workdir:
    a folder where finished stages are saved, so a rerun resumes.
    """
    from bench.checkpoints import Loaded, ensure_feature_dim
    from bench.attacks.accuracy import clean_correct, clean_protocol, image_batches
    from bench.evaluation import evaluate_classifier

    if isinstance(model, Loaded):
        model = model.model
    if not isinstance(model, nn.Module):
        raise BenchError(f"model: an nn.Module, not {type(model).__name__}")
    dev = _device(device)
    pgd_n = n if pgd_n is None else pgd_n
    for name, value in (("n", n), ("pgd_n", pgd_n)):
        if value < 1:
            raise BenchError(f"{name}={value}: at least 1")
    cfg = eval_config(n=pgd_n, aa_n=aa_n, sweep_n=sweep_n, norm=norm, eps=eps, alpha=alpha, steps=steps,
                      restarts=restarts, aa_version=aa_version, aa_budget=aa_budget, seed=seed,
                      batch_size=batch_size, settings=settings)
    flags: list[str] = []
    warnings: list[str] = []
    finetuned = None
    if finetune is not None:
        if not isinstance(data, str):
            raise BenchError("finetune= needs a dataset name (its training split trains the head)")
        from bench.finetuning import finetune as run_finetune, selection_metrics

        encoder = ensure_feature_dim(model.to(dev), image_size or 32)
        # model selection in the threat model of the evaluation (unless finetune_settings say otherwise)
        threat = {f"eval.{k}": getattr(cfg, k) for k in ("norm", "eps", "alpha", "l2_eps", "l2_alpha")}
        result = run_finetune(finetune, encoder, data,
                              {**threat, **(data_settings or {}), **(finetune_settings or {})},
                              seed=seed, device=dev, data_dir=data_dir, image_size=image_size)
        model = result.model
        flags += result.flags
        warnings += result.warnings
        selected = selection_metrics(result, result.finetuner.ctx.eval, result.finetuner.cfg.selection)
        finetuned = {"finetuner": finetune, **plain(selected)}
    model = model.to(dev)
    test = as_image_set(data, classes=classes, device=dev, data_dir=data_dir, image_size=image_size,
                        data_settings=data_settings)
    check_outputs(model, test)
    result = evaluate_classifier(model, test, cfg, seed, workdir=workdir, on_progress=on_progress)
    sa = result.metrics.sa
    clean_n = min(n, len(test))
    if clean_n != sa.n:  # SA on its own number of images
        head = test.first(clean_n)
        flags_clean = clean_correct(model, image_batches(head, cfg.batch_size))
        sa = Metric.from_counts(int(flags_clean.sum()), clean_n, clean_protocol(
            n=clean_n, seed=seed, batch_size=cfg.batch_size, images=f"first {clean_n} of {test.name} test"))
    warnings += result.warnings
    flags += [f for f in result.flags if f not in flags]  # a collapsed classifier
    if cfg.aa_n == 0:
        warnings.append(AA_SKIPPED)
    corruptions = None
    if corruptions_n > 0:
        from bench.corruptions import corruption_accuracy

        corruptions = corruption_accuracy(model, test, data_dir=data_dir or _data_dir(), n=min(corruptions_n, len(test)),
                                          source=corruptions_source, batch_size=cfg.batch_size, seed=seed,
                                          device=dev)
        flags += corruptions.flags
        warnings += corruptions.warnings
    from bench.config import to_dict

    return Evaluation(sa=sa, ra=result.metrics.ra, aa=result.metrics.aa, sweeps=result.metrics.sweeps,
                      corruptions=corruptions,
                      warnings=warnings, flags=flags, settings=to_dict(cfg), model=model, finetune=finetuned)


def _data_dir() -> Path:
    from bench.datasets import default_data_dir

    return default_data_dir()
