"""`module:function`: any architecture, built by the user's own code.

The source is "package.module:function" (imported) or "path/to/file.py:function" (run from the
file). THIS RUNS THE USER'S CODE, with the user's rights: only name code you trust. The function
is called with the keyword options given (`kwargs`) and must return an `nn.Module`; `weights`
(a state-dict file) is then loaded into it strictly. Whether it is an encoder or a classifier
is the caller's `want` ("auto" means classifier); an encoder without `feature_dim` gets one
inferred (bench.checkpoints.features).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from torch import nn

from bench.checkpoints.base import Loaded, check_want, finish, load_strict, read_checkpoint, register, unwrap
from bench.errors import BenchError


def import_function(spec: str):
    """The callable named by "module:function" or "file.py:function"."""
    module_name, sep, attr = str(spec).rpartition(":")
    if not sep or not module_name or not attr:
        raise BenchError(f"{spec!r}: the module format needs 'package.module:function' or 'file.py:function'")
    try:
        if module_name.endswith(".py") or "/" in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise BenchError(f"{spec!r}: no file {path}")
            name = f"bench_user_{path.stem}"
            loader_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except BenchError:
        raise
    except Exception as exc:  # any error while importing the user's code
        raise BenchError(f"{spec!r}: could not import {module_name} ({type(exc).__name__}: {exc})") from exc
    fn = getattr(module, attr, None)
    if fn is None:
        raise BenchError(f"{spec!r}: {module_name} has no {attr!r}")
    if not callable(fn):
        raise BenchError(f"{spec!r}: {attr} is a {type(fn).__name__}, not a function")
    return fn


@register("module", "module:function (or file.py:function) returning an nn.Module; RUNS YOUR CODE", runs_code=True,
          source="code")
def load_module(source, *, branch=None, want="auto", device="cpu", normalize=None, weights=None, kwargs=None, **_):
    check_want(want)
    if branch is not None:
        raise BenchError(f"{source}: branch= does not apply to the module format (build the branch you want)")
    fn = import_function(source)
    try:
        model = fn(**(kwargs or {}))
    except BenchError:
        raise
    except Exception as exc:
        raise BenchError(f"{source}: calling it failed ({type(exc).__name__}: {exc})") from exc
    if not isinstance(model, nn.Module):
        raise BenchError(f"{source}: returned a {type(model).__name__}, not a torch.nn.Module")
    notes = [f"built by the user's code {source} (bench ran it)"]
    if weights is not None:
        state, _ = unwrap(read_checkpoint(weights), ("state_dict", "model"), str(weights))
        notes += load_strict(model, state, source=str(weights), layout=f"module {source}")
        notes.append(f"weights from {weights}")
    kind = "encoder" if want == "encoder" else "classifier"
    return Loaded(model=finish(model, device), kind=kind, format="module", source=str(source),
                  architecture=type(model).__name__, normalize=normalize or "as built", notes=notes)
