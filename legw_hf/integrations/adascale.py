"""AdaScale's micro-step protocol, written once for the accelerate loop and for Trainer (which runs on accelerate).

Each micro-batch's gradient is folded into the statistics after its backward; after the last micro-batch of an
update (gradients all-reduced, not yet clipped) the update is measured and the scheduler begins it, setting its LR.
Under DeepSpeed the optimizer steps inside the last backward, so that micro-batch is deferred and the client
optimizer's step pre-hook measures and begins the update, with DeepSpeed's own norm of the applied gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from ..adascale import GradientStatistics
from ..noise_scale import GradientNoise
from . import deepspeed as deepspeed_config

Result = TypeVar("Result")


class MicroStepProtocol:
    """When the statistics of one run are taken and when its updates begin (``begin_update``, the scheduler's)."""

    def __init__(
        self, statistics: GradientStatistics, begin_update: Callable[[], None], deepspeed_client: Any = None
    ) -> None:
        self.statistics = statistics
        self._begin_update = begin_update
        self._step_hook = None
        if deepspeed_client is not None:
            self._step_hook = deepspeed_client.register_step_pre_hook(self._measure_inside_deepspeed_step)

    def backward(self, run_backward: Callable[[], Result], weight: Any, *, last_micro_batch: bool) -> Result:
        """``run_backward()`` for one micro-batch whose mean gradient has ``weight`` in the update's gradient."""
        if self._step_hook is not None and last_micro_batch:
            # DeepSpeed steps inside this backward; the step pre-hook folds this micro-batch in and measures.
            self.statistics.defer_micro_step(weight)
            result = run_backward()
            self.statistics.discard_deferred()
            return result
        result = run_backward()
        self.statistics.micro_step_done(weight)
        if last_micro_batch:
            self.statistics.update_done()
            self._begin_update()
        return result

    def _measure_inside_deepspeed_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """The client optimizer's step pre-hook under DeepSpeed, called once per parameter group with that group
        alone: the first call measures, each sets its group's LR."""
        self.statistics.measure_deferred()
        self._begin_update()

    def close(self) -> None:
        """Stop measuring: the gradient hooks and the step pre-hook are removed."""
        self.statistics.detach()
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None


def measure_micro_steps(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    noise: GradientNoise,
    *,
    mode: str,
    begin_update: Callable[[], None],
) -> MicroStepProtocol:
    """The statistics of a run prepared by ``accelerator`` (``optimizer`` as prepared), attached to ``model``'s
    gradients: Adam-preconditioned for ``sqrt_gain``, unscaled by the fp16 loss scale, under DeepSpeed with its norm
    of the applied gradient."""
    scaler = accelerator.scaler
    applied_norm, client = None, None
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        applied_norm, client = deepspeed_config.zero_gradient_norm(optimizer)
    statistics = GradientStatistics(
        model.parameters(),
        noise,
        preconditioner=optimizer if mode == "sqrt_gain" else None,
        loss_scale=lambda: scaler.get_scale() if scaler is not None and scaler.is_enabled() else None,
        applied_norm=applied_norm,
    ).attach()
    return MicroStepProtocol(statistics, begin_update, client)
