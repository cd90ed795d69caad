"""The checkpoint stage: an outside model (a checkpoint file of any layout, a RobustBench name, a
`module:function`) as the encoder or classifier that the harness's own stages then use.

Params (planned by `bench evaluate` and by method dependencies such as DeACL's `file:` teacher):

    source      the checkpoint file, the RobustBench name or "module:function" (`bench.checkpoints`)
    format      a name of `bench.checkpoints.FORMATS`
    want        "encoder" (finetuned next) or "classifier" (evaluated directly)
    branch      the BatchNorm branch to keep (None: the family's downstream default)
    sha256      the file's digest, if the planner knows it (checked against the file)
    options     the format's own options (normalize, stem_padding, weights, kwargs, dataset, ...)
    encoder     architecture settings left to the method, filled from the run's `encoder` section
                (DeACL: {"stem_padding": 2, "normalize": "cifar10"}, as for its pretrain teacher)
    image_size  the model's input size (default 32)
    name        the row name (the job's `method`; None for a method's dependency)

The job reads no dataset. Its key covers the source, format, options and the content digests of
every file the load reads (`bench.checkpoints.identity`): a changed file is a new job, and a job
refuses to load a file that changed after it was planned.

What it stores (the decision): a model the harness's files describe exactly (`ResNet18` with one
BatchNorm set, of any width, stem padding and normalization, or a `Classifier` of one with a linear
head) is written as a plain `encoder.pt` / `classifier.pt`, exactly what pretrain and finetune jobs
write, so the finetune and evaluate stages run unchanged and never read the outside file again.
Anything else (a `module:function` model, torchvision's own ResNet, AP-DPE's encoder, a RobustBench
model) needs the format's code (or the user's) to build its architecture whatever is stored: its
state dict is stored (`weights.pt`) and `load` rebuilds the architecture from the recipe in the
job's config through the same format (re-importing a module, after checking the digests), then
loads those weights strictly, so every downstream job measures the weights this job imported even
if the user's function initializes at random. A finetune job on such an encoder names this job as
its classifier file's `encoder_job`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bench import files
from bench.checkpoints import FORMATS, Loaded, load_model
from bench.checkpoints.identity import check_unchanged, identity, resolve_source
from bench.config import EncoderConfig, from_dict
from bench.errors import BenchError
from bench.jobs import Job
from bench.models import Classifier, load_classifier, load_encoder, save_classifier, save_encoder
from bench.models.files import describable
from bench.models.resnet import encoder_options
from bench.record import Record
from bench.registry import STAGES
from bench.stages.base import Cell, Resources, Stage, StageContext
from bench.store import JobDir

ENCODER = "encoder.pt"
CLASSIFIER = "classifier.pt"
WEIGHTS = "weights.pt"  # the state dict of a model that `load` rebuilds through its format
WANTS = ("encoder", "classifier")


@dataclass
class CheckpointMetrics:
    format: str
    source: str
    kind: str                          # encoder | classifier
    stored: str                        # encoder.pt | classifier.pt | weights.pt (architecture rebuilt by its format)
    architecture: str = ""
    branch: str | None = None
    normalize: str = "none"
    num_classes: int | None = None     # a classifier's outputs
    feature_dim: int | None = None     # an encoder's features
    image_size: int = 32
    digests: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def check_params(params: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint section of a job from the stage's params (BenchError on bad ones)."""
    fmt = params.get("format")
    if fmt not in FORMATS:
        load_model("", str(fmt))  # the unknown-format message with its did-you-mean
    want = params.get("want", "encoder")
    if want not in WANTS:
        raise BenchError(f"checkpoint want={want!r}: one of {', '.join(WANTS)}")
    source = params.get("source") or params.get("path")
    if not source:
        raise BenchError("a checkpoint job needs its source: a file, a RobustBench name or module:function")
    options = dict(params.get("options") or {})
    image_size = int(params.get("image_size") or 32)
    branch = params.get("branch")
    return {"source": resolve_source(source, fmt), "format": fmt, "want": want,
            "branch": None if branch is None else str(branch), "options": options, "image_size": image_size}


def class_count(model: nn.Module, image_size: int) -> int:
    """The number of outputs of a classifier (one forward of a zero batch in eval mode)."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        return int(head.out_features)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, 3, image_size, image_size, device=device))
    except Exception as exc:  # the user's forward
        raise BenchError(f"the model failed on a batch of 2 x 3 x {image_size} x {image_size} images "
                         f"({type(exc).__name__}: {exc})") from exc
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BenchError(f"the model returns {shape} for 2 images: a classifier returns (N, classes) logits")
    return int(out.shape[1])


def load_outside(section: dict[str, Any], device: Any = "cpu") -> Loaded:
    """Load the model a checkpoint section describes, as the wanted kind."""
    loaded = load_model(section["source"], section["format"], branch=section["branch"], want=section["want"],
                        device=device, image_size=section["image_size"], **section["options"])
    if loaded.kind != section["want"]:
        raise BenchError(f"{section['source']}: the {section['format']} format gave a {loaded.kind}, not the "
                         f"{section['want']} asked for")
    return loaded


def _storable(loaded: Loaded) -> bool:
    if loaded.kind == "encoder":
        return describable(loaded.model)
    model = loaded.model
    return isinstance(model, Classifier) and isinstance(model.head, nn.Linear) and describable(model.encoder)


@STAGES.register("checkpoint")
class Checkpoint(Stage):
    """An outside model (any checkpoint layout, RobustBench, module:function) as an encoder or classifier."""

    reads = ()
    provides = "encoder or classifier"  # the job's `want`
    Metrics = CheckpointMetrics
    resources = Resources(gpu=0.0)  # loading and saving only

    def plan(self, planner: Any, params: dict[str, Any], cell: Cell, upstream: Job | None) -> Job:
        section = check_params(params)
        wanted = params.get("encoder")
        if wanted:  # the run's encoder settings, the method's own values filling those left to it
            encoder = from_dict(EncoderConfig, planner.section("encoder"), "encoder")
            options = encoder_options(encoder, wanted.get("normalize", "none"), wanted.get("stem_padding", 1))
            section["options"] = {**options, **section["options"]}
        section["digests"] = identity(section["source"], section["format"], section["options"])
        given = params.get("sha256")
        if given and section["digests"].get("file") != given:
            raise BenchError(f"{section['source']}: sha256 {section['digests'].get('file', 'none')[:12]} is not the "
                             f"{str(given)[:12]} it was planned with (the file changed)")
        name = params.get("name")
        own = Cell(method=name, source=cell.source if name else None, seed=0)  # loading has no randomness
        return planner.add(self, own, config={"checkpoint": section}, label=name or section["format"])

    def run(self, job: Job, ctx: StageContext) -> Record:
        section = job.config["checkpoint"]
        check_unchanged(section["source"], section["format"], section["options"], section["digests"], job.key)
        loaded = load_outside(section, "cpu")
        size = section["image_size"]
        meta = {"method": job.method, "key": job.key, "image_size": size, "format": section["format"],
                "outside": True}
        num_classes = class_count(loaded.model, size) if loaded.kind == "classifier" else None
        if _storable(loaded) and loaded.kind == "encoder":
            save_encoder(ctx.path(ENCODER), loaded.model, meta)
            stored = ENCODER
        elif _storable(loaded):
            save_classifier(ctx.path(CLASSIFIER), loaded.model, classes=[str(i) for i in range(num_classes)],
                            image_size=size, meta=meta)
            stored = CLASSIFIER
        else:
            ctx.save_torch(WEIGHTS, {k: v.detach().cpu() for k, v in loaded.model.state_dict().items()})
            stored = WEIGHTS
        encoder = loaded.model if loaded.kind == "encoder" else None
        metrics = CheckpointMetrics(
            format=section["format"], source=section["source"], kind=loaded.kind, stored=stored,
            architecture=loaded.architecture, branch=loaded.branch, normalize=str(loaded.normalize),
            num_classes=num_classes, feature_dim=getattr(encoder, "feature_dim", None), image_size=size,
            digests=dict(section["digests"]), dropped=list(loaded.dropped), notes=list(loaded.notes))
        return ctx.record(metrics)

    def load(self, job_dir: JobDir, device: Any) -> Any:
        record = job_dir.read_record()
        if CLASSIFIER in record.artifacts:
            return load_classifier(job_dir / CLASSIFIER, device)
        if ENCODER in record.artifacts:
            return load_encoder(job_dir / ENCODER, device)
        section = record.config["checkpoint"]
        check_unchanged(section["source"], section["format"], section["options"], section["digests"], job_dir.key)
        model = load_outside(section, device).model
        state = files.read_torch(job_dir / WEIGHTS)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise BenchError(f"job {job_dir.key}: the model {section['source']} builds no longer fits the weights "
                             f"it imported ({str(exc).splitlines()[0][:200]}); plan it again") from exc
        model.eval()
        model.meta = {"method": record.method, "key": record.key, "image_size": section["image_size"],
                      "num_classes": record.metrics.get("num_classes"), "format": section["format"],
                      "outside": True}
        return model

    def placeholder(self, params: dict[str, Any], data: Any, encoder: Any) -> Any:
        """The checkpoint itself (its architecture is in the file, so there is no random stand-in),
        with the run's encoder settings filling those left to the method."""
        section = check_params(params)
        wanted = params.get("encoder")
        if wanted:
            options = encoder_options(encoder, wanted.get("normalize", "none"), wanted.get("stem_padding", 1))
            section["options"] = {**options, **section["options"]}
        return load_outside(section, data.y.device).model

    def summary(self, record: Record) -> str:
        m = record.metrics
        what = f"{m.get('num_classes')} classes" if m.get("kind") == "classifier" else f"{m.get('feature_dim')} features"
        return f"{m.get('format')} {m.get('kind')}: {m.get('architecture')}, {what}, stored as {m.get('stored')}"
