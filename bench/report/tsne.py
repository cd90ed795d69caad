"""t-SNE of encoder features on the test set (paper Figure 4), one panel per pretrained encoder.

For each (source, target) pair and method, the encoder of the lowest seed is found through the
records (evaluate.inputs["finetune"] -> finetune.inputs["pretrain"] -> encoder.pt), run in eval
mode on a fixed random subset of the target's test split (resized to the encoder's input size,
as finetuning does), and its features are embedded in 2-d with sklearn's TSNE, colored by class.
Encoders or datasets that cannot be found are skipped with a note; the report goes on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.report import paper
from bench.report.collect import Results, encoder_of
from bench.report.figures import Figure, plt_setup, save, slug

log = logging.getLogger(__name__)


@dataclass
class Embedding:
    method: str
    encoder: Path
    points: Any  # (n, 2) array
    labels: Any  # (n,) int array
    classes: list[str]


@dataclass
class TsneResult:
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def encoder_features(encoder, images, batch_size: int = 256):
    """Features of float [0,1] images through the encoder (eval mode, no grad), as a numpy array."""
    import torch

    encoder.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            out.append(encoder(images[start:start + batch_size].float().div(255)).flatten(1).cpu())
    return torch.cat(out).numpy()


def embed(features, seed: int = 0):
    """2-d t-SNE of features (perplexity capped for small subsets).

    One OpenMP thread: sklearn's Barnes-Hut threads spin badly when the cores are busy (a run
    going on beside the report), 100x slower than one thread, which is fast at this size."""
    import numpy as np
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n = len(features)
    perplexity = float(max(2.0, min(30.0, (n - 1) / 3)))
    features = np.asarray(features, dtype=np.float32)
    with threadpool_limits(limits=1):
        return TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                    random_state=seed).fit_transform(features)


def _image_size(source: str, configs: list[dict[str, Any]]) -> int:
    from bench.datasets import dataset_config as target_config, dataset_image_size

    for config in configs:
        try:
            return dataset_image_size(source, target_config(source, config or {}))
        except Exception as exc:  # noqa: BLE001 - try the next config
            log.debug("image size of %s: %s", source, exc)
    return 32


def _test_subset(target: str, config: dict[str, Any], data_dir, image_size: int, n: int):
    import torch

    from bench import datasets
    from bench.datasets import dataset_config as target_config

    test = datasets.load(target, "test", data_dir=data_dir, download=False, cfg=target_config(target, config),
                         image_size=image_size)
    if n and n < len(test):
        index = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:n].sort().values
        test = test.subset(index)
    return test


def tsne_figures(results: Results, folder: Path, *, n: int = 500, data_dir=None, seed: int = 0) -> TsneResult:
    """One figure per (source, target) with a panel per method's encoder."""
    from bench.stages.base import get_stage

    out = TsneResult()
    for source, target in results.pairs():
        candidates: dict[str, list] = {}  # method -> its records on this pair, every finetuner
        for cell in results.cells.values():
            if cell.pair == (source, target):
                candidates.setdefault(cell.method, []).extend(cell.records)
        chosen: dict[str, Any] = {}  # method -> (record, encoder job folder, its record) of the lowest seed
        for method, records in candidates.items():
            reasons = []
            for record in sorted(records, key=lambda r: r.seed):
                job_dir, pre, why = encoder_of(results, record)
                if job_dir is not None:
                    chosen[method] = (record, job_dir, pre)
                    break
                reasons.append(why)
            if method not in chosen:
                out.notes.append(f"t-SNE {paper.method_label(method)} / {paper.pair_label(source, target)}: "
                                 f"skipped, {reasons[0]}" + (f" (and {len(reasons) - 1} more)" if len(reasons) > 1
                                                             else ""))
        if not chosen:
            continue
        embeddings: list[Embedding] = []
        data_cache: dict[int, Any] = {}
        for method in paper.order_methods(chosen):
            record, job_dir, pre = chosen[method]
            try:
                encoder = get_stage(pre.kind).load(job_dir, "cpu")
                size = (getattr(encoder, "meta", {}) or {}).get("image_size") or _image_size(source, [pre.config,
                                                                                                     record.config])
                if size not in data_cache:
                    data_cache[size] = _test_subset(target, record.config, data_dir, size, n)
                data = data_cache[size]
                features = encoder_features(encoder, data.x)
                points = embed(features, seed)
            except Exception as exc:  # noqa: BLE001 - a missing dataset or a bad file skips one panel
                out.notes.append(f"t-SNE {paper.method_label(method)} / {paper.pair_label(source, target)}: "
                                 f"skipped ({type(exc).__name__}: {exc})")
                log.warning("t-SNE of %s skipped: %s", job_dir.path, exc)
                continue
            embeddings.append(Embedding(method, job_dir.path, points, data.y.cpu().numpy(), list(data.classes)))
        if embeddings:
            out.figures.append(_figure(embeddings, source, target, folder))
    return out


def _figure(embeddings: list[Embedding], source: str, target: str, folder: Path) -> Figure:
    import pandas as pd

    plt, sns = plt_setup()
    k = len(embeddings)
    cols = min(k, 3)
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 1.6, 4.0 * rows), squeeze=False)
    classes = embeddings[0].classes
    palette = sns.color_palette("tab10" if len(classes) <= 10 else "husl", len(classes))
    for ax, e in zip(axes.flat, embeddings):
        names = [e.classes[i] if i < len(e.classes) else str(i) for i in e.labels]
        df = pd.DataFrame({"x": e.points[:, 0], "y": e.points[:, 1], "class": names})
        sns.scatterplot(data=df, x="x", y="y", hue="class", hue_order=classes, palette=palette, s=10,
                        linewidth=0, ax=ax, legend=ax is axes.flat[0] and len(classes) <= 20)
        ax.set_title(paper.method_label(e.method))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("")
        ax.set_ylabel("")
    for ax in list(axes.flat)[k:]:
        ax.axis("off")
    first = axes.flat[0]
    if first.get_legend() is not None:
        handles, labels = first.get_legend_handles_labels()
        first.get_legend().remove()
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, title="class",
                   markerscale=2)
    pair = paper.pair_label(source, target)
    n = len(embeddings[0].labels)
    title = f"t-SNE of encoder features — {pair} test set, {n} images"
    fig.suptitle(title)
    fig.tight_layout()
    caption = (f"t-SNE of the pretrained encoders' features (before any finetuning) on {n} {pair} test images, "
               f"colored by class (paper Figure 4). One panel per pretraining method (lowest seed).")
    return save(fig, folder, slug("fig4_tsne", source, target), title, caption)
