"""The harness's own files: a pretrain job's `encoder.pt` and a finetune job's `classifier.pt`.

encoder.pt: `{'spec': {arch, width, normalize, branch}, 'state', 'meta'}` (bench.models.save_encoder);
classifier.pt: `{'spec', 'num_classes', 'classes', 'image_size', 'encoder', 'head', 'meta'}`
(bench.finetune.save_classifier). Both load with weights_only=True and strictly.
"""

from __future__ import annotations

from bench.checkpoints.base import Loaded, check_want, finish, load_strict, read_checkpoint, register
from bench.errors import BenchError
from bench.models import Classifier
from bench.models.resnet import build_encoder


def _encoder(spec, state, where):
    try:
        encoder = build_encoder(spec["arch"], int(spec["width"]), (spec["branch"],), spec["normalize"])
    except (KeyError, TypeError) as exc:
        raise BenchError(f"{where}: a bench file whose spec {spec!r} is incomplete ({exc})") from exc
    load_strict(encoder, state, source=where, layout="bench")
    return encoder


@register("bench", "the harness's own encoder.pt (pretrain job) or classifier.pt (finetune job)")
def load_bench(source, *, branch=None, want="auto", device="cpu", normalize=None, **_):
    check_want(want)
    where = str(source)
    blob = read_checkpoint(source)
    if isinstance(blob, dict) and "encoder_job" in blob and "spec" not in blob:
        raise BenchError(f"{where}: a classifier.pt whose encoder is an outside architecture (rebuilt by job "
                         f"{blob['encoder_job']}); export it with `bench export` and load that with its own model")
    if not isinstance(blob, dict) or "spec" not in blob:
        raise BenchError(f"{where}: not a bench encoder.pt / classifier.pt (no 'spec' entry); "
                         f"name its format (bench list formats)")
    spec = blob["spec"]
    if branch not in (None, spec.get("branch")):
        raise BenchError(f"{where}: this bench file keeps BatchNorm branch {spec.get('branch')!r} only")
    if normalize not in (None, spec.get("normalize")):
        raise BenchError(f"{where}: this bench file normalizes with {spec.get('normalize')!r}")
    arch = f"{spec.get('arch')} (CIFAR 3x3 stem), width {spec.get('width')}"
    facts = dict(format="bench", source=where, branch=spec.get("branch"), architecture=arch,
                 normalize=spec.get("normalize", "none"))
    if "state" in blob:  # encoder.pt
        if want == "classifier":
            raise BenchError(f"{where}: an encoder.pt has no classification head; finetune it (want='encoder')")
        return Loaded(model=finish(_encoder(spec, blob["state"], where), device), kind="encoder", **facts)
    if "encoder" not in blob or "head" not in blob:
        raise BenchError(f"{where}: a bench file with neither 'state' (encoder.pt) nor 'encoder' and 'head' "
                         f"(classifier.pt)")
    encoder = _encoder(spec, blob["encoder"], where)
    if want == "encoder":
        return Loaded(model=finish(encoder, device), kind="encoder", dropped=["the classification head"], **facts)
    model = Classifier(encoder, int(blob["num_classes"]))
    load_strict(model.head, blob["head"], source=where, layout="bench (classification head)")
    notes = [f"classes: {', '.join(map(str, blob.get('classes', [])))}; image size {blob.get('image_size')}"]
    return Loaded(model=finish(model, device), kind="classifier", num_classes=int(blob["num_classes"]),
                  notes=notes, **facts)
