import pytest

from bench import registry
from bench.errors import BenchError
from bench.registry import Registry


def test_register_lookup_and_listing():
    reg = Registry("widgets")

    @reg.register("alpha")
    class Alpha:
        """An alpha widget."""

    assert reg.get("alpha") is Alpha
    assert reg.names() == ["alpha"]
    assert "alpha" in reg and "beta" not in reg
    assert Alpha.registered_name == "alpha"


def test_unknown_name_suggests_the_closest():
    reg = Registry("widgets")
    reg.register("advcl")(object)
    with pytest.raises(BenchError, match="Did you mean 'advcl'"):
        reg.get("advlc")


def test_duplicate_registration_is_refused():
    reg = Registry("widgets")
    reg.register("a")(int)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(str)


@pytest.mark.parametrize("kind", sorted(registry.ALL))
def test_every_builtin_registry_discovers(kind):
    # Importing every built-in plugin module must work and leave names listed in order.
    names = registry.ALL[kind].names()
    assert names == sorted(names)


def test_builtin_entries_exist():
    assert {"cifar10", "cifar100", "stl10", "synthetic"} <= set(registry.DATASETS.names())
    assert "resnet18" in registry.ENCODERS.names()
