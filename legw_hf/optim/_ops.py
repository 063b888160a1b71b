"""List operations the multi-tensor paths need and ``torch._foreach_*`` does not offer with an output list.

Each writes into buffers that already exist (the step's workspace), so a step never allocates more than one
parameter-sized scratch list.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def scale_into(sources: Sequence[Tensor], factor: float, out: Sequence[Tensor]) -> None:
    for source, target in zip(sources, out, strict=True):
        torch.mul(source, factor, out=target)


def divide_by_into(sources: Sequence[Tensor], divisor: Tensor, out: Sequence[Tensor]) -> None:
    """``out[i] ← sources[i] / divisor`` with one device scalar ``divisor``, converting to ``out``'s dtype."""
    for source, target in zip(sources, out, strict=True):
        torch.div(source, divisor, out=target)


def sqrt_into(sources: Sequence[Tensor], out: Sequence[Tensor]) -> None:
    for source, target in zip(sources, out, strict=True):
        torch.sqrt(source, out=target)


def add_into(sources: Sequence[Tensor], addends: Sequence[Tensor], out: Sequence[Tensor]) -> None:
    for source, addend, target in zip(sources, addends, out, strict=True):
        torch.add(source, addend, out=target)


def divide_into(numerators: Sequence[Tensor], denominators: Sequence[Tensor]) -> None:
    """``denominators[i] ← numerators[i] / denominators[i]``."""
    for numerator, denominator in zip(numerators, denominators, strict=True):
        torch.div(numerator, denominator, out=denominator)


def add_scaled_(targets: Sequence[Tensor], sources: Sequence[Tensor], scales: Tensor | float, *, foreach: bool) -> None:
    """``targets[i] += scales[i]·sources[i]``: ``scales`` is a vector with one entry per tensor (on device), or one
    number for all."""
    if isinstance(scales, Tensor) and scales.dim() == 1:
        factors: Sequence[Tensor | float] = scales.unbind()
    else:
        factors = [scales] * len(targets)
    if foreach:
        if isinstance(scales, Tensor):
            torch._foreach_addcmul_(list(targets), list(sources), list(factors))
        else:
            torch._foreach_add_(list(targets), list(sources), alpha=scales)
        return
    for target, source, factor in zip(targets, sources, factors, strict=True):
        if isinstance(factor, Tensor):
            target.addcmul_(source, factor)
        else:
            target.add_(source, alpha=factor)
