"""Outside checkpoints onto the harness's models: one module per family, a table of formats.

`load_model(source, format, branch=, want=, device=)` returns a `Loaded` (the model in eval mode,
its kind, what was dropped). Formats (`FORMATS`, `formats()`):

| format | source | module |
|---|---|---|
| bench | a job's encoder.pt / classifier.pt | bench_format |
| advcl | AdvCL pretraining / SLF checkpoint | advcl |
| acl | ACL train_simCLR.py / finetuned checkpoint | acl |
| rocl | RoCL rocl_train.py checkpoint | rocl |
| apdpe | AP-DPE ensemble_pretrain.py checkpoint (its own pre-activation ResNet-50) | apdpe |
| dynacl | DynACL model_encoder_k.pt / momentum wrapper | dynacl |
| solo_learn | a solo-learn / DeACL Lightning checkpoint (backbone.*, stem padding 2) | solo_learn |
| torchvision | a plain torchvision- or timm-layout ResNet state dict | torchvision_format |
| robustbench | a RobustBench model-zoo name (optional package) | robustbench_format |
| module | "package.module:function" or "file.py:function" (runs your code) | module_format |

Every load is strict: keys that do not fit the layout stop it with a message naming the first
missing and unexpected keys. Heads that are not a classifier (projection heads, pretext heads)
and BatchNorm branches not chosen are dropped on purpose and listed in `Loaded.dropped`.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch

from bench.checkpoints import acl, advcl, apdpe, bench_format, dynacl, module_format, robustbench_format, rocl, \
    solo_learn, torchvision_format  # noqa: F401  (each registers its format)
from bench.checkpoints.base import FORMATS, WANTS, Format, Loaded
from bench.checkpoints.features import ensure_feature_dim, infer_feature_dim
from bench.errors import BenchError


def formats() -> list[Format]:
    return [FORMATS[name] for name in sorted(FORMATS)]


def load_model(source: str | Path, format: str, *, branch: str | None = None, want: str = "auto",
               device: torch.device | str = "cpu", image_size: int = 32, **options) -> Loaded:
    """Load an outside model. `format`: a name of `FORMATS`; `branch`: the BatchNorm branch (or
    AP-DPE task) to keep, default the family's downstream one; `want`: auto | encoder |
    classifier; `options`: the format's own (normalize=, weights=, kwargs=, dataset=, ...).
    An encoder is given `feature_dim` if it lacks one."""
    if format not in FORMATS:
        close = difflib.get_close_matches(str(format), FORMATS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise BenchError(f"unknown checkpoint format {format!r}.{hint} Formats: {', '.join(sorted(FORMATS))}")
    loaded = FORMATS[format].load(source, branch=branch, want=want, device=device, **options)
    if loaded.kind == "encoder":
        ensure_feature_dim(loaded.model, image_size)
    return loaded


__all__ = ["FORMATS", "WANTS", "Format", "Loaded", "formats", "load_model", "infer_feature_dim",
           "ensure_feature_dim"]
