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

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.data_loader import DataLoaderDispatcher, DataLoaderShard
from accelerate.utils import DistributedType

from ..adascale import MODES as ADASCALE_MODES, AdaScaleScheduler, GradientStatistics
from ..errors import SettingError, one_of, positive, positive_int
from ..noise_scale import GradientNoise, check_scale
from ..plan import LegwConfig, LegwPlan
from ..ramp import AUTO_RAMP_UNSUPPORTED, AutoRamp, BatchRamp, RampController, RampDecision, RampedPlan, ramped_plan
from ..scheduler import LegwScheduler, SkippedStepDetector
from . import deepspeed as deepspeed_config
from .adascale import MicroStepProtocol, measure_micro_steps
from .deepspeed import accumulation as deepspeed_accumulation, layouts as deepspeed_layouts

logger = logging.getLogger(__name__)


class AcceleratorLegwScheduler:
    """A :class:`LegwScheduler` stepped only on real updates of an accelerate loop.

    ``step()`` advances the plan when ``accelerator.sync_gradients`` is true (the last micro-batch of an
    accumulation window) and the optimizer step was not skipped by the fp16 GradScaler (also for fused
    optimizers, see :class:`SkippedStepDetector`); every other call is a no-op. Under a batch ramp it advances past
    a skipped update too: that update took its samples (:func:`ramped_updates` moves on), and a ramp's plan is
    counted in samples, so the next update's batch, accumulation and LR are those of the progress the data reached.
    Each process steps its own copy, so all ranks agree without communication.
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
        if self.accelerator.sync_gradients:
            self.end_update(applied=update_was_applied(self.accelerator, self._skips))

    def end_update(self, *, applied: bool) -> None:
        """The plan's progress after an update whose optimizer step was ``applied`` or skipped (class doc)."""
        if applied or isinstance(self.plan, RampedPlan):
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


def update_was_applied(accelerator: Accelerator, skips: SkippedStepDetector) -> bool:
    """Whether the optimizer step just called ended an accumulation window and was not skipped by the GradScaler."""
    if not accelerator.sync_gradients:
        return False
    return not (skips.step_was_skipped() or accelerator.optimizer_step_was_skipped)


def require_prepared(train_dataloader: Any) -> None:
    """The plan and the statistics read the dataloader accelerate prepared (its global batch, its shards)."""
    if not isinstance(train_dataloader, (DataLoaderShard, DataLoaderDispatcher)):
        raise SettingError(
            "train_dataloader", "must be the dataloader returned by accelerator.prepare", type(train_dataloader)
        )


def drops_last(train_dataloader: Any) -> bool:
    """Whether a prepared dataloader drops the last partial batch: accelerate keeps the user's ``drop_last`` in
    ``_drop_last`` (its own ``drop_last`` is False, the batch sampler doing the dropping)."""
    return bool(getattr(train_dataloader, "_drop_last", getattr(train_dataloader, "drop_last", False)))


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
    batch_ramp: BatchRamp | str | AutoRamp | None = None,
) -> AcceleratorLegwScheduler:
    """Build, register for checkpointing and return the LEGW scheduler of an accelerate loop.

    Args:
        accelerator: the run's ``Accelerator`` (its ``gradient_accumulation_steps`` counts).
        optimizer: the optimizer returned by ``accelerator.prepare``.
        config: the tuned base settings.
        train_dataloader: the dataloader returned by ``accelerator.prepare``; the dataset size and the steps
            per epoch are read from it.
        num_epochs: the training length in epochs (or give ``max_steps``: exactly one of the two).
        max_steps: the training length in optimizer updates.
        batch_size: the global batch you expect; a ``SettingError`` if the loop forms another.
        batch_ramp: a batch ramp (:class:`~legw_hf.ramp.BatchRamp` or its text, ``"64@0,256@1"``): the global batch
            grows during the run and each update takes LEGW's LR for its own batch (:class:`~legw_hf.ramp.RampedPlan`).
            The loop then draws each update's micro-batches from :func:`ramped_updates`; the ``Accelerator`` keeps
            ``gradient_accumulation_steps=1`` and every stage batch must be a multiple of the dataloader's batch ×
            processes. Takes ``num_epochs``, not ``max_steps`` or ``batch_size``. Runs under DDP, under FSDP2
            (accelerate's FSDP plugin with ``fsdp_version=2``), where each update's gradient is reduce-scattered
            once, after its last micro-batch, into the sharded gradients, and under a DeepSpeed plugin (ZeRO 1-3),
            where the model must be prepared first: each update's accumulation is set on its engine. An
            :class:`~legw_hf.ramp.AutoRamp` decides the ramp during the run from the measured gradient noise scale
            (:class:`AcceleratorAutoRamp`); its loop calls ``update.backward(loss)``, which measures each micro-batch.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:  # a "scheduler" block would be a second schedule beside the plan
        warning = deepspeed_config.check_config_blocks(plugin.deepspeed_config, legw=True, client_optimizer=None)
        if warning:
            logger.warning("%s", warning)
    if batch_ramp is not None:
        return _create_ramped_scheduler(accelerator, optimizer, config, train_dataloader, batch_ramp, num_epochs)
    require_prepared(train_dataloader)
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
        drop_last=drops_last(train_dataloader),
    )
    scheduler = _plan_scheduler(accelerator, optimizer, plan)
    accelerator.register_for_checkpointing(scheduler)
    return scheduler


def _plan_scheduler(accelerator: Accelerator, optimizer: torch.optim.Optimizer, plan: Any) -> AcceleratorLegwScheduler:
    # Under a DeepSpeed plugin, learn its partitions now: a setting that would make trust ratios wrong fails here.
    deepspeed_layouts.attach(optimizer)
    return AcceleratorLegwScheduler(LegwScheduler(optimizer, plan), accelerator)


def _create_ramped_scheduler(
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    config: LegwConfig,
    train_dataloader: Any,
    batch_ramp: BatchRamp | str | AutoRamp,
    num_epochs: float | None,
) -> AcceleratorLegwScheduler:
    if isinstance(batch_ramp, str) and batch_ramp.strip() == "auto":
        raise SettingError(
            "batch_ramp",
            "takes an automatic ramp as AutoRamp(max_batch=..., efficiency=0.8, patience=20) (legw_hf.ramp): it needs "
            "at least its cap",
            batch_ramp,
        )
    require_prepared(train_dataloader)
    if num_epochs is None:
        raise SettingError("num_epochs", "is required with batch_ramp (the ramp's progress points are epochs)", None)
    if accelerator.gradient_accumulation_steps != 1:
        raise SettingError(
            "gradient_accumulation_steps",
            "must be 1 with batch_ramp: the ramp sets each update's accumulation (ramped_updates)",
            accelerator.gradient_accumulation_steps,
        )
    micro_step = train_dataloader.total_batch_size
    epoch_samples = len(train_dataloader) * micro_step
    if epoch_samples != len(train_dataloader.dataset) and not drops_last(train_dataloader):
        raise SettingError(
            "train_dataloader",
            f"must give whole micro-batches with batch_ramp (a ramp counts progress in samples): drop_last=True, or a "
            f"dataset whose size is a multiple of batch x processes = {micro_step}",
            len(train_dataloader.dataset),
        )
    if isinstance(batch_ramp, AutoRamp):
        scheduler = create_auto_ramp(accelerator, optimizer, config, batch_ramp, micro_step, epoch_samples, num_epochs)
    else:
        plan = ramped_plan(
            config, batch_ramp, dataset_size=epoch_samples, epochs=num_epochs, micro_step_samples=micro_step
        )
        engine = ramp_engine(accelerator)
        if engine is not None:
            deepspeed_accumulation.check_micro_step(engine, micro_step)
        scheduler = _plan_scheduler(accelerator, optimizer, plan)
    accelerator.register_for_checkpointing(scheduler)
    return scheduler


def create_auto_ramp(
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    config: LegwConfig,
    settings: AutoRamp,
    micro_step: int,
    dataset_size: int,
    epochs: float,
) -> AcceleratorAutoRamp:
    """The scheduler of an automatic ramp (:class:`AcceleratorAutoRamp`) over ``epochs`` of ``dataset_size`` samples
    in micro-batch steps of ``micro_step`` samples over all processes; what the run cannot take is refused first.
    (Not registered for checkpointing: :func:`create_legw_scheduler` does that, LegwTrainer saves its own.)"""
    backend = accelerator.distributed_type.name
    if backend == "FSDP":
        raise SettingError(
            "batch_ramp",
            f"takes no AutoRamp under {backend}: {AUTO_RAMP_UNSUPPORTED[backend]}; run it with DDP",
            accelerator.distributed_type.value,
        )
    micro_batch = micro_step // accelerator.num_processes
    plan, plans = settings.plans(
        config, micro_batch=micro_batch, micro_step_samples=micro_step, dataset_size=dataset_size, epochs=epochs
    )
    start = plan.batch_for_update(0)
    refusal = deepspeed_statistics_refusal(accelerator, "diagnostics")  # (the start's estimates: AutoRamp.plans)
    if refusal is not None:
        raise SettingError("batch_ramp", f"AutoRamp {refusal}", settings)
    controller = RampController(settings, start, dataset_size=dataset_size, epochs=epochs)
    noise = GradientNoise(micro_batch=micro_batch, base_batch=micro_batch, global_batch=start)
    return AcceleratorAutoRamp(LegwScheduler(optimizer, plan), accelerator, controller, noise, plans)


def deepspeed_statistics_refusal(accelerator: Accelerator, mode: str, *, estimates: int | None = None) -> str | None:
    """Why gradient statistics of ``mode`` (over ``estimates`` estimates per update) cannot be taken under the
    accelerator's DeepSpeed plugin (:func:`~legw_hf.integrations.deepspeed.adascale_refusal`); None without
    DeepSpeed."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return deepspeed_config.adascale_refusal(
        accelerator.state.deepspeed_plugin.deepspeed_config,
        mode,
        fp16=accelerator.mixed_precision == "fp16",
        estimates=estimates,
    )


class AcceleratorAutoRamp(AcceleratorLegwScheduler):
    """The scheduler of an accelerate loop whose batch ramp is decided as it runs (:class:`~legw_hf.ramp.AutoRamp`).

    Each update's micro-batch gradients are measured in ``update.backward(loss)`` (:func:`ramped_updates`) into
    :attr:`noise` (moving averages of tr Σ and ‖G‖², the statistics AdaScale uses); :meth:`step` hands them to the
    :attr:`controller` and, when it doubles the batch, adds the new batch's LEGW plan as a stage of the plan,
    starting with the next update, before setting that update's LR. An update the GradScaler skipped advances the
    plan (its samples were taken) but is not shown to the controller: its statistics were not recorded, and it
    does not count toward the patience. Each change is logged (INFO, and a JSON line in
    ``AutoRamp.log``) and kept in :attr:`decisions`; :func:`~legw_hf.ramp.ramp_from_decisions` turns them into
    the scheduled ramp that replays the run. The state (``save_state``/``load_state``) holds the plan so far, the
    controller and the moving averages.
    """

    def __init__(
        self,
        scheduler: LegwScheduler,
        accelerator: Accelerator,
        controller: RampController,
        noise: GradientNoise,
        plans: dict[int, LegwPlan],
    ) -> None:
        super().__init__(scheduler, accelerator)
        self.controller = controller
        self.noise = noise
        self._plans = plans
        self.micro_steps: MicroStepProtocol | None = None
        self._measured = False

    @property
    def decisions(self) -> list[RampDecision]:
        """The changes so far, in order."""
        return self.controller.decisions

    def measure(self, model: torch.nn.Module) -> MicroStepProtocol:
        """Attach the gradient statistics to ``model`` (once; :func:`ramped_updates` calls this)."""
        if self.micro_steps is None:
            self.micro_steps = measure_micro_steps(
                self.accelerator,
                model,
                self.scheduler.optimizer,
                self.noise,
                mode="diagnostics",
                begin_update=self.begin_update,
            )
        return self.micro_steps

    def begin_update(self) -> None:
        """The update's statistics are in (the micro-step protocol calls this after its last micro-batch)."""
        self._measured = True

    def step(self) -> None:
        if not self._measured:
            raise RuntimeError(
                "AutoRamp measures every micro-batch: call update.backward(loss) (ramped_updates), not "
                "accelerator.backward, for each of the update's micro-batches before scheduler.step()"
            )
        self._measured = False
        super().step()

    def end_update(self, *, applied: bool) -> None:
        plan = self.scheduler.plan
        update = self.scheduler.updates
        decision = None
        if applied:
            decision = self.controller.observe(
                update=update, samples=plan.samples_before(update + 1), trace=self.noise.trace, signal=self.noise.signal
            )
        if decision is not None:
            self.scheduler.plan = plan.with_stage(self._plans[decision.new_batch], decision.epoch)
            self.noise.global_batch = decision.new_batch
            self._log(decision)
        self.scheduler.step()

    def _log(self, decision: RampDecision) -> None:
        logger.info(
            "AutoRamp: batch %d -> %d from update %d (%d samples, epoch %.4g): B_simple %.4g (trace %.4g, signal "
            "%.4g), doubling efficiency %.3f >= %g",
            decision.old_batch,
            decision.new_batch,
            decision.update,
            decision.samples,
            decision.epoch,
            decision.b_simple,
            decision.trace,
            decision.signal,
            decision.efficiency,
            self.controller.settings.efficiency,
        )
        path = self.controller.settings.log
        if path is not None and self.accelerator.is_main_process:
            with open(path, "a") as log:
                log.write(json.dumps(decision.to_dict()) + "\n")

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict() | {
            "auto_ramp": {"controller": self.controller.state_dict(), "noise": self.noise.state_dict()}
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the ramp so far (the plan's stages), the controller, the moving averages and the progress."""
        saved = state_dict.get("plan")
        if isinstance(saved, dict) and "ramp" in saved:
            ramp = BatchRamp.parse(saved["ramp"])
            batches = [stage.batch_size for stage in ramp.stages]
            if not self.controller.settings.takes(ramp, self.controller.start_batch):
                raise ValueError(
                    f"the checkpoint's ramp {ramp.to_text()} is not one this AutoRamp can take (from batch "
                    f"{self.controller.start_batch}, doubling up to {self.controller.settings.max_batch})"
                )
            self.scheduler.plan = RampedPlan(
                ramp=ramp,
                plans=tuple(self._plans[batch] for batch in batches),
                micro_step_samples=self.plan.micro_step_samples,
            )
        super().load_state_dict(state_dict)
        auto = state_dict.get("auto_ramp")
        if auto is not None:
            self.controller.load_state_dict(auto["controller"])
            self.noise.load_state_dict(auto["noise"])
        self.noise.global_batch = self.controller.batch


def load_state(accelerator: Accelerator, input_dir: str, **load_model_func_kwargs: Any) -> None:
    """``accelerator.load_state(input_dir)``, which under DeepSpeed (ZeRO-1/2) also loads a state saved by another
    number of processes: DeepSpeed refuses its own checkpoint then, so the model's checkpoint is converted to
    DeepSpeed's universal form (once, beside it) and loaded from a view of the folder that links it in its place
    (:func:`~legw_hf.integrations.deepspeed.universal_state_view`; nothing saved is changed), the engine told to
    load it as a universal checkpoint; the weights and optimizer moments are re-partitioned for this world. The
    LEGW scheduler's progress loads as always (a batch ramp's at the same update, its accumulation derived
    again). Call it on every process, after ``accelerator.prepare``."""
    engine = None
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        engine = deepspeed_accumulation.deepspeed_engine(accelerator)
    view = None
    if engine is not None:
        view = deepspeed_config.universal_state_view(
            input_dir,
            stage=engine.zero_optimization_stage(),
            world_size=engine.dp_world_size,
            main_process=accelerator.is_main_process,
        )
    if view is None:
        accelerator.load_state(input_dir, **load_model_func_kwargs)
        return
    loads_universal = engine._config.load_universal_checkpoint  # read only while a checkpoint loads
    engine._config.load_universal_checkpoint = True
    try:
        accelerator.load_state(str(view), **load_model_func_kwargs)
    finally:
        engine._config.load_universal_checkpoint = loads_universal


def ramp_engine(accelerator: Accelerator) -> Any | None:
    """The DeepSpeed engine whose accumulation a batch ramp sets update by update, or None without DeepSpeed."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    engine = deepspeed_accumulation.deepspeed_engine(accelerator)
    if engine is None:
        raise SettingError(
            "model",
            "must be prepared by accelerator.prepare (with the optimizer) before a batch ramp runs under DeepSpeed: "
            "each update's accumulation is set on its engine",
            None,
        )
    return engine


def ramp_micro_batch(accelerator: Accelerator, model: Any, *, last: bool) -> contextlib.AbstractContextManager:
    """The context of one micro-batch of a ramp's update: gradients are reduced, and the update applied, on the
    ``last`` only. Under DeepSpeed the engine takes its accumulation boundary from ``sync_gradients``
    (:func:`~legw_hf.integrations.deepspeed.accumulation.micro_batch`); elsewhere the others run under
    ``accelerator.no_sync``."""
    if ramp_engine(accelerator) is not None:
        return deepspeed_accumulation.micro_batch(accelerator, last=last)
    return contextlib.nullcontext() if last else accelerator.no_sync(model)


@dataclass
class RampedUpdate:
    """One update of a batch ramp: its index, batch and accumulation, and its micro-batches (:meth:`micro_batches`)."""

    index: int
    batch_size: int
    accumulation: int
    _batches: Iterator[Any]
    _accelerator: Accelerator
    _model: Any
    _measure: MicroStepProtocol | None = None
    _backwards: int = 0

    def micro_batches(self) -> Iterator[Any]:
        """The update's ``accumulation`` micro-batches. Gradients are reduced across processes only on the last one
        (the others run under ``accelerator.no_sync``: DDP's ``no_sync``; under FSDP2 ``set_requires_gradient_sync``,
        which keeps the unsharded gradients until the last backward reduce-scatters their sum; under DeepSpeed off
        the engine's accumulation boundary); scale each loss by ``1 / accumulation`` (DeepSpeed divides by it
        itself), or call :meth:`backward`. Either way the update's gradient is the mean over all its micro-batches on
        all processes."""
        for position in range(self.accumulation):
            batch = next(self._batches)
            with ramp_micro_batch(self._accelerator, self._model, last=position + 1 == self.accumulation):
                yield batch

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """``accelerator.backward(loss / accumulation)`` for one micro-batch's mean loss (under DeepSpeed
        ``accelerator.backward(loss)``: the engine divides by the update's accumulation, which :func:`ramped_updates`
        set on it); with an automatic ramp also that micro-batch's gradient statistics (there it replaces
        ``accelerator.backward``)."""
        self._backwards += 1
        if self._backwards > self.accumulation:
            raise RuntimeError(f"update {self.index} has {self.accumulation} micro-batches: one backward for each")
        engine_divides = self._accelerator.distributed_type == DistributedType.DEEPSPEED
        scaled = loss if engine_divides else loss / self.accumulation
        if self._measure is None:
            self._accelerator.backward(scaled, **kwargs)
            return
        last = self._backwards == self.accumulation
        self._measure.backward(
            lambda: self._accelerator.backward(scaled, **kwargs), 1.0 / self.accumulation, last_micro_batch=last
        )


def ramped_updates(
    accelerator: Accelerator, scheduler: AcceleratorLegwScheduler, train_dataloader: Any, model: Any
) -> Iterator[RampedUpdate]:
    """The updates of a batch ramp (:func:`create_legw_scheduler` with ``batch_ramp``), from the scheduler's progress
    on (a run resumed with ``accelerator.load_state`` picks the data up where it stopped)::

        scheduler = create_legw_scheduler(accelerator, optimizer, config, loader, num_epochs=3, batch_ramp="64@0,256@1")
        for update in ramped_updates(accelerator, scheduler, loader, model):
            for batch in update.micro_batches():
                update.backward(model(**batch).loss)  # accelerator.backward(loss / update.accumulation)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()

    Micro-batches are drawn across epoch ends (``set_epoch`` at each), since an update at one batch may begin in one
    epoch and end in the next. The plan is read again for every update: an automatic ramp (``AutoRamp``) adds
    stages as it runs, and ``update.backward`` is where it measures the gradients.

    Under a DeepSpeed plugin (ZeRO 1-3) the engine's train batch is set to each update's before it starts
    (``engine.set_train_batch_size``), so the engine divides each loss by the update's accumulation and counts its
    samples; it applies the update inside the last micro-batch's backward, where ``optimizer.step()`` is accelerate's
    no-op (see :mod:`legw_hf.integrations.deepspeed.accumulation`).
    """
    plan = scheduler.plan
    if not isinstance(plan, RampedPlan):
        raise SettingError("scheduler", "must be made with batch_ramp (create_legw_scheduler)", type(plan).__name__)
    engine = ramp_engine(accelerator)
    measure = scheduler.measure(model) if isinstance(scheduler, AcceleratorAutoRamp) else None
    micro_steps = _micro_batch_stream(
        accelerator, train_dataloader, plan.samples_before(scheduler.updates) // plan.micro_step_samples
    )
    index = scheduler.updates
    while index < scheduler.plan.total_steps:
        plan = scheduler.plan
        batch, accumulation = plan.batch_for_update(index), plan.accumulation_for_update(index)
        if engine is not None:
            deepspeed_accumulation.begin_update(engine, batch, accumulation)
        yield RampedUpdate(index, batch, accumulation, micro_steps, accelerator, model, measure)
        index += 1


def _micro_batch_stream(accelerator: Accelerator, loader: Any, done: int) -> Iterator[Any]:
    """The loader's micro-batches from the ``done``-th on, epoch after epoch."""
    epoch, offset = divmod(done, len(loader))
    while True:
        loader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(loader, offset) if offset else loader
        epoch, offset = epoch + 1, 0


class AcceleratorAdaScale:
    """AdaScale, or only its gradient-noise statistics, in an accelerate loop (:func:`create_adascale`).

    Replace ``accelerator.backward(loss)`` by :meth:`backward` and call :meth:`step` after ``optimizer.step()``::

        for batch in loader:
            with accelerator.accumulate(model):
                adascale.backward(model(**batch).loss)   # + the statistics; on the last micro-batch, the LR
                optimizer.step()
                adascale.step()                          # tau += gain, on applied updates only
                optimizer.zero_grad()
            if adascale.finished:
                break

    :meth:`logs` gives ``noise_scale/b_simple``, ``adascale/gain``, ``adascale/efficiency`` (and the progress).
    In ``diagnostics`` mode the LR is left to your own scheduler and :meth:`step` does nothing.
    """

    def __init__(
        self, accelerator: Accelerator, micro_steps: MicroStepProtocol, scheduler: AdaScaleScheduler | None
    ) -> None:
        self.accelerator = accelerator
        self.micro_steps = micro_steps
        self.scheduler = scheduler
        self._skips = SkippedStepDetector(accelerator.scaler)

    @property
    def statistics(self) -> GradientStatistics:
        return self.micro_steps.statistics

    @property
    def noise(self) -> GradientNoise:
        return self.statistics.noise

    @property
    def finished(self) -> bool:
        """Whether the progress reached the base run's length (never in ``diagnostics`` mode)."""
        return self.scheduler is not None and self.scheduler.finished

    @property
    def progress(self) -> float | None:
        return None if self.scheduler is None else self.scheduler.progress

    def backward(self, loss: torch.Tensor, weight: float | torch.Tensor | None = None, **kwargs: Any) -> None:
        """``accelerator.backward(loss)`` and this micro-batch's statistics.

        ``weight`` is the weight of this micro-batch's mean gradient in the accumulated one; the default,
        ``1 / gradient_accumulation_steps``, is what accelerate's division of a mean loss gives.
        """
        if weight is None:
            weight = 1.0 / self.accelerator.gradient_accumulation_steps
        self.micro_steps.backward(
            lambda: self.accelerator.backward(loss, **kwargs), weight, last_micro_batch=self.accelerator.sync_gradients
        )

    def step(self) -> None:
        if self.scheduler is not None and update_was_applied(self.accelerator, self._skips):
            self.scheduler.step()

    def get_last_lr(self) -> list[float]:
        if self.scheduler is None:
            raise AttributeError("get_last_lr: in diagnostics mode the LR is your own scheduler's")
        return self.scheduler.get_last_lr()

    def logs(self) -> dict[str, float]:
        logs = self.noise.summary()
        if self.scheduler is not None:
            logs["adascale/progress"] = self.scheduler.progress
        return logs

    def state_dict(self) -> dict[str, Any]:
        return {
            "noise": self.noise.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the statistics and the progress (``accelerator.load_state`` calls this)."""
        self.noise.load_state_dict(state_dict["noise"])
        if self.scheduler is not None:
            if state_dict.get("scheduler") is None:
                raise ValueError("the saved state has no AdaScale progress (it was saved in diagnostics mode)")
            self.scheduler.load_state_dict(state_dict["scheduler"])
            self.accelerator.step = self.scheduler.updates * self.accelerator.gradient_accumulation_steps


def create_adascale(
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module,
    train_dataloader: Any,
    *,
    mode: str = "gain",
    config: LegwConfig | None = None,
    num_epochs: float | None = None,
    schedule: Any = None,
    base_batch_size: int | None = None,
    base_steps: float | None = None,
    scale: float | None = None,
) -> AcceleratorAdaScale:
    """Build, register for checkpointing and return AdaScale (``mode`` ``gain`` or ``sqrt_gain``) or its statistics
    alone (``diagnostics``) for an accelerate loop.

    The base run is either ``config`` (a :class:`~legw_hf.plan.LegwConfig` with ``rule="none"``: AdaScale replaces
    the scaling rule) for ``num_epochs`` at its ``base_batch_size``, or ``schedule`` (the LR as a function of
    progress in base-run updates) with ``base_batch_size`` and ``base_steps``. ``scale``, if given, must equal
    global batch / base batch. ``diagnostics`` needs neither (the gain is then relative to ``base_batch_size``, by
    default the per-device batch).

    Under accelerate's DeepSpeed plugin (ZeRO 1-3, bf16 or fp32; not ``sqrt_gain``) DeepSpeed steps inside
    ``accelerator.backward``: the update is measured in the client optimizer's step pre-hook, with DeepSpeed's own
    norm of the applied gradient. FSDP is refused.
    """
    one_of("mode", mode, tuple(ADASCALE_MODES))
    if accelerator.distributed_type == DistributedType.FSDP:
        raise SettingError(
            "mode",
            "AdaScale is not supported under FSDP: each micro-batch's gradient is reduce-scattered before a hook on "
            "the sharded parameters sees it (run it with DDP)",
            mode,
        )
    require_prepared(train_dataloader)
    global_batch = global_batch_size(accelerator, train_dataloader)
    micro_batch = global_batch // (accelerator.num_processes * accelerator.gradient_accumulation_steps)
    power = ADASCALE_MODES[mode]
    plan = None
    if power is not None:
        if (config is None) == (schedule is None):
            raise SettingError("config", "or schedule must be given for AdaScale's base run, exactly one", None)
        if config is not None:
            if config.rule != "none":
                raise SettingError(
                    "rule",
                    "must be 'none' in the config of an AdaScale run: AdaScale replaces the LEGW scaling rule, "
                    "choose one",
                    config.rule,
                )
            base_batch_size = config.base_batch_size
            plan = config.plan(
                batch_size=base_batch_size,
                dataset_size=len(train_dataloader.dataset),
                epochs=num_epochs,
                drop_last=drops_last(train_dataloader),
            )
            schedule, base_steps = plan, plan.total_steps
        else:
            positive_int("base_batch_size", base_batch_size)
            positive("base_steps", base_steps)
    base = base_batch_size if base_batch_size is not None else micro_batch
    check_scale(scale, global_batch=global_batch, base_batch=base)
    noise = GradientNoise(micro_batch=micro_batch, base_batch=base, global_batch=global_batch)
    refusal = deepspeed_statistics_refusal(accelerator, mode, estimates=global_batch // micro_batch)
    if refusal is not None:
        raise SettingError("mode", refusal, mode)
    scheduler = None
    if power is not None:
        scheduler = AdaScaleScheduler(optimizer, schedule, noise, total_progress=base_steps, power=power)
    micro_steps = measure_micro_steps(
        accelerator,
        model,
        optimizer,
        noise,
        mode=mode,
        begin_update=scheduler.begin_update if scheduler is not None else lambda: None,
    )
    adascale = AcceleratorAdaScale(accelerator, micro_steps, scheduler)
    accelerator.register_for_checkpointing(adascale)
    return adascale
