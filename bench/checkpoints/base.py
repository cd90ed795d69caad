"""What every checkpoint format shares: the loaded result, the table of formats, reading a file,
finding the state dict inside it, and strict loading with a message that names the keys.

A format is a function `load(source, *, branch, want, device, **options) -> Loaded`, registered
under its name with `@register(name, summary)`. `want` is "auto" (a classifier when the file has
a linear classification head, else an encoder), "encoder" (any classification head dropped) or
"classifier" (a head is required).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from bench.errors import BenchError

WANTS = ("auto", "encoder", "classifier")
SHOWN_KEYS = 5  # how many missing / unexpected keys a message names


@dataclass
class Loaded:
    """An outside model, in eval mode on its device.

    `model` is an encoder (images in [0,1] -> features, with `feature_dim`) when kind is
    "encoder", a classifier (images in [0,1] -> logits) when kind is "classifier".
    """

    model: nn.Module
    kind: str
    format: str
    source: str
    branch: str | None = None           # the BatchNorm branch kept (None: the file had one set)
    num_classes: int | None = None
    architecture: str = ""              # e.g. "ResNet-18 (CIFAR stem), width 64"
    normalize: str = "none"             # the in-model input normalization
    dropped: list[str] = field(default_factory=list)  # what was left out on purpose (heads, other branches)
    notes: list[str] = field(default_factory=list)    # anything the user should know (runs code, guesses)

    @property
    def encoder(self) -> nn.Module:
        """The feature extractor: the model itself, or a classifier's `.encoder`."""
        if self.kind == "encoder":
            return self.model
        encoder = getattr(self.model, "encoder", None)
        if encoder is None:
            raise BenchError(f"{self.source}: this {self.format} classifier has no separate encoder "
                             f"(load it with want='encoder' to finetune it)")
        return encoder

    def describe(self) -> dict[str, Any]:
        """JSON-native facts for a record or a model card."""
        return {"format": self.format, "source": self.source, "kind": self.kind, "branch": self.branch,
                "num_classes": self.num_classes, "architecture": self.architecture, "normalize": self.normalize,
                "dropped": list(self.dropped), "notes": list(self.notes)}


SOURCES = ("file", "code", "name")  # what a format's source is: a checkpoint file, the user's code, a zoo name


@dataclass(frozen=True)
class Format:
    name: str
    summary: str
    load: Callable[..., Loaded]
    runs_code: bool = False  # the format imports and runs the user's Python code
    source: str = "file"     # SOURCES: what identifies a model of this format (bench.checkpoints.identity)


FORMATS: dict[str, Format] = {}


def register(name: str, summary: str, runs_code: bool = False,
             source: str = "file") -> Callable[[Callable[..., Loaded]], Callable[..., Loaded]]:
    if source not in SOURCES:
        raise ValueError(f"format {name}: source {source!r} is not one of {SOURCES}")

    def add(fn: Callable[..., Loaded]) -> Callable[..., Loaded]:
        FORMATS[name] = Format(name, summary, fn, runs_code, source)
        return fn
    return add


def check_want(want: str) -> str:
    if want not in WANTS:
        raise BenchError(f"want={want!r}: one of {', '.join(WANTS)}")
    return want


# ---------------------------------------------------------------- reading files


def read_checkpoint(path: str | Path) -> Any:
    """torch.load with weights_only=True (tensors and plain containers only), with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... here
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text:
            raise BenchError(
                f"{path} holds pickled Python objects, not only tensors; bench reads checkpoints with "
                f"torch.load(weights_only=True) and will not run the code a pickle names. Re-save it as a "
                f"plain state dict (torch.save(model.state_dict(), PATH)) or load it yourself and use the "
                f"`module` format. ({text.splitlines()[0][:200]})") from exc
        raise BenchError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {text[:200]})") from exc


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def unwrap(blob: Any, containers: Iterable[str], source: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """The state dict in a checkpoint: the blob itself, or the first of `containers` that holds one."""
    if is_state_dict(blob):
        return dict(blob), None
    if isinstance(blob, dict):
        for name in containers:
            if is_state_dict(blob.get(name)):
                return dict(blob[name]), name
        found = ", ".join(repr(k) for k in list(blob)[:8])
        raise BenchError(f"{source}: no state dict found: the file is a dict with keys {found}; expected a state "
                         f"dict, or one under {', '.join(repr(c) for c in containers)}")
    raise BenchError(f"{source}: not a state dict (a {type(blob).__name__})")


def strip_prefix(state: dict[str, torch.Tensor], prefixes: Iterable[str]) -> tuple[dict[str, torch.Tensor], str | None]:
    """Remove a wrapper prefix (DataParallel's "module.") that every key carries."""
    for prefix in prefixes:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}, prefix
    return state, None


def take(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove and return the keys under `prefix` ("fc" takes fc.weight, fc.fc1.weight, ...), prefix stripped."""
    out = {}
    for key in [k for k in state if k == prefix or k.startswith(prefix + ".")]:
        out[key[len(prefix) + 1:]] = state.pop(key)
    return out


# ---------------------------------------------------------------- strict loading


def _first(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:SHOWN_KEYS])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > SHOWN_KEYS else "")


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], *, source: str, layout: str,
                unexpected: Iterable[str] = (), hint: str = "", tolerate_missing: Iterable[str] = ()) -> list[str]:
    """model.load_state_dict(state, strict=True), or a BenchError naming the first missing and
    unexpected keys and every shape mismatch. `unexpected`: checkpoint keys the layout could not
    place (they count as unexpected). Missing BatchNorm `num_batches_tracked` counters (files
    from PyTorch < 0.4.1) are filled with 0 and reported in the returned notes."""
    target = model.state_dict()
    unexpected = set(unexpected) | {k for k in state if k not in target}
    missing = {k for k in target if k not in state}
    counters = {k for k in missing if k.endswith("num_batches_tracked")}
    tolerated = counters | (missing & set(tolerate_missing))
    missing -= tolerated
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
              for k in sorted(state) if k in target and state[k].shape != target[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{source}: the checkpoint does not fit the {layout} layout"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_first(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:SHOWN_KEYS])}")
        raise BenchError(". ".join(parts) + (f". {hint}" if hint else ""))
    full = dict(state)
    for k in tolerated:
        full[k] = target[k].clone()
    model.load_state_dict(full, strict=True)
    return [f"{len(counters)} BatchNorm num_batches_tracked counters missing (an old PyTorch file): set to 0"] \
        if counters else []


def finish(model: nn.Module, device: torch.device | str) -> nn.Module:
    return model.to(device).eval()
