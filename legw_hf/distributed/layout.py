"""Local pieces of original tensors, and the one reduction that makes their norms whole.

A :class:`FlatLayout` describes a flat local buffer (a ZeRO partition, DeepSpeed's flattened fp16 group) as one
contiguous piece, possibly empty, of each of the original tensors it spans. Every rank lists every original tensor
of the buffer, so the vectors of partial squares line up across ranks. A DTensor (FSDP2) is one piece of one
tensor: its local shard.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import SettingError


@dataclass(frozen=True, eq=False)
class FlatLayout:
    """Which piece of which original tensor each stretch of a flat local buffer holds.

    Args:
        tensors: the original tensors (the model's parameters), in the buffer's order.
        starts, lengths: where each tensor's local piece lies in the buffer (length 0: none of it is here).
        group: the process group over which the pieces of one tensor are spread; None when the buffer holds
            whole tensors (nothing to reduce).
        global_grad_norm: the engine's norm of *all* gradients of the model (DeepSpeed computes one before it
            steps the optimizer once per group), for pre-normalisation that must cover every group; None: the
            optimizer computes it from what it sees.
        engine: the name of what built the buffer, for messages.
    """

    tensors: tuple[Tensor, ...]
    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    group: Any = None
    global_grad_norm: Callable[[], Tensor] | None = None
    engine: str = ""


def _dtensor_type() -> type | None:
    module = sys.modules.get("torch.distributed.tensor")  # no DTensor can exist before this module is loaded
    return getattr(module, "DTensor", None)


def is_dtensor(tensor: Any) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(tensor, cls)


def local_tensor(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (sharing its storage), or the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def shard_group(param: Tensor) -> Any:
    """The process group over which a DTensor parameter's pieces are spread; None for a plain tensor.

    FSDP2 shards parameters on dim 0 over one mesh dimension (HSDP replicates over another). Other placements
    (tensor parallelism, several sharded dimensions) are refused: their norms are not a plain sum of local pieces.
    """
    if not is_dtensor(param):
        return None
    from torch.distributed.tensor import Replicate, Shard

    sharded = [dim for dim, placement in enumerate(param.placements) if isinstance(placement, Shard)]
    others = [p for p in param.placements if not isinstance(p, (Shard, Replicate))]
    if len(sharded) != 1 or others:
        raise SettingError(
            "params",
            "must be DTensors sharded over exactly one mesh dimension (FSDP2, HSDP)",
            tuple(param.placements),
            detail="the trust ratio sums partial squared norms over the shards of each tensor",
        )
    return param.device_mesh.get_group(sharded[0])


class NormReduction:
    """Sums partial squared norms across ranks, with one all-reduce per call, for one step's tensors.

    ``groups`` has one entry per original tensor of the step: its process group when its pieces are spread
    over ranks, None when every rank holds all of it (a replicated tensor next to sharded ones). A replicated
    tensor counts only on rank 0 of the reduction, so the sum is its norm, not world-size times it.
    """

    def __init__(self, groups: Sequence[Any], device: torch.device) -> None:
        sharded = {id(g): g for g in groups if g is not None}
        if len(sharded) > 1:
            raise SettingError(
                "params",
                "must be sharded over one process group per optimizer step",
                len(sharded),
                detail="each step sums its partial norms with a single all-reduce",
            )
        (self.group,) = sharded.values()
        import torch.distributed as dist

        keep_replicated = 1.0 if dist.get_rank(group=self.group) == 0 else 0.0
        self.weights = torch.tensor([1.0 if g is not None else keep_replicated for g in groups], device=device)
        self.count = len(groups)

    def __call__(self, squares: Tensor) -> Tensor:
        """``squares``: one or more vectors of per-tensor partial squares, concatenated; returns the sums."""
        import torch.distributed as dist

        rows = squares.reshape(-1, self.count) * self.weights.to(squares.dtype)
        dist.all_reduce(rows, group=self.group)
        return rows.reshape(-1)
