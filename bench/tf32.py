"""TF32 on or off for CUDA matmuls and cuDNN convolutions, for a block of code.

cuDNN allows TF32 by default on Ampere and later GPUs, so "fp32" convolutions would run with a
10-bit mantissa unless it is turned off. Training turns it on or off by its precision setting
(`bench.train.precision`); evaluation attacks always run without it (`strict_fp32`).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for CUDA matmuls and cuDNN convolutions on (True) or off (False), restored afterwards.

    Process-wide flags (torch has no per-thread setting): harmless on a CPU-only machine.
    """
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32)
    matmul.allow_tf32 = cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


def strict_fp32() -> contextlib.AbstractContextManager:
    """TF32 off (CUDA matmuls and cuDNN) for the duration; what evaluation attacks run under."""
    return tf32(False)
