"""ClusterFit pseudo-labels (AdvCL's supervision stimulus) as their own cached job.

Features of a pretrained network f_pre for every image of the unlabeled training split,
L2-normalized, then k-means for each K independently; the cluster index is the pseudo-label.
Sources (`job.config["pseudo_labels"]["source"]`):

- "simclr": the encoder of a SimCLR pretrain job on the same data (`job.deps["pretrain"]`);
- "imagenet": torchvision's supervised ImageNet ResNet-50, only if its weights are already in
  the torch hub cache (never downloaded here);
- "file": a label file (`params["file"]`): `.npz` with arrays `pseudo_train_{K}` (and optionally
  `index`, the source-split positions they label), or the official AdvCL pickle (a dict of
  `pseudo_train_{K}` -> int arrays over the whole training set), read through a restricted
  unpickler that can only rebuild numpy arrays.

The pseudo-label job (`bench.stages.pseudo_labels`) writes `labels.npz` (`index` = source-split
positions, `pseudo_train_{K}`); `load_pseudo_labels(path)` turns it into {K: LongTensor indexed
by source-split position}.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import BenchError

log = logging.getLogger(__name__)
KMEANS_N_INIT = 3  # k-means restarts per K (fixed: part of what a pseudo-label job computes)
FEATURE_BATCH = 256
IMAGENET_WEIGHTS = "IMAGENET1K_V1"
Progress = Callable[[dict[str, Any]], None]


# ---------------------------------------------------------------- k-means


def normalize_features(features: np.ndarray | torch.Tensor) -> np.ndarray:
    """Rows L2-normalized, float32 numpy."""
    f = torch.as_tensor(features).float()
    return F.normalize(f, dim=1).cpu().numpy()


def cluster_features(features: np.ndarray | torch.Tensor, ks: Sequence[int], *, seed: int,
                     n_init: int = KMEANS_N_INIT, on_k: Callable[[int], None] | None = None,
                     allow_fewer: bool = False) -> tuple[dict[int, np.ndarray], dict[int, float]]:
    """k-means on the L2-normalized features for each K independently: labels and inertia per K.

    A K above the number of images is an error, or with `allow_fewer` becomes one cluster per
    image (labels stay below K, so a K-way head still fits; tiny smoke datasets only).
    """
    from sklearn.cluster import KMeans

    x = normalize_features(features)
    labels: dict[int, np.ndarray] = {}
    inertia: dict[int, float] = {}
    for k in ks:
        k = int(k)
        if k < 2 or len(x) < 2 or (k > len(x) and not allow_fewer):
            raise BenchError(f"cannot make {k} clusters of {len(x)} images")
        if on_k:
            on_k(k)
        km = KMeans(n_clusters=min(k, len(x)), n_init=n_init, random_state=seed).fit(x)
        labels[k] = km.labels_.astype(np.int64)
        inertia[k] = float(km.inertia_)
    return labels, inertia


LLOYD_MAX_ITER = 10_000  # a safety cap; the reference has none (hitting it is logged)


def squared_distances(x: torch.Tensor, centers: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """sum_d (x_n - c_k)^2 for every row and center, computed directly (no expansion), in chunks."""
    return torch.cat([((part[:, None, :] - centers[None, :, :]) ** 2).sum(-1) for part in x.split(chunk)])


def kmeans_lloyd(features: np.ndarray | torch.Tensor, k: int, *, seed: int, tol: float = 1e-4,
                 max_iter: int = LLOYD_MAX_ITER) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One run of Lloyd's k-means with kmeans_pytorch's semantics (dynacl.md 8a), on the raw
    features (no L2 normalization): labels, centers, iterations.

    Init: K distinct random rows; each iteration assigns every row to its nearest center (squared
    Euclidean), then moves each center to its rows' mean, an empty cluster taking one random row;
    stops when (sum_k |c_k - c_k_prev|)^2 < tol. The labels are the last assignment (made before
    the last move), as `kmeans_pytorch.kmeans` returns them. Seeded (the reference is not).
    """
    x = torch.as_tensor(features).float()
    n = len(x)
    if not 2 <= k <= n:
        raise BenchError(f"cannot make {k} clusters of {n} images")
    generator = torch.Generator().manual_seed(seed)
    centers = x[torch.randperm(n, generator=generator)[:k].to(x.device)].clone()
    for iteration in range(1, max_iter + 1):
        labels = squared_distances(x, centers).argmin(dim=1)
        previous = centers.clone()
        for c in range(k):
            members = x[labels == c]
            if len(members) == 0:
                members = x[torch.randint(n, (1,), generator=generator).to(x.device)]
            centers[c] = members.mean(dim=0)
        shift = torch.sqrt(((centers - previous) ** 2).sum(dim=1)).sum()
        if float(shift) ** 2 < tol:
            return labels, centers, iteration
    log.warning("k-means (K=%d, %d rows) stopped at the safety cap of %d iterations", k, n, max_iter)
    return labels, centers, max_iter


# ---------------------------------------------------------------- features of f_pre


@torch.no_grad()
def extract_features(model: torch.nn.Module, data, *, batch_size: int = FEATURE_BATCH,
                     transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     on_progress: Progress | None = None) -> np.ndarray:
    """model(images) for every image of `data` (an ImageSet), in order, as float32 numpy."""
    from bench.datasets import batches, steps_per_epoch

    model.eval()
    steps = steps_per_epoch(len(data), batch_size, drop_last=False)
    out = []
    for step, (x, _, _) in enumerate(batches(data, batch_size, shuffle=False)):
        if transform is not None:
            x = transform(x)
        out.append(model(x).float().flatten(1).cpu())
        if on_progress:
            on_progress({"stage": "features", "epoch": 1, "epochs": 1, "step": step + 1, "steps": steps})
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def imagenet_resnet50(device: torch.device | str = "cpu") -> tuple[torch.nn.Module, Callable, str]:
    """torchvision's ImageNet ResNet-50 (pooled 2048-d features) from the torch hub cache, its
    input transform, and a description; BenchError if the weights are not cached."""
    try:
        import torchvision
    except ImportError as exc:
        raise BenchError("advcl.pseudo_labels=imagenet needs torchvision (pip install torchvision)") from exc
    weights = torchvision.models.ResNet50_Weights[IMAGENET_WEIGHTS]
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not path.is_file():
        raise BenchError(
            f"ImageNet ResNet-50 weights are not in the torch hub cache ({path}). On a machine with internet "
            f"run: python -c \"import torchvision; torchvision.models.resnet50(weights='{IMAGENET_WEIGHTS}')\" "
            f"and copy {os.path.basename(weights.url)} to {path.parent} (or set TORCH_HOME), "
            "or use advcl.pseudo_labels=simclr (offline) or file:PATH")
    model = torchvision.models.resnet50()
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:
        raise BenchError(f"{path}: not a readable ResNet-50 state dict ({exc}); delete it and fetch it again") from exc
    model.fc = torch.nn.Identity()
    model = model.to(device).eval()
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

    def transform(x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
        return (x - mean) / std

    return model, transform, f"torchvision resnet50 {IMAGENET_WEIGHTS} (supervised ImageNet)"


# ---------------------------------------------------------------- label files


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only names a label pickle may reference: what numpy needs to rebuild an array."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core", "numpy._core"):
        allowed[(f"{module}.multiarray", "_reconstruct")] = multiarray._reconstruct
        # pickle protocol 5 rebuilds contiguous arrays with numeric._frombuffer
        allowed[(f"{module}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; any other global is refused with BenchError."""

    def __init__(self, file, origin: str = "pickle"):
        super().__init__(file)
        self.origin = origin
        self.allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise BenchError(f"{self.origin}: refusing to unpickle {module}.{name}: a label pickle may hold only "
                             "numpy arrays (save the labels as .npz to avoid pickles)") from None


def restricted_load(data: bytes, origin: str = "pickle") -> Any:
    try:
        return RestrictedUnpickler(io.BytesIO(data), origin).load()
    except BenchError:
        raise
    except Exception as exc:
        raise BenchError(f"{origin}: not a readable label pickle ({type(exc).__name__}: {exc})") from exc


def _label_array(value: Any, origin: str, key: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise BenchError(f"{origin}: {key} must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    return arr.astype(np.int64)


def read_label_file(path: str | Path, ks: Iterable[int]) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """(index, {K: labels}) from a `.npz` or an official AdvCL pickle.

    Without an `index` array the labels are taken to cover source-split positions 0..N-1 (the
    official files hold one label per training image, in the dataset's order).
    """
    path = Path(path)
    origin = str(path)
    if not path.is_file():
        raise BenchError(f"label file {path} does not exist")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                table = {name: data[name] for name in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise BenchError(f"{origin}: not a readable .npz label file ({exc})") from exc
    else:
        table = restricted_load(path.read_bytes(), origin)
    if not isinstance(table, dict):
        raise BenchError(f"{origin}: expected a dict of pseudo_train_{{K}} arrays, got {type(table).__name__}")
    labels: dict[int, np.ndarray] = {}
    for k in ks:
        key = f"pseudo_train_{int(k)}"
        if key not in table:
            have = sorted(str(n) for n in table if str(n).startswith("pseudo_train_"))
            raise BenchError(f"{origin}: no {key} (has {', '.join(have) or 'no pseudo_train_K arrays'})")
        labels[int(k)] = _label_array(table[key], origin, key)
    n = {len(v) for v in labels.values()}
    if len(n) > 1:
        raise BenchError(f"{origin}: the pseudo_train_K arrays have different lengths {sorted(n)}")
    size = n.pop() if n else 0
    index = _label_array(table["index"], origin, "index") if "index" in table else np.arange(size, dtype=np.int64)
    _check_labels(index, labels, origin)
    return index, labels


def _check_labels(index: np.ndarray, labels: dict[int, np.ndarray], origin: str) -> None:
    if index.size and (index.min() < 0 or len(np.unique(index)) != len(index)):
        raise BenchError(f"{origin}: index must hold distinct positions >= 0")
    for k, y in labels.items():
        if len(y) != len(index):
            raise BenchError(f"{origin}: pseudo_train_{k} has {len(y)} labels for {len(index)} positions")
        if y.size and (y.min() < 0 or y.max() >= k):
            raise BenchError(f"{origin}: pseudo_train_{k} has labels outside 0..{k - 1}")


def label_arrays(index: np.ndarray, labels: dict[int, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays of a labels.npz file."""
    arrays = {"index": np.asarray(index, np.int64)}
    arrays.update({f"pseudo_train_{k}": np.asarray(v, np.int64) for k, v in labels.items()})
    return arrays


def load_pseudo_labels(path: str | Path) -> dict[int, torch.Tensor]:
    """{K: LongTensor} indexed by source-split position (length max index + 1, -1 where unknown)."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"no pseudo-labels at {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            table = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise BenchError(f"{path}: damaged ({type(exc).__name__}: {exc})") from exc
    if "index" not in table:
        raise BenchError(f"{path}: no index array")
    index = _label_array(table["index"], str(path), "index")
    labels = {int(name[len("pseudo_train_"):]): _label_array(v, str(path), name)
              for name, v in table.items() if name.startswith("pseudo_train_")}
    _check_labels(index, labels, str(path))
    size = int(index.max()) + 1 if index.size else 0
    out = {}
    for k in sorted(labels):
        full = torch.full((size,), -1, dtype=torch.long)
        full[torch.from_numpy(index)] = torch.from_numpy(labels[k])
        out[k] = full
    return out
