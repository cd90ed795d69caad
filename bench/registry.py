"""One generic registry for every kind of plugin.

A decorator registers, `get` looks up with a did-you-mean error, `names` lists, and
third-party packages add entries through the entry-point group `bench.<kind>`.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import pkgutil
from importlib.metadata import entry_points
from typing import Callable, Generic, TypeVar

from bench.errors import BenchError

log = logging.getLogger(__name__)
T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, builtin_packages: tuple[str, ...] = ()):
        self.kind = kind
        self.group = f"bench.{kind}"
        self._builtin_packages = builtin_packages
        self._entries: dict[str, T] = {}
        self._discovered = False

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            existing = self._entries.get(name)
            if existing is not None and existing is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered by {existing!r}")
            self._entries[name] = obj
            try:
                obj.registered_name = name  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                pass
            return obj

        return decorator

    def discover(self) -> None:
        """Import built-in plugin modules and third-party entry points (once)."""
        if self._discovered:
            return
        self._discovered = True
        for package_name in self._builtin_packages:
            package = importlib.import_module(package_name)
            for info in pkgutil.iter_modules(package.__path__):
                if not info.name.startswith("_"):
                    importlib.import_module(f"{package_name}.{info.name}")
        for ep in entry_points(group=self.group):
            if ep.name in self._entries:
                continue
            try:
                obj = ep.load()
            except Exception as exc:  # a broken third-party plugin must not break the rest
                log.warning("could not load %s plugin %r: %s", self.kind, ep.name, exc)
                continue
            if ep.name not in self._entries:
                self.register(ep.name)(obj)

    def get(self, name: str) -> T:
        self.discover()
        if name not in self._entries:
            close = difflib.get_close_matches(name, self._entries, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise BenchError(
                f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(self.names())}"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return [(n, self._entries[n]) for n in self.names()]

    def __contains__(self, name: str) -> bool:
        self.discover()
        return name in self._entries


METHODS: Registry = Registry("methods", ("methods",))
FINETUNERS: Registry = Registry("finetuners", ("bench.finetuners",))
DATASETS: Registry = Registry("datasets", ("bench.datasets",))
ENCODERS: Registry = Registry("encoders", ("bench.models",))
ATTACKS: Registry = Registry("attacks", ("bench.attacks",))
EXECUTORS: Registry = Registry("executors", ("bench.executors",))
STAGES: Registry = Registry("stages", ("bench.stages",))  # the kinds of job

ALL = {r.kind: r for r in (METHODS, FINETUNERS, DATASETS, ENCODERS, ATTACKS, EXECUTORS, STAGES)}
