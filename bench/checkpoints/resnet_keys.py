"""Key maps from the common ResNet state-dict layouts onto the harness's ResNet (bench.models.resnet).

Source layouts (all BasicBlock ResNets with a CIFAR 3x3 stem):
- torchvision: `layer{L}.{b}.conv1/bn1/conv2/bn2`, shortcut `downsample.0` (conv) / `downsample.1` (BN);
  timm's ResNet uses the same names;
- kuangliu/pytorch-cifar (RoCL, AdvCL's finetuning model): shortcut `shortcut.0` / `shortcut.1`;
- multi-BN (ACL, AdvCL, DynACL): every BatchNorm is `<bn>.bn_list.<i>.<leaf>` (one set per
  branch; `<bn>.bn_list.<leaf>` when built without branch names) and the shortcut is
  `downsample.conv` / `downsample.bn`.
Target: `conv1`, `bn1`, `blocks.<i>.{conv1,bn1,conv2,bn2,shortcut_conv,shortcut_bn}` with block i
counted over the four stages, and BatchNorm branch `<name>` at `<bn>.bns.<name>.<leaf>` when
several branches are kept. In-model normalization buffers (`normalize.mean/std`) select the
harness's `Normalize` kind.

What the harness's ResNet cannot express is refused with the reason: Bottleneck blocks (ResNet-50;
AP-DPE's pre-activation ResNet-50 has its own module), a 7x7 ImageNet stem (the `torchvision`
format builds torchvision's own model for those), and a stem padding other than 1 (DeACL's
padding 2: not visible in a state dict, so the caller must say; see `stem_padding`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from bench.checkpoints.base import (SHOWN_KEYS, Loaded, check_want, finish, load_strict, read_checkpoint,
                                    strip_prefix, take, unwrap)
from bench.errors import BenchError
from bench.models import Classifier, ResNet18
from bench.models.norm import NORMALIZATIONS

BN_LEAVES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.(.+)$")
# the shortcut's (conv, BN) module names and whether BatchNorms are `bn_list`s, per layout style
STYLES = {"torchvision": ("downsample.0.", "downsample.1.", False),
          "kuangliu": ("shortcut.0.", "shortcut.1.", False),
          "multibn": ("downsample.conv.", "downsample.bn.", True)}


@dataclass
class Mapped:
    state: dict[str, torch.Tensor]                     # target key -> tensor (BN keys still per source branch)
    unexpected: list[str] = field(default_factory=list)
    layers: tuple[int, ...] = ()


def _bn_key(rest: str, multi: bool = True) -> tuple[int | None, str] | None:
    """'weight' | 'bn_list.weight' | 'bn_list.1.weight' -> (branch index or None, leaf); None if not a
    BN key (a `bn_list` key is none when `multi` is off)."""
    parts = rest.split(".")
    if parts[0] == "bn_list" and multi:
        parts = parts[1:]
        if len(parts) == 2 and parts[0].isdigit():
            return int(parts[0]), parts[1]
    return (None, parts[0]) if len(parts) == 1 and parts[0] in BN_LEAVES else None


def map_resnet(state: dict[str, torch.Tensor], source: str, styles: tuple[str, ...] = tuple(STYLES)) -> Mapped:
    """Place every backbone key; BN keys become (target module, branch index, leaf) triples.
    `styles`: the layout styles (STYLES) whose shortcut names and `bn_list`s are accepted."""
    shortcut_conv = tuple(STYLES[s][0] for s in styles)
    shortcut_bn = tuple(STYLES[s][1] for s in styles)
    multi = any(STYLES[s][2] for s in styles)
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    blocks: dict[int, int] = {}
    for key in state:
        m = _BLOCK.match(key)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            blocks[stage] = max(blocks.get(stage, -1), block)
            if m.group(3).startswith(("conv3.", "bn3.")):
                raise BenchError(f"{source}: {key} is a Bottleneck block (ResNet-50 and deeper); the harness's "
                                 f"ResNet has BasicBlocks only. Load such a model with the `torchvision` format "
                                 f"(torchvision layout) or the `module` format (any architecture)")
    if sorted(blocks) != [1, 2, 3, 4] and blocks:
        raise BenchError(f"{source}: ResNet stages {sorted(blocks)}; expected layer1..layer4")
    layers = tuple(blocks[s] + 1 for s in sorted(blocks))
    offsets = {s: sum(layers[:i]) for i, s in enumerate(sorted(blocks))}
    for key, value in state.items():
        m = _BLOCK.match(key)
        if key == "conv1.weight":
            out[key] = value
            continue
        if key.startswith("bn1."):
            bn = _bn_key(key[len("bn1."):], multi)
            if bn is None:
                unexpected.append(key)
            else:
                out[_triple("bn1", *bn)] = value
            continue
        if not m:
            unexpected.append(key)
            continue
        prefix = f"blocks.{offsets[int(m.group(1))] + int(m.group(2))}"
        rest = m.group(3)
        target = None
        if rest in ("conv1.weight", "conv2.weight"):
            target = f"{prefix}.{rest}"
        elif rest.startswith(shortcut_conv) and rest.endswith(".weight") and rest.count(".") == 2:
            target = f"{prefix}.shortcut_conv.weight"
        else:
            for name, src in (("bn1", ("bn1.",)), ("bn2", ("bn2.",)), ("shortcut_bn", shortcut_bn)):
                start = next((p for p in src if rest.startswith(p)), None)
                if start is not None:
                    bn = _bn_key(rest[len(start):], multi)
                    target = _triple(f"{prefix}.{name}", *bn) if bn is not None else None
                    break
        if target is None:
            unexpected.append(key)
        else:
            out[target] = value
    return Mapped(out, unexpected, layers)


def _triple(module: str, index: int | None, leaf: str) -> str:
    return f"{module}\0{'' if index is None else index}\0{leaf}"


def branch_count(mapped: Mapped, source: str) -> int:
    """How many BatchNorm sets the checkpoint has (1 for plain BN)."""
    indices = {k.split("\0")[1] for k in mapped.state if "\0" in k}
    if "" in indices and len(indices) > 1:
        raise BenchError(f"{source}: some BatchNorms have branches (bn_list.N) and some do not")
    if indices in (set(), {""}):
        return 1
    numbers = sorted(int(i) for i in indices)
    if numbers != list(range(len(numbers))):
        raise BenchError(f"{source}: BatchNorm branches {numbers}; expected 0..{len(numbers) - 1}")
    return len(numbers)


def resolve_branch(branch: str | None, names: tuple[str, ...], count: int, default: str | None,
                   source: str, layout: str) -> tuple[list[int], list[str]]:
    """(source branch indices, names) to keep. `branch`: a name of `names`, an index, "all", or
    None for the layout's default."""
    if count == 1:
        if branch not in (None, "all", "0", names[0] if names else "normal"):
            raise BenchError(f"{source}: the checkpoint has a single BatchNorm set; branch={branch!r} does not apply")
        return [0], [names[0] if names and len(names) == 1 else "normal"]
    if len(names) != count:
        note = f" (the {layout} layout names {len(names)} branches; this file has {count}: named by index)"
        names = tuple(f"bn{i}" for i in range(count))
    else:
        note = ""
    if branch == "all":
        return list(range(count)), list(names)
    choice = branch if branch is not None else default
    if choice is None:
        raise BenchError(f"{source}: {count} BatchNorm branches ({', '.join(names)}); choose one with branch=NAME"
                         f"{note}")
    if choice in names:
        return [names.index(choice)], [choice]
    if str(choice).isdigit() and int(choice) < count:
        return [int(choice)], [names[int(choice)]]
    raise BenchError(f"{source}: no BatchNorm branch {choice!r}; this checkpoint's branches are "
                     f"{', '.join(f'{n} (bn_list.{i})' for i, n in enumerate(names))}, or 'all'{note}")


def select_branches(mapped: Mapped, indices: list[int], names: list[str]) -> dict[str, torch.Tensor]:
    """Final target keys: plain BN keys for one kept branch, `.bns.<name>.` keys for several."""
    out: dict[str, torch.Tensor] = {}
    for key, value in mapped.state.items():
        if "\0" not in key:
            out[key] = value
            continue
        module, index, leaf = key.split("\0")
        i = int(index) if index else 0
        if i not in indices:
            continue
        out[f"{module}.{leaf}" if len(indices) == 1 else f"{module}.bns.{names[indices.index(i)]}.{leaf}"] = value
    return out


def normalize_kind(buffers: dict[str, torch.Tensor], default: str, source: str) -> str:
    """The harness's normalization whose mean/std match a checkpoint's `normalize.mean/std`."""
    if not buffers:
        return default
    if set(buffers) != {"mean", "std"}:
        raise BenchError(f"{source}: normalize.{', normalize.'.join(sorted(buffers))}: expected normalize.mean "
                         f"and normalize.std")
    mean, std = (buffers[k].flatten().double() for k in ("mean", "std"))
    for kind, stats in NORMALIZATIONS.items():
        ref_mean, ref_std = stats if stats else ((0.0,) * 3, (1.0,) * 3)
        if mean.numel() == 3 and torch.allclose(mean, torch.tensor(ref_mean, dtype=torch.float64), atol=1e-4) \
                and torch.allclose(std, torch.tensor(ref_std, dtype=torch.float64), atol=1e-4):
            return kind
    raise BenchError(f"{source}: input normalization mean {mean.tolist()} std {std.tolist()} is none the harness "
                     f"has ({', '.join(NORMALIZATIONS)}); use the `module` format with your own model")


def linear_head(keys: dict[str, torch.Tensor]) -> bool:
    """A classification head is exactly one Linear: weight (C, D) and bias (C)."""
    return set(keys) == {"weight", "bias"} and keys["weight"].dim() == 2 and keys["bias"].dim() == 1


@dataclass(frozen=True)
class ResNetLayout:
    """One family's layout on top of the generic ResNet key map."""

    name: str
    branch_names: tuple[str, ...] = ("normal",)  # the names of bn_list.0, bn_list.1, ... in the official code
    default_branch: str | None = None            # the branch its downstream protocol keeps
    heads: tuple[str, ...] = ("fc",)             # a head here is a classifier if it is one Linear, else dropped
    drop: tuple[str, ...] = ()                   # other heads, always dropped (projection, auxiliary)
    normalize: str = "none"                      # when the file has no normalize buffers
    styles: tuple[str, ...] = ("torchvision",)   # the STYLES of its files (shortcut names, bn_list or not)
    hint: str = ""                               # added to a key-mismatch message


def build_resnet(state: dict[str, torch.Tensor], layout: ResNetLayout, *, source: str, branch: str | None,
                 want: str, normalize: str | None = None, head: dict[str, torch.Tensor] | None = None,
                 stem_padding: int = 1) -> tuple[torch.nn.Module, dict]:
    """The harness's ResNet (or a Classifier around it) holding `state`, loaded strictly.

    Returns (model, facts) with facts: kind, branch, num_classes, architecture, normalize,
    dropped, notes. `head`: a classifier head given apart from the backbone state (AdvCL's
    finetuning files keep it in their own entry).
    """
    state = dict(state)
    dropped: list[str] = []
    notes: list[str] = []
    norm_buffers = take(state, "normalize")
    kind_of_norm = normalize_kind(norm_buffers, layout.normalize, source)
    if normalize is not None and normalize != kind_of_norm:
        if norm_buffers:
            raise BenchError(f"{source}: the checkpoint normalizes inputs with {kind_of_norm!r}; normalize="
                             f"{normalize!r} contradicts it")
        kind_of_norm = normalize
    classifier = head
    for prefix in layout.heads:
        keys = take(state, prefix)
        if not keys:
            continue
        if classifier is None and linear_head(keys):
            classifier = keys
        else:
            dropped.append(f"{prefix}.* ({'projection head' if not linear_head(keys) else 'linear head'}, "
                           f"{len(keys)} tensors)")
    for prefix in layout.drop:
        keys = take(state, prefix)
        if keys:
            dropped.append(f"{prefix}.* ({len(keys)} tensors)")
    if want == "encoder" and classifier is not None:
        dropped.append(f"the linear classification head ({tuple(classifier['weight'].shape)})")
        classifier = None
    if want == "classifier" and classifier is None:
        raise BenchError(f"{source}: no linear classification head in this {layout.name} checkpoint "
                         f"(heads looked for: {', '.join(layout.heads)}); load it as an encoder and finetune it")
    if "conv1.weight" not in state:
        raise BenchError(f"{source}: no conv1.weight: not a ResNet state dict in the {layout.name} layout "
                         f"(first keys: {', '.join(sorted(state)[:SHOWN_KEYS])})")
    stem = state["conv1.weight"]
    if stem.dim() != 4 or tuple(stem.shape[1:]) != (3, 3, 3):
        raise BenchError(f"{source}: conv1.weight has shape {tuple(stem.shape)}: the harness's ResNet has a CIFAR "
                         f"stem (3x3 conv, stride 1, no max-pool); a 7x7 ImageNet stem loads with the `torchvision` "
                         f"format (torchvision's own model)")
    mapped = map_resnet(state, source, layout.styles)
    count = branch_count(mapped, source)
    indices, names = resolve_branch(branch, layout.branch_names, count, layout.default_branch, source, layout.name)
    if count > 1:
        others = [n for i, n in enumerate(layout.branch_names if len(layout.branch_names) == count else
                                          [f"bn{i}" for i in range(count)]) if i not in indices]
        if others:
            dropped.append(f"BatchNorm branches {', '.join(others)} (kept {', '.join(names)})")
    target = select_branches(mapped, indices, names)
    width = int(stem.shape[0])
    encoder = ResNet18(width=width, branches=tuple(names), normalize=kind_of_norm, layers=mapped.layers,
                       stem_padding=stem_padding)
    notes += load_strict(encoder, target, source=source, layout=layout.name, unexpected=mapped.unexpected,
                         hint=layout.hint)
    depth = 2 + 2 * sum(mapped.layers)
    arch = f"ResNet-{depth} (CIFAR 3x3 stem{'' if stem_padding == 1 else f', padding {stem_padding}'}), width {width}"
    # branch: the kept branch name(s); None for a file with plain BatchNorm
    facts = {"branch": ",".join(names) if count > 1 else None, "architecture": arch, "normalize": kind_of_norm,
             "dropped": dropped, "notes": notes, "num_classes": None, "kind": "encoder"}
    if classifier is None:
        return encoder, facts
    model = Classifier(encoder, int(classifier["weight"].shape[0]))
    load_strict(model.head, classifier, source=source, layout=f"{layout.name} (classification head)")
    facts.update(kind="classifier", num_classes=int(classifier["weight"].shape[0]))
    return model, facts



def load_layout(source, layout: ResNetLayout, *, branch: str | None, want: str, device,
                normalize: str | None = None, containers: tuple[str, ...] = ("state_dict", "model"),
                prefixes: tuple[str, ...] = ("module.",), prepare=None) -> Loaded:
    """Read `source` and load it through `layout` (the shared path of the ResNet families).

    `prepare(blob, state) -> (state, head, dropped)`: a family's own step before the key map
    (pick one encoder of a wrapper, take a head stored apart, ...).
    """

    check_want(want)
    where = str(source)
    blob = read_checkpoint(source)
    state, _ = unwrap(blob, containers, where)
    state, _ = strip_prefix(state, prefixes)
    head, dropped = None, []
    if prepare is not None:
        state, head, dropped = prepare(blob, state)
    model, facts = build_resnet(state, layout, source=where, branch=branch, want=want, normalize=normalize, head=head)
    return Loaded(model=finish(model, device), kind=facts["kind"], format=layout.name, source=where,
                  branch=facts["branch"], num_classes=facts["num_classes"], architecture=facts["architecture"],
                  normalize=facts["normalize"], dropped=dropped + facts["dropped"], notes=facts["notes"])
