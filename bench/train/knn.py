"""An online k-nearest-neighbour accuracy of a pretraining's encoder: representation quality
watched during the run, at no cost to what it trains.

Every `knn_every` epochs (`pretrain.knn_every`, 0 = never) the encoder the job would export
(`Method.export_encoder`: its downstream BatchNorm branch, eval mode) embeds a fixed subset of
the training images with their labels (`knn_images`, drawn once with a fixed seed of its own:
4/5 are the bank, 1/5 the queries); each query is classified by the similarity-weighted vote of
its k = 20 nearest bank images (cosine similarity, weights exp(s / 0.07), the weighted k-NN
monitor of InstDisc and solo-learn). The result is `knn_accuracy` in the epoch's history.

It reads labels only for this number (a method that trains without labels still never sees
them), touches neither the global RNG nor any BatchNorm statistic, and is not part of the job's
key (`bench.grid.NOT_IN_KEY`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

K = 20
TEMPERATURE = 0.07
BATCH = 256


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                 num_classes: int, k: int = K, temperature: float = TEMPERATURE) -> float:
    """Accuracy of the similarity-weighted k-NN vote (features L2-normalized here)."""
    bank, queries = F.normalize(bank.float(), dim=1), F.normalize(queries.float(), dim=1)
    k = min(k, bank.shape[0])
    correct = 0
    for start in range(0, queries.shape[0], 1024):
        sims = queries[start:start + 1024] @ bank.T
        top, idx = sims.topk(k, dim=1)
        votes = torch.zeros(top.shape[0], num_classes, device=bank.device)
        votes.scatter_add_(1, bank_labels[idx], (top / temperature).exp())
        correct += int((votes.argmax(1) == query_labels[start:start + 1024]).sum())
    return correct / max(1, queries.shape[0])


class KnnMonitor:
    """The epoch hook of a pretraining (`bench.train.fit(epoch_hooks=...)`)."""

    def __init__(self, data: Any, every: int, images: int, seed: int = 0):
        self.every = every
        self.data = data
        n = min(images, len(data))
        chosen = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
        n_bank = max(1, n * 4 // 5)
        self.bank_index = chosen[:n_bank].to(data.y.device)
        self.query_index = chosen[n_bank:].to(data.y.device)

    def due(self, epoch: int) -> bool:
        return self.every > 0 and len(self.query_index) > 0 and (epoch + 1) % self.every == 0

    @torch.no_grad()
    def features(self, encoder: torch.nn.Module, index: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, len(index), BATCH):
            out.append(encoder(self.data.images(index[start:start + BATCH])).float())
        return torch.cat(out)

    def __call__(self, task: Any, epoch: int) -> dict[str, float]:
        if not self.due(epoch):
            return {}
        export = getattr(task, "export_encoder", None)
        encoder = export() if callable(export) else task.model.encoder
        was_training = encoder.training
        encoder.eval()
        device_type = self.data.y.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            bank = self.features(encoder, self.bank_index)
            queries = self.features(encoder, self.query_index)
        encoder.train(was_training)
        acc = knn_accuracy(bank, self.data.y[self.bank_index], queries, self.data.y[self.query_index],
                           self.data.num_classes)
        log.info("epoch %d: online k-NN accuracy %.4f (%d bank, %d queries)", epoch + 1, acc,
                 len(self.bank_index), len(self.query_index))
        return {"knn_accuracy": acc}
