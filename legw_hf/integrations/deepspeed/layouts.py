"""DeepSpeed's flat buffers as :class:`~legw_hf.distributed.FlatLayout`s, read from its optimizer wrappers.

DeepSpeed replaces a client optimizer's parameters by flat fp32 buffers, assigning ``param_groups[i]["params"]``
directly (no ``add_param_group``):

- ZeRO 1/2 (``DeepSpeedZeroOptimizer``): per param group, this rank's partition of the group's flattened tensors
  (``round_robin_bit16_groups`` at ``round_robin_bit16_offsets``, partitions of ``partition_size``); ``step()`` is
  called once per group with ``param_groups`` set to that group alone.
- ZeRO 3 (``DeepSpeedZeroOptimizer_Stage3``): per sub-group, the concatenation of this rank's partition of each
  tensor (``ds_tensor``, ``ds_numel`` elements of which the first ``numel - rank·ds_numel`` are real); ``step()``
  is called once per sub-group with that group's ``params`` set to the buffer.
- bf16 at ZeRO-1 with fp32 gradient accumulation (``BF16_Optimizer``): per group, this rank's partition of the
  flattened tensors, all groups in one call.
- bf16/fp16 at stage 0 (``FP16_UnfusedOptimizer``; DeepSpeed keeps its flattening ``FP16_Optimizer`` for its own
  fused optimizers): an fp32 copy of each tensor, of its own shape; a layout of one whole piece each, so the copies
  are known for what they are.

ZeRO steps one group at a time, so a global gradient norm must come from the engine, which computes it over every
group (and every rank) first. The wrapper is found from the optimizer's own ``step`` (it is the caller whose
``optimizer`` is ours) or, before training, by unwrapping the optimizer a framework hands out (:func:`attach`).

This module is DeepSpeed's adapter in :mod:`legw_hf.engines` (:func:`layouts_from_caller`,
:func:`initialising_state`): the optimizers reach it through that registry, never by name.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ...distributed.layout import FlatLayout
from ...errors import SettingError
from .clipping import clip_once
from .engine import calling_wrapper, find_wrapper, initialising_state

__all__ = ["attach", "find_wrapper", "initialising_state", "layouts_from_caller", "layouts_of"]


def layouts_from_caller(optimizer: Any) -> dict[int, FlatLayout] | None:
    """The layouts of the DeepSpeed wrapper that is calling ``optimizer.step()`` right now, if one is."""
    wrapper = calling_wrapper(optimizer)
    return None if wrapper is None else layouts_of(wrapper, optimizer)


def attach(optimizer: Any) -> bool:
    """If ``optimizer`` (a chain of wrappers) holds a legw_hf optimizer inside DeepSpeed, give it DeepSpeed's
    layouts now, so that a wrong setting fails before the first step. Returns whether it did."""
    found = find_wrapper(optimizer)
    if found is None or not hasattr(found[1], "use_layouts"):
        return False
    wrapper, client = found
    client.use_layouts(layouts_of(wrapper, client))
    return True


def layouts_of(wrapper: Any, optimizer: Any) -> dict[int, FlatLayout]:
    """id of each flat buffer → its layout, for one DeepSpeed optimizer wrapper."""
    import torch.distributed as dist

    kind = type(wrapper).__name__
    pre_normalisation = getattr(optimizer, "max_grad_norm", None) if type(optimizer).__name__ == "Lamb" else None
    clip_once(float(getattr(wrapper, "clip_grad", 0.0) or 0.0), pre_normalisation, engine=kind)
    layouts: dict[int, FlatLayout] = {}
    if kind == "DeepSpeedZeroOptimizer":
        norm = _engine_norm(wrapper)
        for i, flat in enumerate(wrapper.single_partition_of_fp32_groups):
            group = wrapper.real_dp_process_group[i]
            size = int(wrapper.partition_size[i])
            tensors = wrapper.round_robin_bit16_groups[i]
            offsets = wrapper.round_robin_bit16_offsets[i]
            layouts[id(flat)] = _partition(tensors, offsets, dist.get_rank(group=group) * size, size, group, norm, kind)
    elif kind == "DeepSpeedZeroOptimizer_Stage3":
        norm = _engine_norm(wrapper)
        rank = dist.get_rank(group=wrapper.dp_process_group)
        for sub_group, flat in enumerate(wrapper.fp32_partitioned_groups_flat):
            tensors = tuple(wrapper.fp16_groups[sub_group])
            sizes = [int(part.ds_numel) for part in wrapper.fp16_partitioned_groups[sub_group]]
            starts = tuple(sum(sizes[:j]) for j in range(len(sizes)))
            lengths = tuple(
                max(0, min(size, int(t.ds_numel) - rank * size)) for t, size in zip(tensors, sizes, strict=True)
            )
            layouts[id(flat)] = FlatLayout(tensors, starts, lengths, wrapper.dp_process_group, norm, "ZeRO-3")
    elif kind == "BF16_Optimizer":
        for i, flat in enumerate(wrapper.fp32_groups_flat_partition):
            group = wrapper.real_dp_process_group[i]
            tensors = wrapper.bf16_groups[i]
            offsets = [sum(t.numel() for t in tensors[:j]) for j in range(len(tensors))]
            size = flat.numel()
            layouts[id(flat)] = _partition(tensors, offsets, dist.get_rank(group=group) * size, size, group, None, kind)
    elif kind == "FP16_UnfusedOptimizer":
        for originals, copies in zip(wrapper.fp16_groups, wrapper.fp32_groups, strict=True):
            for original, copy in zip(originals, copies, strict=True):
                layouts[id(copy)] = FlatLayout((original,), (0,), (copy.numel(),), None, None, kind)
    return layouts


def _partition(tensors: Any, offsets: Any, left: int, size: int, group: Any, norm: Any, engine: str) -> FlatLayout:
    """Tensors laid out at ``offsets`` in a flat buffer, of which ``[left, left + size)`` is local."""
    starts, lengths = [], []
    for tensor, offset in zip(tensors, offsets, strict=True):
        low, high = max(int(offset), left), min(int(offset) + tensor.numel(), left + size)
        starts.append(low - left if high > low else 0)
        lengths.append(max(0, high - low))
    name = {"DeepSpeedZeroOptimizer": "ZeRO-1/2"}.get(engine, engine)
    return FlatLayout(tuple(tensors), tuple(starts), tuple(lengths), group, norm, name)


def _engine_norm(wrapper: Any):
    """The unscaled norm of all gradients, which ZeRO computes over every group before stepping any."""

    def norm() -> Tensor | float:
        value = getattr(wrapper, "_global_grad_norm", None)
        if value is None:
            raise SettingError(
                "zero_optimization.compute_grad_norm",
                "must be true for a LAMB that pre-normalises by the global gradient norm",
                False,
            )
        return value

    return norm
