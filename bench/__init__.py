"""bench: a benchmark harness for robust self-supervised pretraining.

`bench.evaluate(model, data, ...)` evaluates any classifier (or finetunes any encoder first) with
the harness's protocol; it is `bench.api.evaluate`, imported on first use so that `import bench`
stays light (docs/outside-models.md).
"""

__version__ = "0.1.0"

_LAZY = {"evaluate": ("bench.api", "evaluate"), "Evaluation": ("bench.api", "Evaluation"),
         "load_model": ("bench.checkpoints", "load_model")}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'bench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
