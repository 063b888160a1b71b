"""The layer-wise trust ratio, shared by Lamb and Lars: per-tensor norms, the ratio, and its statistics.

Everything here stays on the tensors' device: no Python number is read back from a tensor, so an optimizer step
built on these functions never waits for the accelerator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# Added to torch after 2.6; on older versions the squared norms come from ``_foreach_norm``.
_foreach_powsum = getattr(torch, "_foreach_powsum", None)


def squared_norms(tensors: Sequence[Tensor], *, foreach: bool) -> Tensor:
    """Each tensor's sum of squares, as one fp32 vector on the tensors' (common) device.

    This is the only place the trust-ratio norms are computed, and it returns squares on purpose: a sharded run
    (ZeRO partitions, FSDP2 shards) sees a piece of each tensor, partial squared norms add up, so one all-reduce of
    this vector gives every full norm at once.
    """
    tensors = list(tensors)
    if not tensors:
        return torch.zeros(0)
    if not foreach:
        return torch.stack([torch.linalg.vector_norm(t, dtype=torch.float32).square() for t in tensors])
    if all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors):
        # BLAS dot streams each tensor once, markedly faster on CPU than the generic reductions.
        flat = [t.view(-1) for t in tensors]
        return torch.stack([torch.dot(f, f) for f in flat])
    if _foreach_powsum is not None:
        return torch.stack(_foreach_powsum(tensors, 2, dtype=torch.float32))
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).square()


def trust_ratio(
    param_norm: Tensor,
    direction_norm: Tensor,
    *,
    coefficient: float = 1.0,
    eps: float = 0.0,
    decay_norm: Tensor | None = None,
    local_lr_clip: float | Tensor | None = None,
    clamp: tuple[float, float] | None = None,
) -> Tensor:
    """``coefficient·‖p‖ / (‖d‖ + decay_norm + eps)`` per tensor, and 1 where ``‖p‖`` or ``‖d‖`` is 0.

    Args:
        param_norm, direction_norm: vectors of norms, one entry per tensor. ``d`` is what the ratio rescales: the
            LAMB update ``u``, or for LARS the gradient (with or without the decay term).
        coefficient: LARS' trust coefficient (1 for LAMB).
        eps: added to the denominator.
        decay_norm: ``λ·‖p‖``, added to the denominator by the LARC form ``‖g‖ + λ‖p‖``.
        local_lr_clip: LARC's clip mode: the ratio becomes ``min(ratio / lr, 1)`` so that ``lr·ratio`` never
            exceeds ``lr``; pass the LR here.
        clamp: ``(min, max)`` bounds of the ratio where it is defined (DeepSpeed's 0.01 and 10). A ratio that is
            not defined stays exactly 1, as in DeepSpeed's kernel.

    A zero norm would make the ratio 0, ∞ or NaN; every reference falls back to 1 there, and so does this.
    """
    denominator = direction_norm if decay_norm is None else direction_norm + decay_norm
    ratio = coefficient * param_norm / (denominator + eps)
    if local_lr_clip is not None:
        ratio = torch.clamp(ratio / local_lr_clip, max=1.0)
    if clamp is not None:
        ratio = torch.clamp(ratio, clamp[0], clamp[1])
    defined = (param_norm > 0) & (direction_norm > 0)
    return torch.where(defined, ratio, torch.ones_like(ratio))


def stats_table(param_norm: Tensor, update_norm: Tensor, ratio: Tensor) -> Tensor:
    """The ``(n, 3)`` table behind ``trust_stats``: columns ‖p‖, ‖u‖, trust ratio."""
    return torch.stack((param_norm, update_norm, ratio), dim=1)


def summarize(stats: Tensor, names: Sequence[str], adapted: Sequence[bool], *, per_parameter: bool) -> dict[str, float]:
    """Min / median / max trust ratio over the adapted tensors that had a gradient; per-tensor rows on request.

    This reads the table back to the host (one transfer), so call it at logging time, not every step.
    """
    rows = stats.detach().to("cpu", torch.float64).tolist()
    ratios = sorted(
        row[2] for row, is_adapted in zip(rows, adapted, strict=True) if is_adapted and not math.isnan(row[2])
    )
    summary: dict[str, float] = {}
    if ratios:
        middle = len(ratios) // 2
        median = ratios[middle] if len(ratios) % 2 else 0.5 * (ratios[middle - 1] + ratios[middle])
        summary = {"trust_ratio/min": ratios[0], "trust_ratio/median": median, "trust_ratio/max": ratios[-1]}
    if per_parameter:
        for name, (param_norm, update_norm, ratio) in zip(names, rows, strict=True):
            if not math.isnan(ratio):
                summary[f"trust_ratio/{name}"] = ratio
                summary[f"param_norm/{name}"] = param_norm
                summary[f"update_norm/{name}"] = update_norm
    return summary
