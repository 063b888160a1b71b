"""LEGW in a plain ``accelerate`` loop.

``accelerator.prepare`` must not see the scheduler: its ``AcceleratedScheduler`` steps ``num_processes``
times per update and ignores gradient accumulation. :func:`create_legw_scheduler` builds the plan from the
``Accelerator`` and the prepared dataloader, registers the scheduler for ``save_state``/``load_state``, and
returns a wrapper whose ``step()`` advances the plan once per real optimizer update::

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    scheduler = create_legw_scheduler(accelerator, optimizer, config, loader, num_epochs=3)
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            optimizer.step()
            scheduler.step()          # a no-op unless gradients were synced and the step was applied
            optimizer.zero_grad()
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.data_loader import DataLoaderDispatcher, DataLoaderShard

from ..distributed import deepspeed as deepspeed_layouts
from ..errors import SettingError
from ..plan import LegwConfig, LegwPlan
from ..scheduler import LegwScheduler, SkippedStepDetector
from . import deepspeed as deepspeed_config

logger = logging.getLogger(__name__)


class AcceleratorLegwScheduler:
    """A :class:`LegwScheduler` stepped only on real updates of an accelerate loop.

    ``step()`` advances the plan when ``accelerator.sync_gradients`` is true (the last micro-batch of an
    accumulation window) and the optimizer step was not skipped by the fp16 GradScaler (also for fused
    optimizers, see :class:`SkippedStepDetector`); every other call is a no-op. Each process steps its own
    copy, so all ranks agree without communication.
    """

    def __init__(self, scheduler: LegwScheduler, accelerator: Accelerator) -> None:
        self.scheduler = scheduler
        self.accelerator = accelerator
        self._skips = SkippedStepDetector(accelerator.scaler)

    @property
    def plan(self) -> LegwPlan:
        return self.scheduler.plan

    @property
    def updates(self) -> int:
        return self.scheduler.updates

    def step(self) -> None:
        if not self.accelerator.sync_gradients:
            return
        skipped = self._skips.step_was_skipped() or self.accelerator.optimizer_step_was_skipped
        if not skipped:
            self.scheduler.step()

    def get_last_lr(self) -> list[float]:
        return self.scheduler.get_last_lr()

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the progress (``accelerator.load_state`` calls this), converted in epochs if the plan changed.

        accelerate restores its micro-batch counter as saved, and decides from it which micro-batch ends an
        accumulation window: resumed with another accumulation (the same global batch on fewer processes, say) the
        windows would straddle updates. The counter is set to the restored updates' micro-batches of this run.
        """
        self.scheduler.load_state_dict(state_dict)
        self.accelerator.step = self.scheduler.updates * self.accelerator.gradient_accumulation_steps


def global_batch_size(accelerator: Accelerator, train_dataloader: Any) -> int:
    """Samples per optimizer update across all processes: per-device × accumulation × processes."""
    return train_dataloader.total_batch_size * accelerator.gradient_accumulation_steps


def create_legw_scheduler(
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    config: LegwConfig,
    train_dataloader: Any,
    *,
    num_epochs: float | None = None,
    max_steps: int | None = None,
    batch_size: int | None = None,
) -> AcceleratorLegwScheduler:
    """Build, register for checkpointing and return the LEGW scheduler of an accelerate loop.

    Args:
        accelerator: the run's ``Accelerator`` (its ``gradient_accumulation_steps`` counts).
        optimizer: the optimizer returned by ``accelerator.prepare``.
        config: the tuned base settings.
        train_dataloader: the dataloader returned by ``accelerator.prepare``; the dataset size and the steps
            per epoch are read from it.
        num_epochs / max_steps: the training length, exactly one.
        batch_size: the global batch you expect; a ``SettingError`` if the loop forms another.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:  # a "scheduler" block would be a second schedule beside the plan
        warning = deepspeed_config.check_config_blocks(plugin.deepspeed_config, legw=True, client_optimizer=None)
        if warning:
            logger.warning("%s", warning)
    if not isinstance(train_dataloader, (DataLoaderShard, DataLoaderDispatcher)):
        raise SettingError(
            "train_dataloader", "must be the dataloader returned by accelerator.prepare", type(train_dataloader)
        )
    actual = global_batch_size(accelerator, train_dataloader)
    if batch_size is not None and batch_size != actual:
        raise SettingError(
            "batch_size",
            f"must equal per-device batch x gradient_accumulation_steps x processes = {actual}",
            batch_size,
        )
    ga = accelerator.gradient_accumulation_steps
    plan = config.plan(
        batch_size=actual,
        dataset_size=len(train_dataloader.dataset),
        epochs=num_epochs,
        steps=max_steps,
        steps_per_epoch=max(-(-len(train_dataloader) // ga), 1),
        drop_last=bool(getattr(train_dataloader, "drop_last", False)),
    )
    # Under a DeepSpeed plugin, learn its partitions now: a setting that would make trust ratios wrong fails here.
    deepspeed_layouts.attach(optimizer)
    scheduler = AcceleratorLegwScheduler(LegwScheduler(optimizer, plan), accelerator)
    accelerator.register_for_checkpointing(scheduler)
    return scheduler
