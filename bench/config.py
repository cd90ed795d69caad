"""Typed configuration: plugin dataclasses with paper defaults, presets, key=value overrides.

Every plugin (method, finetuner, dataset) owns a dataclass `Config`. Sections of the resolved
config are named after the plugin (`advcl.epochs=10`), plus the shared sections below.
`pretrain.X` / `finetune.X` set X on every method / finetuner that has it, `train.X` on every
method and finetuner; the narrower section wins (plugin > pretrain/finetune > train). Every
key, type and range is checked before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.errors import BenchError


def param(default: Any, *, min: float | None = None, max: float | None = None,
          choices: typing.Sequence[Any] | None = None, help: str = "",
          aliases: typing.Mapping[Any, Any] | None = None) -> Any:
    """A config field with its validation rules (used like dataclasses.field). `aliases` maps
    shorthand values to what they stand for (AdvCL's `views=4`: Table 4's row 4 view set)."""
    meta = {"min": min, "max": max, "choices": tuple(choices) if choices else None, "help": help,
            "aliases": dict(aliases) if aliases else None}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """What the one training loop needs; methods and finetuners extend it."""

    epochs: int = param(1, min=1)
    batch_size: int = param(128, min=1)
    lr: float = param(0.1, min=0.0)
    momentum: float = param(0.9, min=0.0, max=1.0)
    weight_decay: float = param(0.0, min=0.0)
    optimizer: str = param("sgd", choices=("sgd", "lars"))
    nesterov: bool = False
    schedule: str = param("cosine", choices=("cosine", "step", "constant"))
    warmup_epochs: int = param(0, min=0)
    warmup_from: float = param(0.0, min=0.0, help="initial lr of a linear warm-up")
    min_lr: float = param(0.0, min=0.0, help="eta_min of the cosine schedule")
    decay_at: tuple[float, ...] = param((), min=0.0, max=1.0,
                                        help="step schedule: fractions of `epochs` where lr is multiplied by gamma "
                                             "(0.6, 0.8 = epochs 15 and 20 of 25), so shorter runs still decay")
    gamma: float = param(0.1, min=0.0, max=1.0)
    steps_per_epoch: int = param(0, min=0, help="cap on steps per epoch (0 = whole split)")
    checkpoint_every: int = param(1, min=1, help="epochs between checkpoints")
    last_batch: str = param("official", choices=("official", "keep", "drop"),
                            help="a final partial batch: official = as the method's official loader, or "
                                 "always keep / drop it")
    precision: str = param("fp32", choices=("fp32", "tf32", "bf16", "fp16"),
                           help="training precision: fp32 strict (TF32 off on CUDA, the official codes' "
                                "precision), tf32 (TF32 matmul/cuDNN allowed), bf16 autocast, fp16 autocast with "
                                "loss scaling (CUDA only); anything but fp32 is flagged in the record "
                                "(bench.train.precision)")
    # Data parallelism (bench.train.distributed; `bench run --gpus-per-job N` runs a job on N processes)
    bn_devices: int = param(0, min=0,
                            help="BatchNorm statistics: 0 = of the whole global batch on any number of processes "
                                 "(synchronized, SyncBatchNorm); N = per device, as N unsynchronized GPUs compute "
                                 "them (the official AdvCL/RoCL runs): the job must run on N processes")
    # Fast paths (bench.train.fastpath): float-level changes only, so not part of a job's key
    channels_last: bool = param(False, help="channels-last weights and activations (cuDNN tensor cores)")
    cudnn_benchmark: bool = param(False, help="cuDNN algorithm search per input shape (CUDA; not bit-reproducible)")
    compile: bool = param(False, help="torch.compile the encoder and the attack step")
    # Monitoring (pretraining): an online k-NN accuracy of the encoder (bench.train.knn); not in the key
    knn_every: int = param(10, min=0, help="epochs between online k-NN accuracies of the encoder (0 = never)")
    knn_images: int = param(5000, min=10, help="labelled training images of the k-NN monitor (4/5 bank, 1/5 queries)")


@dataclass
class EncoderConfig:
    arch: str = param("resnet18", help="a registered encoder (`bench list encoders`)")
    width: int = param(64, min=1, help="channels of the stem (64 = the paper's ResNet-18)")
    stem_padding: int = param(-1, min=-1, max=3,
                              help="padding of the 3x3 stem conv: 1 = the CIFAR ResNet (32x32 stem output), "
                                   "2 = the torchvision-layout CIFAR ResNet of solo-learn/DeACL (34x34); "
                                   "-1 = the method's own (2 for deacl, 1 for the others)")
    normalize: str = param("method", choices=("method", "none", "imagenet", "cifar10"),
                           help="input normalization inside the model; method = the method's own "
                                "(none: AdvCL, RoCL, SimCLR; imagenet: ACL, AP-DPE; cifar10: DeACL)")


@dataclass
class DataConfig:
    val_size: int = param(-1, min=-1, help="validation images carved from the training split; -1 = the dataset's "
                                           "own (5000 for CIFAR, 500 for STL-10, n_train/10 for synthetic)")
    train_limit: int = param(0, min=0, help="use only the first N training images (0 = all)")
    pretrain_split: str = param("auto", choices=("auto", "all", "train"),
                                help="what pretraining reads: all = the whole training split (auto for methods "
                                     "that do not read labels, as their official code), train = without the "
                                     "validation images (auto for methods that read labels)")
    download: bool = param(True, help="let torchvision download missing datasets")


@dataclass
class EvalConfig:
    n: int = param(10000, min=1, help="test images for SA and RA (first n of the test split)")
    aa_n: int = param(10000, min=0, help="test images for AutoAttack (0 = skip AA)")
    sweep_n: int = param(1000, min=0, help="test images per attack-strength point (0 = skip)")
    val_n: int = param(1000, min=1, help="validation images for model selection")
    eps: float = param(8 / 255, min=0.0, max=1.0)
    alpha: float = param(2 / 255, min=0.0, max=1.0)
    steps: int = param(20, min=1)
    restarts: int = param(1, min=1)
    clamp_start: bool = param(False, help="clip PGD's random start x + U(-eps, eps) to [0, 1] before the first step "
                                          "(false: unclipped, as AdvCL's and ACL's official evaluations; every "
                                          "step clips either way); recorded in the PGD protocol")
    selection_steps: int = param(20, min=1, help="PGD steps of the validation attack")
    aa_version: str = param("standard", choices=("standard", "plus", "rand"))
    aa_budget: float = param(1.0, min=0.001, max=1.0,
                             help="fraction of AutoAttack's iterations and queries (1 = the standard budget; "
                                  "less is for smoke runs and is flagged in every record)")
    sweep_eps: tuple[int, ...] = (2, 4, 6, 8, 10, 12, 16)
    sweep_steps: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100)
    batch_size: int = param(500, min=1)
    seed: int = 0
    # The threat model (bench.attacks.threat): eps, alpha and sweep_eps above are the L-inf values,
    # the l2_ ones the L2 values; `norm` picks the set for RA, AA and the sweeps.
    norm: str = param("Linf", choices=("Linf", "L2"), help="threat model of RA, AA and the sweeps")
    l2_eps: float = param(0.5, min=0.0, help="L2 radius (used when norm = L2; RobustBench's CIFAR value)")
    l2_alpha: float = param(0.125, min=0.0, help="L2 PGD step (used when norm = L2; eps / 4 as for L-inf)")
    l2_sweep_eps: tuple[float, ...] = param((0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 1.0), min=0.0,
                                            help="L2 radii of the eps sweep (used when norm = L2)")


@dataclass
class SelectConfig:
    """Epoch-level data selection for pretraining (air_rcs.md B; `bench.selection`).

    Full pool for the warm-up epochs, then a subset re-chosen at 1-based epochs e >= warmup with
    (e - 1) % every == 0 and reused in between. `random` works with every pretrainer, `rcs` (RCS,
    Xu et al. 2023) with the ACL family only.
    """

    method: str = param("none", choices=("none", "random", "rcs"))
    fraction: float = param(0.2, min=1e-6, max=1.0, help="budget: floor(floor(N f) / b) candidate batches")
    warmup: int = param(100, min=0, help="epochs on the whole pool first")
    every: int = param(20, min=1, help="epochs between selections")
    candidate_batch: int = param(0, min=0, help="images per candidate batch b (0 = the method's batch size; "
                                                "RCS's undefined Coreset_bs)")
    val_fraction: float = param(0.01, min=0.0, max=0.5, help="RCS validation images, drawn once from the run seed")
    val_attack_steps: int = param(3, min=0, help="PGD steps of the RCS validation attack")
    val_step: float = param((10 / 255) / 3, min=0.0, max=1.0, help="step size of the RCS validation attack")
    coreset_lr: float = param(0.01, min=0.0, help="lr of RCS's greedy head steps")
    rcs_double_step: bool = param(True, help="apply each greedy head step twice, as the released code does")
    val_rows: str = param("code", choices=("code", "all"),
                          help="code: the released code's rows (first half of each validation batch, each twice); "
                               "all: every validation image once")
    val_in_pool: bool = param(False, help="let RCS pick (and the warm-up train on) the validation images "
                                          "(the released DynACL-RCS)")


SHARED_SECTIONS: dict[str, type] = {
    "encoder": EncoderConfig,
    "data": DataConfig,
    "eval": EvalConfig,
    "select": SelectConfig,
}
BROADCAST_SECTIONS = ("train", "pretrain", "finetune")
# which plugin kinds each broadcast section reaches
BROADCAST_KINDS = {"train": ("pretrain", "finetune"), "pretrain": ("pretrain",), "finetune": ("finetune",)}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_cli_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def coerce(section: str, f: dataclasses.Field, hint: Any, value: Any) -> Any:
    """Convert `value` to the field's type and check its rules, or raise BenchError."""
    key = f"{section}.{f.name}"
    if isinstance(value, str) and hint is not str:
        value = _parse_cli_value(value)
    aliases = f.metadata.get("aliases")
    if aliases and not isinstance(value, (list, dict, bool)) and value in aliases:
        value = aliases[value]
    origin = typing.get_origin(hint)
    if origin is tuple or hint is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        args = typing.get_args(hint)
        item_type = args[0] if args else Any
        if item_type in (int, float):
            for item in items:
                if isinstance(item, bool) or not isinstance(item, (int, float)) or (
                        item_type is int and not isinstance(item, int)):
                    raise BenchError(f"{key}: expected a list of {item_type.__name__}, got {value!r}")
        for item in items:
            _check_range(key, f.metadata, item)
        return tuple(items)
    if hint is bool:
        if not isinstance(value, bool):
            raise BenchError(f"{key}: expected true or false, got {value!r}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BenchError(f"{key}: expected an integer, got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BenchError(f"{key}: expected a number, got {value!r}")
        value = float(value)
    elif hint is str and not isinstance(value, str):
        raise BenchError(f"{key}: expected a string, got {value!r}")
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise BenchError(f"{key}: {value!r} is not one of {', '.join(map(str, meta['choices']))}")
    _check_range(key, meta, value)
    return value


def _check_range(key: str, meta: typing.Mapping[str, Any], value: Any) -> None:
    if meta.get("min") is not None and value < meta["min"]:
        raise BenchError(f"{key}: {value!r} is below the minimum {meta['min']}")
    if meta.get("max") is not None and value > meta["max"]:
        raise BenchError(f"{key}: {value!r} is above the maximum {meta['max']}")


def apply(section: str, cfg: Any, key: str, value: Any) -> None:
    """Set cfg.key = value with validation; an unknown key gets a did-you-mean error."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    if key not in fields:
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f" Did you mean {section}.{close[0]}?" if close else ""
        raise BenchError(f"unknown config key {section}.{key}.{hint} Keys: {', '.join(fields)}")
    setattr(cfg, key, coerce(section, fields[key], _hints(type(cfg))[key], value))


def to_dict(cfg: Any) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def from_dict(cls: type, values: dict[str, Any], section: str = "") -> Any:
    cfg = cls()
    for key, value in values.items():
        apply(section or cls.__name__, cfg, key, value)
    return cfg


def parse_overrides(items: typing.Iterable[str]) -> dict[str, Any]:
    """['advcl.epochs=3', ...] -> {'advcl.epochs': '3'}; values are parsed per field later."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise BenchError(f"override {item!r} must look like section.key=value (e.g. advcl.epochs=10)")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


# ---------------------------------------------------------------- presets (bench.toml)


def find_config_file(explicit: str | Path | None = None) -> Path:
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise BenchError(f"config file {path} does not exist")
        return path
    # the working folder's, else the project's own (one file, at the top of the checkout)
    for candidate in (Path.cwd() / "bench.toml", Path(__file__).resolve().parent.parent / "bench.toml"):
        if candidate.is_file():
            return candidate
    raise BenchError("no bench.toml found; pass --config PATH")


def load_presets(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise BenchError(f"{path}: not valid TOML: {exc}") from exc
    return data.get("presets", {})


def get_preset(name: str, path: Path) -> dict[str, Any]:
    presets = load_presets(path)
    if name not in presets:
        close = difflib.get_close_matches(name, presets, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise BenchError(f"unknown preset {name!r}.{hint} Presets in {path}: {', '.join(presets)}")
    return presets[name]


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'advcl': {'epochs': 3}} -> {'advcl.epochs': 3}."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, full + "."))
        else:
            out[full] = value
    return out


# ---------------------------------------------------------------- resolving a whole run


@dataclass
class Resolved:
    """The validated configuration of a run: shared sections and one dataclass per plugin."""

    sections: dict[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.sections[name]

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {name: to_dict(cfg) for name, cfg in self.sections.items()}


def _plugin_registries():
    from bench import registry

    return (registry.METHODS, registry.FINETUNERS, registry.DATASETS, registry.STAGES)


def plugin_config(plugin: Any) -> Any | None:
    cls = getattr(plugin, "Config", None)
    return cls() if cls is not None else None


def resolve(settings: dict[str, Any], plugins: typing.Iterable[str] = ()) -> Resolved:
    """Validate every dotted setting and build the config of the shared sections and `plugins`.

    Settings for plugins that are not in `plugins` are still checked (a typo in a preset
    fails whatever the run selects) but not kept.
    """
    methods, finetuners, datasets, stages = _plugin_registries()
    all_configs: dict[str, Any] = {}
    kind_of: dict[str, str] = {}
    for reg, kind in ((methods, "pretrain"), (finetuners, "finetune"), (datasets, "dataset"), (stages, "stage")):
        for name, plugin in reg.items():
            all_configs[name] = plugin_config(plugin)
            kind_of[name] = kind
    sections: dict[str, Any] = {name: cls() for name, cls in SHARED_SECTIONS.items()}

    def ordered(item: tuple[str, Any]) -> int:
        section = item[0].split(".", 1)[0]
        return 0 if section == "train" else 1 if section in BROADCAST_SECTIONS else 2

    for dotted, value in sorted(settings.items(), key=ordered):
        section, _, key = dotted.partition(".")
        if section in sections:
            apply(section, sections[section], key, value)
        elif section in BROADCAST_SECTIONS:
            targets = [c for n, c in all_configs.items() if kind_of[n] in BROADCAST_KINDS[section] and c is not None
                       and key in {f.name for f in dataclasses.fields(c)}]
            if key in {f.name for f in dataclasses.fields(TrainConfig)}:
                targets.append(TrainConfig())  # checks the value even when no plugin is selected
            if not targets:
                close = difflib.get_close_matches(key, [f.name for f in dataclasses.fields(TrainConfig)], n=1)
                hint = f" Did you mean {section}.{close[0]}?" if close else ""
                raise BenchError(f"unknown config key {dotted}: no {section} plugin has {key!r}.{hint}")
            for cfg in targets:
                apply(section, cfg, key, value)
        elif section in all_configs:
            if all_configs[section] is None:
                raise BenchError(f"{section} has no settings (got {dotted})")
            apply(section, all_configs[section], key, value)
        else:
            known = list(sections) + list(BROADCAST_SECTIONS) + list(all_configs)
            close = difflib.get_close_matches(section, known, n=1)
            hint = f" Did you mean {close[0]}.{key}?" if close else ""
            raise BenchError(f"unknown config section {section!r} in {dotted}.{hint} Sections: {', '.join(known)}")
    for name in plugins:
        if name not in all_configs:
            raise BenchError(f"unknown plugin {name!r}")
        if all_configs[name] is not None:
            sections[name] = all_configs[name]
    check_registered(sections["encoder"])
    return Resolved(sections)


def check_registered(encoder: EncoderConfig) -> None:
    """Settings that name a registered plugin are checked here, before any work (not when a job runs)."""
    from bench.registry import ENCODERS

    if encoder.arch not in ENCODERS:
        ENCODERS.get(encoder.arch)  # the registry's error: did you mean, and every known name


def check_selection(select: SelectConfig, method_classes: typing.Iterable[type]) -> None:
    """`select.method=rcs` needs a method that exposes RCS's parts (the ACL family)."""
    if select.method != "rcs":
        return
    unsupported = [getattr(m, "registered_name", m.__name__) for m in method_classes
                   if not getattr(m, "supports_rcs", False)]
    if unsupported:
        raise BenchError(f"select.method=rcs works only with the ACL family (acl, acl_air, dynacl, dynacl_air, ...); "
                         f"not with {', '.join(unsupported)}. Use select.method=random for those")


# ---------------------------------------------------------------- variants (several settings of one grid)


@dataclass
class Variant:
    """One labelled configuration of a grid: dotted settings applied over the run's own."""

    label: str
    settings: dict[str, Any]


def split_values(text: str) -> list[str]:
    """'1,2,[2,10],"a,b"' -> ['1', '2', '[2,10]', '"a,b"']: commas outside brackets and quotes."""
    out, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:i].strip())
            start = i + 1
    out.append(text[start:].strip())
    return out


def _short_names(keys: list[str]) -> dict[str, str]:
    """Each dotted key without its section where that stays unambiguous among `keys`."""
    tails = [k.split(".", 1)[-1] for k in keys]
    return {k: (t if tails.count(t) == 1 else k) for k, t in zip(keys, tails)}


def parse_vary(items: typing.Iterable[str]) -> list[Variant]:
    """`--vary` terms (KEY=V1,V2,...; a flag may hold several, separated by spaces) as the cartesian
    product of their values, each a variant labelled `key=value, ...` in the order given."""
    import itertools

    axes: dict[str, list[str]] = {}
    for item in items:
        for term in str(item).split():
            key, eq, raw = term.partition("=")
            key = key.strip()
            if not eq or "." not in key or not raw.strip():
                raise BenchError(f"--vary {term!r} must look like section.key=V1,V2,... "
                                 "(e.g. --vary advcl.views=4,7)")
            if key in axes:
                raise BenchError(f"--vary names {key} twice; give all its values in one term ({key}=V1,V2,...)")
            values = split_values(raw)
            if any(not v for v in values):
                raise BenchError(f"--vary {term!r}: an empty value (values are comma-separated)")
            if len(set(values)) != len(values):
                raise BenchError(f"--vary {term!r} repeats a value")
            axes[key] = values
    if not axes:
        return []
    names = _short_names(list(axes))
    out = []
    for combo in itertools.product(*axes.values()):
        settings = dict(zip(axes, combo))
        out.append(Variant(", ".join(f"{names[k]}={v}" for k, v in settings.items()), settings))
    return out


_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def preset_variants(table: typing.Mapping[str, Any], preset: str) -> tuple[list[Variant], list[str]]:
    """A preset's named variants (`[presets.NAME.variants.LABEL]`, dotted settings) and notes.

    A string value may name an environment variable as `${NAME}` (a label file a run needs from
    outside); a variant naming one that is unset is left out, and a note says what to set."""
    import os

    variants, notes = [], []
    missing: dict[str, list[str]] = {}
    for label, values in table.items():
        if not isinstance(values, dict) or not values:
            raise BenchError(f"preset {preset}: variant {label!r} must be a table of dotted settings "
                             f"([presets.{preset}.variants.{label}] with e.g. \"advcl.views\" = 4)")
        settings = flatten(values)
        unset = [name for v in settings.values() if isinstance(v, str) for name in _REFERENCE.findall(v)
                 if not os.environ.get(name)]
        if unset:
            for name in unset:
                missing.setdefault(name, []).append(str(label))
            continue
        settings = {k: (_REFERENCE.sub(lambda m: os.environ[m.group(1)], v) if isinstance(v, str) else v)
                    for k, v in settings.items()}
        variants.append(Variant(str(label), settings))
    for name, labels in missing.items():
        notes.append(f"preset {preset}: variant(s) {', '.join(labels)} need the environment variable {name} "
                     f"(see the preset's comment in bench.toml); left out. Set {name}=PATH to run them")
    return variants, notes
