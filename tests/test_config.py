import dataclasses

import pytest

from bench import config
from bench.config import EvalConfig, TrainConfig, apply, parse_overrides, resolve
from bench.errors import BenchError


def test_defaults_are_the_paper_protocol():
    ev = EvalConfig()
    assert ev.eps == pytest.approx(8 / 255) and ev.alpha == pytest.approx(2 / 255) and ev.steps == 20
    assert ev.sweep_eps == (2, 4, 6, 8, 10, 12, 16)
    assert ev.sweep_steps == (1, 2, 5, 10, 20, 50, 100)


def test_cli_values_are_parsed_by_field_type():
    cfg = TrainConfig()
    apply("x", cfg, "epochs", "7")
    apply("x", cfg, "lr", "0.5")
    apply("x", cfg, "nesterov", "true")
    apply("x", cfg, "precision", "bf16")
    apply("x", cfg, "decay_at", "[0.6, 0.8]")
    assert (cfg.epochs, cfg.lr, cfg.nesterov, cfg.precision, cfg.decay_at) == (7, 0.5, True, "bf16", (0.6, 0.8))
    with pytest.raises(BenchError, match=r"x.decay_at: 1.5 is above the maximum 1.0"):
        apply("x", cfg, "decay_at", "[0.5, 1.5]")


@pytest.mark.parametrize("key,value,message", [
    ("epochs", "ten", "expected an integer"),
    ("epochs", "0", "below the minimum 1"),
    ("lr", "fast", "expected a number"),
    ("optimizer", "adam", "not one of sgd, lars"),
    ("nesterov", "1", "expected true or false"),
    ("precision", "fp8", "not one of fp32, tf32, bf16, fp16"),
    ("epoch", "3", "Did you mean x.epochs"),
])
def test_bad_values_name_the_key_and_the_fix(key, value, message):
    with pytest.raises(BenchError, match=message):
        apply("x", TrainConfig(), key, value)


def test_training_defaults_to_strict_fp32():
    assert TrainConfig().precision == "fp32"
    assert not any(f.name == "amp" for f in dataclasses.fields(TrainConfig))


def test_train_section_sets_every_method_and_finetuner_and_narrower_sections_win():
    from bench.registry import FINETUNERS, METHODS

    names = METHODS.names() + FINETUNERS.names()
    res = resolve({"train.precision": "bf16"}, names)
    assert {res[n].precision for n in names} == {"bf16"}
    res = resolve({"train.precision": "bf16", "pretrain.precision": "tf32", "acl.precision": "fp32",
                   "finetune.epochs": 3}, names)
    assert res["acl"].precision == "fp32"                                       # the plugin's own section
    assert {res[n].precision for n in METHODS.names() if n != "acl"} == {"tf32"}  # pretrain over train
    assert {res[n].precision for n in FINETUNERS.names()} == {"bf16"}            # train reaches finetuners
    with pytest.raises(BenchError, match="train.precision: 'fp64' is not one of"):
        resolve({"train.precision": "fp64"})
    with pytest.raises(BenchError, match="unknown config key train.precison"):
        resolve({"train.precison": "bf16"})


def test_overrides_must_be_dotted_pairs():
    assert parse_overrides(["eval.n=5"]) == {"eval.n": "5"}
    with pytest.raises(BenchError, match="section.key=value"):
        parse_overrides(["epochs=5"])


def test_resolve_shared_sections_and_plugin_sections():
    res = resolve({"eval.n": 100, "encoder.width": 8, "synthetic.n_train": 64}, ["synthetic"])
    assert res["eval"].n == 100 and res["encoder"].width == 8 and res["synthetic"].n_train == 64
    assert res.as_dict()["eval"]["sweep_eps"] == [2, 4, 6, 8, 10, 12, 16]


def test_resolve_rejects_unknown_sections_with_a_suggestion():
    with pytest.raises(BenchError, match="Did you mean eval.n"):
        resolve({"evl.n": 3})
    with pytest.raises(BenchError, match="unknown config key eval.steps_"):
        resolve({"eval.steps_": 3})


def test_every_preset_in_bench_toml_validates():
    path = config.find_config_file()
    presets = config.load_presets(path)
    assert {"smoke", "quick", "paper"} <= set(presets)
    for name, preset in presets.items():
        settings = config.flatten(preset.get("set", {}))
        resolve(settings)  # raises on any bad key, type or range
        for key in ("methods", "finetune", "datasets", "seeds"):
            assert key in preset, f"preset {name} lacks {key}"


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(BenchError, match="Did you mean 'smoke'"):
        config.get_preset("smoek", config.find_config_file())


def test_configs_round_trip_through_dicts():
    cfg = TrainConfig(epochs=3, decay_at=(0.3, 0.6))
    again = config.from_dict(TrainConfig, config.to_dict(cfg))
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
