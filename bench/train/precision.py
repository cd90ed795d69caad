"""Training precision: what `TrainConfig.precision` asks for and what actually runs on a device.

- `fp32`: strict float32. On CUDA, TF32 is turned off for matmuls and cuDNN convolutions for
  the duration of training (cuDNN allows TF32 by default, so without this "fp32" convolutions
  on Ampere and later GPUs run with a 10-bit mantissa).
- `tf32`: float32 storage, TF32 allowed for matmuls and cuDNN on CUDA. On a CPU there is no
  TF32: it runs as strict fp32 (and `describe` says so).
- `bf16`: bf16 autocast (CUDA, or CPU when asked: CPU autocast runs the matmul-like ops in bf16;
  it is slower than fp32 on most CPUs and exists for reproducing a GPU run's numerics). Refused on
  a GPU without bf16 support (use fp16).
- `fp16`: fp16 autocast with a `torch.amp.GradScaler` (loss scaling), CUDA only: refused on a
  CPU (`BenchError`), whose fp16 kernels are emulated and whose runs would not be the GPU
  numerics anyway. Use bf16 or fp32 there.

The official code of every method trains in fp32 (docs/methods.md, the rules above §0), so a
precision other than strict fp32 is a recorded deviation: `precision_flag` gives the flag a
record carries. Evaluation attacks never use this: `bench.attacks.pgd.eval_guard` forces strict
fp32 (`strict_fp32`).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any

import torch

from bench.errors import BenchError
from bench.tf32 import strict_fp32, tf32  # noqa: F401 - strict_fp32: what attacks run under

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """The precision a training run uses on one device (`resolve_precision`)."""

    asked: str             # the setting
    ran: str               # what runs: fp32, tf32, bf16 or fp16
    device: str            # device type (cuda, cpu, ...)
    autocast_dtype: str | None  # autocast dtype name ("bfloat16", "float16") or None
    tf32: bool             # TF32 matmul/cuDNN allowed (CUDA only)
    grad_scaler: bool      # loss scaling (fp16 on CUDA)

    def describe(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def flag(self) -> str | None:
        """The record flag for training that was not strict fp32, e.g. "precision=bf16"."""
        return None if self.ran == "fp32" else f"precision={self.ran}"

    def training(self) -> contextlib.AbstractContextManager:
        """The backend flags for a whole training run (forward and backward): TF32 allowed or not
        (set on every device: the flags only act on CUDA)."""
        return tf32(self.tf32)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of one training step's forward (a no-op for fp32 and tf32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=AUTOCAST_DTYPES[self.ran])

    def scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device) if self.grad_scaler else None


def resolve_precision(device: torch.device | str, precision: str) -> Precision:
    """What `precision` runs as on `device`; BenchError where it cannot run there."""
    device_type = torch.device(device).type
    if precision not in PRECISIONS:
        raise BenchError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    cuda = device_type == "cuda"
    if precision == "fp32" or (precision == "tf32" and not cuda):
        return Precision(precision, "fp32", device_type, None, False, False)
    if precision == "tf32":
        return Precision(precision, "tf32", device_type, None, True, False)
    if precision == "fp16" and not cuda:
        raise BenchError(f"train.precision=fp16 needs a CUDA GPU (loss-scaled fp16 autocast); this job runs on "
                         f"{device_type}: use precision bf16 or fp32 there")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise BenchError("train.precision=bf16: this GPU does not support bf16; use fp16 (with loss scaling) or fp32")
    if not torch.amp.is_autocast_available(device_type):
        raise BenchError(f"train.precision={precision}: torch has no autocast for {device_type}; use fp32")
    dtype = AUTOCAST_DTYPES[precision]
    return Precision(precision, precision, device_type, str(dtype).removeprefix("torch."), False,
                     precision == "fp16")


def describe(device: torch.device | str, precision: str) -> dict[str, Any]:
    """What a record says about training precision: {asked, ran, device, autocast_dtype, tf32, grad_scaler}."""
    return resolve_precision(device, precision).describe()


def precision_flag(device: torch.device | str, precision: str) -> str | None:
    """The record flag of training not in strict fp32 ("precision=bf16"), or None for fp32."""
    return resolve_precision(device, precision).flag
