"""`feature_dim` for an outside encoder that does not declare one.

Finetuners build `Linear(encoder.feature_dim, classes)`. An encoder without the attribute gets
it from one forward of a dummy batch (zeros, 2 x 3 x S x S, eval mode, no gradient, so no
BatchNorm statistic moves) whose output must be (2, D); if that forward fails, from the
in_features of its last Linear layer.
"""

from __future__ import annotations

import torch
from torch import nn

from bench.errors import BenchError


def infer_feature_dim(encoder: nn.Module, image_size: int = 32) -> int:
    declared = getattr(encoder, "feature_dim", None)
    if isinstance(declared, int) and declared > 0:
        return declared
    try:
        param = next(iter(encoder.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        was_training = encoder.training
        encoder.eval()
        try:
            with torch.no_grad():
                out = encoder(torch.zeros(2, 3, image_size, image_size, device=device))
        finally:
            encoder.train(was_training)
    except Exception as exc:  # the user's forward: any failure falls back to the last Linear
        linears = [m for m in encoder.modules() if isinstance(m, nn.Linear)]
        if linears:
            return int(linears[-1].in_features)
        raise BenchError(f"cannot infer the feature size of {type(encoder).__name__}: a forward of a "
                         f"{image_size}x{image_size} batch failed ({type(exc).__name__}: {exc}) and it has no "
                         f"Linear layer; give it a feature_dim attribute") from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BenchError(f"{type(encoder).__name__} returns {shape} for a batch of 2 images: an encoder must "
                         f"return (batch, features)")
    return int(out.shape[1])


def ensure_feature_dim(encoder: nn.Module, image_size: int = 32) -> nn.Module:
    """Set `encoder.feature_dim` when missing (inferred); return the encoder."""
    if not isinstance(getattr(encoder, "feature_dim", None), int):
        encoder.feature_dim = infer_feature_dim(encoder, image_size)
    return encoder
