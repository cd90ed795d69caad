"""The attack's per-step update, compiled while a training run asks for `compile` (bench.train.fastpath).

It lives with the attacks so that they need nothing of the training code: an evaluation job's
code fingerprint stays free of the loop.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

_compiled_steps: dict[Callable, Callable] = {}
_compile_attack_steps = False  # set by `attack_steps_compiled` while a training run asks for it


def attack_step(step: Callable) -> Callable:
    """The attack's per-step update `step`, compiled when the running training asked for `compile`."""
    if not _compile_attack_steps:
        return step
    if step not in _compiled_steps:
        _compiled_steps[step] = torch.compile(step, dynamic=None)
    return _compiled_steps[step]


@contextlib.contextmanager
def attack_steps_compiled(enabled: bool) -> Iterator[None]:
    global _compile_attack_steps
    saved = _compile_attack_steps
    _compile_attack_steps = enabled
    try:
        yield
    finally:
        _compile_attack_steps = saved
