"""DeepSpeed's gradient accumulation set update by update, as a batch ramp needs it (Trainer's ``--legw_batch_ramp``,
accelerate's ``ramped_updates``).

DeepSpeed's engine reads its accumulation from the config at ``initialize``. Run through accelerate, the engine does
not count micro-batches itself: ``DeepSpeedEngineWrapper.backward`` marks each micro-batch an accumulation boundary
or not from accelerate's ``sync_gradients`` (``engine.set_gradient_accumulation_boundary``) and steps the engine on a
boundary only. A ramp's update therefore runs as:

* before its first micro-batch, :func:`begin_update` sets the engine's train batch to the update's
  (``engine.set_train_batch_size``): the accumulation by which ``engine.backward`` divides a loss (unless told not
  to, as Trainer does) and the samples by which ``global_samples`` advances;
* each micro-batch inside :func:`micro_batch`, with ``sync_gradients`` false on all of them but the last: the
  reduction (ZeRO-1 at the boundary, ZeRO-2/3 into the gradient partitions on every micro-batch) completes and the
  engine steps once, on the last.

In DeepSpeed 0.19 nothing else depends on the configured accumulation: ZeRO 1-3 count their micro-steps from the
last step (``micro_step_id``, reset by it) and take the boundary from the engine on every backward, so all three
stages accumulate an update of any length. ``set_train_batch_size`` requires the batch to be a multiple of
micro-batch x data-parallel ranks, which a ramp's stage batches are once the engine's micro-batch is the
dataloader's (:func:`check_micro_step`). (DeepSpeed's pipeline engine also re-plans its schedule there; neither
Trainer nor accelerate runs that engine.)

Plain Python: the engine and the accelerator are used through their methods, nothing here imports DeepSpeed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ...errors import SettingError


def deepspeed_engine(accelerator: Any) -> Any | None:
    """The DeepSpeed engine ``accelerator.prepare`` made, or None (no DeepSpeed, or no model prepared yet)."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    return None if wrapped is None else wrapped.engine


def check_micro_step(engine: Any, micro_step_samples: int) -> None:
    """The engine's micro-batch x data-parallel ranks must be the ramp's micro-batch step (the dataloader's batch x
    processes): the engine derives each update's accumulation from it."""
    micro_batch = engine.train_micro_batch_size_per_gpu()
    if micro_batch * engine.dp_world_size != micro_step_samples:
        raise SettingError(
            "train_micro_batch_size_per_gpu",
            f"must be the dataloader's per-device batch ({micro_step_samples // engine.dp_world_size}) with a batch "
            f"ramp under DeepSpeed: the engine's accumulation of a stage is its batch / (micro-batch x "
            f"{engine.dp_world_size} data-parallel ranks)",
            micro_batch,
        )


def begin_update(engine: Any, batch: int, accumulation: int) -> None:
    """Before the first micro-batch of an update of ``batch`` samples in ``accumulation`` micro-batch steps: the
    engine's train batch and accumulation become the update's."""
    if engine.train_batch_size() != batch:
        engine.set_train_batch_size(batch)
    if engine.gradient_accumulation_steps() != accumulation:
        check_micro_step(engine, batch // accumulation)
        raise RuntimeError(
            f"DeepSpeed accumulates {engine.gradient_accumulation_steps()} micro-batches for a batch of {batch}, the "
            f"ramp's update {accumulation}"
        )


@contextlib.contextmanager
def micro_batch(accelerator: Any, *, last: bool) -> Iterator[None]:
    """One micro-batch of a ramp's update under DeepSpeed: its backward ends the update (the reduction completes and
    the engine steps) only when it is the ``last``; ``sync_gradients`` is restored after it."""
    state = accelerator.gradient_state
    before = state.sync_gradients
    state._set_sync_gradients(last)  # what Trainer's own loop does for every micro-batch it prefetched
    try:
        yield
    finally:
        state._set_sync_gradients(before)
