"""Code fingerprints for job keys, derived from what the code imports.

A job's key covers the source of every module its run can execute: the stage's module, the
modules of its plugins (method, finetuner, dataset and the classes they inherit from), and,
transitively, every module of the same packages (bench, methods, a plugin's own package) that
those import — statically, at module level or inside functions. Nothing is listed by hand, so a
new harness file that a stage uses is in the keys as soon as it is imported.

Each file is hashed as its AST without docstrings, so comments, docstrings and formatting do
not count. A package's `__init__` is hashed too (it runs on import), but only its module-level
imports are followed: lazy exports inside its functions do not pull the whole package in.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Iterable

_digests: dict[tuple[str, int, int], str] = {}  # (path, mtime, size) -> digest: each file parsed once
OWN_PACKAGES = ("bench", "methods")


def source_digest(path: str | Path) -> str:
    """Hash of a Python file's code: its AST without docstrings. A file that does not parse is hashed as bytes."""
    path = Path(path)
    stat = path.stat()
    cache_key = (str(path), stat.st_mtime_ns, stat.st_size)
    if cache_key not in _digests:
        data = path.read_bytes()
        try:
            tree = ast.parse(data)
        except (SyntaxError, ValueError):
            text = data
        else:
            for node in ast.walk(tree):
                body = getattr(node, "body", None)
                if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                        and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                        and isinstance(body[0].value.value, str)):
                    node.body = body[1:] or [ast.Pass()]
            text = ast.dump(tree).encode()
        _digests[cache_key] = hashlib.sha256(text).hexdigest()
    return _digests[cache_key]


def _module_file(name: str) -> Path | None:
    module = sys.modules.get(name)
    file = getattr(module, "__file__", None)
    if file is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
        file = spec.origin if spec is not None else None
    return Path(file) if file and str(file).endswith(".py") else None


def _imports(name: str, path: Path, module_level_only: bool) -> set[str]:
    """Module names that `path` (module `name`) imports: candidates, filtered by the caller."""
    try:
        stat = path.stat()
    except OSError:
        return set()
    return _parsed_imports(name, str(path), stat.st_mtime_ns, stat.st_size, module_level_only)


@functools.lru_cache(maxsize=None)
def _parsed_imports(name: str, file: str, mtime_ns: int, size: int, module_level_only: bool) -> frozenset[str]:
    path = Path(file)
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError):
        return frozenset()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if module_level_only else ast.walk(tree)
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return frozenset(out)


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def module_closure(roots: Iterable[str], packages: Iterable[str] = OWN_PACKAGES) -> dict[str, Path]:
    """{module name: file} of `roots` and every module of `packages` they import, transitively."""
    packages = tuple(packages)
    own = lambda n: n.partition(".")[0] in packages  # noqa: E731
    out: dict[str, Path] = {}
    todo = [(n, False) for n in roots]
    while todo:
        name, module_level_only = todo.pop()
        if name in out or not own(name):
            continue
        path = _module_file(name)
        if path is None:
            continue  # an attribute imported with `from pkg import name`, not a module
        out[name] = path
        for parent in _parents(name):
            if parent not in out:
                todo.append((parent, True))
        is_package = path.name == "__init__.py"
        for imported in _imports(name, path, module_level_only or is_package):
            if own(imported) and imported not in out:
                todo.append((imported, False))
    return out


def _object_modules(obj: Any) -> list[str]:
    """The module of `obj` and of every base class it inherits from."""
    classes = getattr(obj, "__mro__", None) or (obj,)
    return [m for m in (getattr(c, "__module__", None) for c in classes) if m and m != "builtins"]


def _roots(objects: Iterable[Any]) -> tuple[list[str], list[str]]:
    """The modules to start from, and the packages whose modules count (ours and each plugin's own)."""
    objects = list(objects)
    packages = sorted(set(OWN_PACKAGES) | {str(getattr(o, "__module__", "")).partition(".")[0] for o in objects} - {""})
    roots = sorted({m for obj in objects for m in _object_modules(obj) if m.partition(".")[0] in packages})
    return roots, packages


def code_modules(objects: Iterable[Any]) -> dict[str, Path]:
    """{module: file} that `code_fingerprint(objects)` covers."""
    return module_closure(*_roots(objects))


def code_fingerprint(objects: Iterable[Any]) -> str:
    """Digest of the code that `objects` (a stage class, plugin classes) can run."""
    files = code_modules(objects)
    digests = {name: source_digest(path) for name, path in sorted(files.items())}
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()
