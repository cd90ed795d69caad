"""A RobustBench model-zoo entry, through the optional `robustbench` package.

`robustbench.utils.load_model(name, model_dir, dataset, threat_model)` builds the model and
downloads its weights (from the zoo's hosts, so it needs the network) into `model_dir`. Zoo
models take [0,1] images (their normalization is inside) and return logits: a classifier.

Known problem (robustbench 1.1.1, the current PyPI release): `import robustbench` imports
`robustbench.eval`, which does `from autoattack import AutoAttack`. The `pyautoattack` package
bench depends on provides the module `pyautoattack`, not `autoattack`, so the import fails.
bench does not patch it; the message says how to get the module RobustBench expects.
"""

from __future__ import annotations

from bench.checkpoints.base import Loaded, check_want, finish, register
from bench.errors import BenchError

AUTOATTACK_MISSING = (
    "robustbench is installed but cannot be imported: its release imports a module `autoattack` (the AutoAttack "
    "authors' GitHub package), and the PyPI package `pyautoattack` that bench uses provides `pyautoattack` "
    "instead. Workaround: pip install git+https://github.com/fra31/auto-attack (it installs the `autoattack` "
    "module beside pyautoattack; bench keeps using pyautoattack), then retry.")
NOT_INSTALLED = ("the robustbench format needs the optional robustbench package: pip install 'bench[robustbench]' "
                 "(or pip install robustbench)")


def import_load_model():
    try:
        from robustbench.utils import load_model
    except ModuleNotFoundError as exc:
        if exc.name == "autoattack" or (exc.name or "").startswith("autoattack."):
            raise BenchError(AUTOATTACK_MISSING) from exc
        if (exc.name or "").split(".")[0] == "robustbench":
            raise BenchError(NOT_INSTALLED) from exc
        raise BenchError(f"robustbench cannot be imported: {exc}") from exc
    except ImportError as exc:
        raise BenchError(f"robustbench cannot be imported: {exc}") from exc
    return load_model


@register("robustbench", "a RobustBench model-zoo name (optional robustbench package; downloads the weights)",
          source="name")
def load_robustbench(source, *, branch=None, want="auto", device="cpu", normalize=None, dataset="cifar10",
                     threat_model="Linf", model_dir="models", **_):
    check_want(want)
    if want == "encoder":
        raise BenchError(f"{source}: RobustBench models are classifiers; evaluate them directly (want='classifier')")
    load_model = import_load_model()
    try:
        model = load_model(model_name=str(source), model_dir=str(model_dir), dataset=dataset,
                           threat_model=threat_model)
    except KeyError as exc:
        raise BenchError(f"{source}: not in RobustBench's {dataset} {threat_model} zoo ({exc})") from exc
    except Exception as exc:
        raise BenchError(f"{source}: RobustBench could not load it ({type(exc).__name__}: {exc})") from exc
    return Loaded(model=finish(model, device), kind="classifier", format="robustbench", source=str(source),
                  architecture=type(model).__name__, normalize="inside the zoo model",
                  notes=[f"RobustBench zoo: {dataset}, {threat_model}, weights under {model_dir}"])
