"""What identifies an outside model in a job key: the content digests of what its load reads.

- a `file` format (every checkpoint layout): the sha256 of the checkpoint file;
- the `module` format: the sha256 of the Python file that defines the function (located without
  running it; for "file.py:function" the file itself) and of its `weights` file when one is given.
  Modules that this file imports in turn are not covered: edit one and the job is not redone;
- a `name` format (RobustBench): nothing beyond the name and options (the zoo pins a name to its
  weights).

`identity(source, format, options)` gives the digests planned into the key; `check_unchanged`
refuses to load a model whose files no longer have them (a job's record would otherwise describe
another model than the one it measured).
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any

from bench.checkpoints.base import FORMATS
from bench.errors import BenchError


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _format(name: str):
    if name not in FORMATS:
        from bench.checkpoints import load_model

        load_model("", name)  # the unknown-format message with its did-you-mean
    return FORMATS[name]


def resolve_source(source: str | Path, format: str) -> str:
    """The source as a job stores it: an absolute path for files and file.py:function specs."""
    kind = _format(format).source
    text = str(source)
    if kind == "file":
        return str(Path(text).expanduser().resolve())
    if kind == "code":
        module, sep, attr = text.rpartition(":")
        if sep and (module.endswith(".py") or "/" in module):
            return f"{Path(module).expanduser().resolve()}:{attr}"
    return text


def module_file(spec: str) -> Path:
    """The file that defines the function of a "module:function" spec, found without running it
    (importing the module's parent packages, as `importlib.util.find_spec` does)."""
    module, sep, attr = str(spec).rpartition(":")
    if not sep or not module or not attr:
        raise BenchError(f"{spec!r}: the module format needs 'package.module:function' or 'file.py:function'")
    if module.endswith(".py") or "/" in module:
        path = Path(module)
        if not path.is_file():
            raise BenchError(f"{spec!r}: no file {path}")
        return path
    try:
        found = importlib.util.find_spec(module)
    except Exception as exc:  # a parent package that fails to import: the user's code
        raise BenchError(f"{spec!r}: could not import {module} ({type(exc).__name__}: {exc})") from exc
    if found is None or not found.origin or not str(found.origin).endswith(".py"):
        raise BenchError(f"{spec!r}: could not import {module} (no Python source file for it on the path)")
    return Path(found.origin)


def identity(source: str, format: str, options: dict[str, Any] | None = None) -> dict[str, str]:
    """{"file": sha256} | {"code": sha256, "weights": sha256} | {}: what the key covers of `source`."""
    kind = _format(format).source
    options = options or {}
    if kind == "file":
        path = Path(source)
        if not path.is_file():
            raise BenchError(f"no checkpoint at {path}")
        return {"file": sha256(path)}
    if kind == "code":
        out = {"code": sha256(module_file(source))}
        if options.get("weights"):
            weights = Path(str(options["weights"]))
            if not weights.is_file():
                raise BenchError(f"{source}: no weights file {weights}")
            out["weights"] = sha256(weights)
        return out
    return {}


def check_unchanged(source: str, format: str, options: dict[str, Any] | None, expected: dict[str, str],
                    job: str) -> None:
    """BenchError when a file of `source` no longer has the digest job `job` was planned with."""
    now = identity(source, format, options)
    changed = [name for name, digest in expected.items() if now.get(name) != digest]
    if changed:
        raise BenchError(f"{source}: its {' and '.join(changed)} changed since job {job} was planned "
                         f"(sha256 {now.get(changed[0], 'absent')[:12]}, planned {expected[changed[0]][:12]}); "
                         f"plan it again (bench evaluate / bench run): the new content is a new job")
