"""The callback that checks the LEGW plan against the real run, logs it and adds the LEGW keys to the logs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers import DefaultFlowCallback, ProgressCallback, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ...adascale import AdaScaleScheduler
from ...noise_scale import GradientNoise
from ...optim import layerwise_optimizer_of
from ...plan import LegwPlan
from ...ramp import RampedPlan, write_decisions
from ...record import record_plan, write_json
from ...scheduler import LegwScheduler, SkippedStepDetector
from ..accelerate import AcceleratorAutoRamp
from ..deepspeed import layouts as deepspeed_layouts
from .arguments import LegwArguments

logger = logging.getLogger(__name__)


#: The gradient noise statistics (--legw_adascale) in a Trainer checkpoint folder.
NOISE_STATE_FILE = "gradient_noise.json"


class LegwCallback(TrainerCallback):
    """Checks the LEGW plan against the real run, logs it once, and adds the LEGW scale to the logs.

    On train begin: the scheduler must be a :class:`LegwScheduler` whose plan matches Trainer's global
    batch, steps per epoch and total steps (else ``ValueError`` before the first step). Each log gets
    ``legw_k`` (batch ÷ base batch) and ``legw_lr_scale`` (logged LR ÷ base LR) (with a batch ramp also
    ``legw_batch``, the logged update's batch, and ``state.epoch`` reads the samples taken ÷ dataset size), and with
    :class:`~legw_hf.Lamb` or :class:`~legw_hf.Lars` the last step's trust ratios
    (``trust_ratio/min|median|max``; per parameter with ``--legw_trust_log per_layer``).

    With fp16 loss scaling it also marks GradScaler-skipped steps that accelerate reports as applied (fused
    AdamW, see :class:`~legw_hf.scheduler.SkippedStepDetector`), so Trainer does not step the
    scheduler — any scheduler — through an overflow. Under a batch ramp it then moves the plan past the skipped
    update itself: that update took its samples, and a ramp's plan follows the data.

    With an automatic ramp (``--legw_batch_ramp auto``) Trainer's ``max_steps`` is the plan's updates, followed as
    the plan grows (and the progress bar with it), each new plan is added to ``legw_plan.json``, and the decision
    log starts at train begin with the decisions the run already holds (none, or a checkpoint's).
    """

    def __init__(self) -> None:
        self.plan: LegwPlan | RampedPlan | None = None
        #: The run's gradient noise statistics (--legw_adascale); LegwTrainer sets it.
        self.noise: GradientNoise | None = None
        #: Whether the trainer plans with a config given in code (``LegwTrainer(legw_config=...)``) rather than the
        #: ``--legw_*`` fields; LegwTrainer sets it.
        self.config_from_code = False
        #: The trainer's callbacks, whose progress bar follows an automatic ramp's length; LegwTrainer sets it.
        self.trainer_callbacks: list[TrainerCallback] = []
        self._skips = SkippedStepDetector(None)
        self._warned_about_batch = False

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._skips.step_was_skipped() and not getattr(optimizer, "step_was_skipped", True):
            optimizer._is_overflow = True  # what accelerate's AcceleratedOptimizer reads back

    def on_train_begin(self, args, state, control, lr_scheduler=None, train_dataloader=None, optimizer=None, **kwargs):
        self._skips = SkippedStepDetector(getattr(optimizer, "scaler", None))
        # Under DeepSpeed, learn its partitions now: a setting that would make trust ratios wrong fails here.
        deepspeed_layouts.attach(optimizer)
        if not (self.config_from_code or (isinstance(args, LegwArguments) and args.legw_enabled)):
            return
        automatic = lr_scheduler if isinstance(lr_scheduler, AcceleratorAutoRamp) else None
        lr_scheduler = unwrap_scheduler(lr_scheduler)
        if isinstance(lr_scheduler, AdaScaleScheduler):
            logger.info(
                "AdaScale (%s, S = %g): LR = gain%s x the base run's schedule at progress tau; the run ends at "
                "tau = %g base-run updates. Base run: %s",
                args.legw_adascale,
                lr_scheduler.noise.scale,
                "" if lr_scheduler.power == 1 else f"^{lr_scheduler.power:g}",
                lr_scheduler.total_progress,
                lr_scheduler.schedule_description,
            )
            if lr_scheduler.resume_note is not None:
                logger.warning(lr_scheduler.resume_note)
            return
        if not isinstance(lr_scheduler, LegwScheduler):
            raise ValueError(
                f"LEGW arguments are set but Trainer's LR scheduler is {type(lr_scheduler).__name__}: use "
                "legw_hf.LegwTrainer, or pass legw_hf.get_scheduler('legw', ...) in Trainer(optimizers=...)"
            )
        plan = lr_scheduler.plan
        if automatic is not None:
            _start_auto_ramp(automatic, state)
        if isinstance(plan, RampedPlan):
            _check_ramp_matches_run(plan, args, state)
        else:
            _check_plan_matches_run(plan, args, state, train_dataloader)
        self.plan = plan
        # Every process logs at its own level, as Trainer does: by default only the main process shows it.
        logger.info(plan.describe())
        if lr_scheduler.resume_note is not None:
            logger.warning(lr_scheduler.resume_note)
        if state.is_world_process_zero:
            path = record_plan(
                args.output_dir,
                plan,
                from_update=lr_scheduler.updates,
                checkpoint_plan=lr_scheduler.checkpoint_plan,
            )
            logger.info("LEGW plan recorded in %s", path)

    def on_log(self, args, state, control, logs=None, lr_scheduler=None, optimizer=None, **kwargs):
        if logs is None or "learning_rate" not in logs:  # evaluation and end-of-training logs
            return
        extra: dict[str, float] = {}
        noise = self.noise if self.noise is not None else getattr(lr_scheduler, "noise", None)  # an automatic ramp's
        lr_scheduler = unwrap_scheduler(lr_scheduler)
        if isinstance(lr_scheduler, LegwScheduler) and isinstance(lr_scheduler.plan, RampedPlan):
            plan = lr_scheduler.plan
            batch = plan.batch_for_update(max(state.global_step - 1, 0))  # the update whose LR is logged
            base = plan.plans[0].base_batch_size
            extra.update(legw_batch=batch, legw_k=batch / base, legw_lr_scale=logs["learning_rate"] / plan.base_lr)
        elif isinstance(lr_scheduler, LegwScheduler):
            plan = lr_scheduler.plan
            extra.update(legw_k=plan.k, legw_lr_scale=logs["learning_rate"] / plan.base_lr)
        if isinstance(lr_scheduler, AdaScaleScheduler):
            extra["adascale/progress"] = lr_scheduler.progress
        if noise is not None:
            extra.update(noise.summary())
            warning = None if self._warned_about_batch else noise.batch_warning()
            if warning is not None:
                self._warned_about_batch = True
                logger.warning("%s", warning)
        trust_log = getattr(args, "legw_trust_log", "summary")
        inner = layerwise_optimizer_of(optimizer)  # behind accelerate's and DeepSpeed's wrappers
        if trust_log != "off" and inner is not None:
            extra.update(inner.trust_summary(per_parameter=trust_log == "per_layer"))
        logs.update(extra)
        # Trainer appended a copy of these logs to log_history just before calling us.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        outer, lr_scheduler = lr_scheduler, unwrap_scheduler(lr_scheduler)
        if isinstance(lr_scheduler, LegwScheduler) and isinstance(lr_scheduler.plan, RampedPlan):
            if lr_scheduler.updates < state.global_step:
                # Trainer steps its scheduler after applied updates only; this one was skipped but took its samples.
                # (An automatic ramp tells the skip from the loss scale itself, and shows it no statistics.)
                (outer if isinstance(outer, AcceleratorAutoRamp) else lr_scheduler).step()
            if lr_scheduler.plan is not self.plan:
                self._follow_new_stage(lr_scheduler.plan, args, state)
            _follow_data_epochs(lr_scheduler.plan, args, state, control)
        if isinstance(lr_scheduler, AdaScaleScheduler) and lr_scheduler.finished:
            control.should_training_stop = True

    def _follow_new_stage(self, plan: RampedPlan, args: Any, state: Any) -> None:
        """An automatic ramp doubled the batch from the next update on: the run's length is the new plan's."""
        self.plan = plan
        _follow_ramp_length(plan, state, self.trainer_callbacks)
        if state.is_world_process_zero:
            record_plan(args.output_dir, plan, from_update=state.global_step)

    def on_save(self, args, state, control, **kwargs):
        if self.noise is None or not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if checkpoint.is_dir():  # the statistics are the same on every process
            write_json(checkpoint / NOISE_STATE_FILE, self.noise.state_dict())


def unwrap_scheduler(scheduler: Any) -> Any:
    """The scheduler inside accelerate's ``AcceleratedScheduler`` (which DeepSpeed runs get), or itself."""
    while not isinstance(scheduler, LegwScheduler) and hasattr(scheduler, "scheduler"):
        scheduler = scheduler.scheduler
    return scheduler


def _start_auto_ramp(ramp: AcceleratorAutoRamp, state: Any) -> None:
    """Trainer's ``max_steps`` (from the first plan, the most updates the run can take) becomes the plan's: a resumed
    run's stages decided so far count. The main process starts the decision log with the decisions the run holds."""
    state.max_steps = ramp.plan.total_steps
    path = ramp.controller.settings.log
    if path is not None and state.is_world_process_zero:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_decisions(path, ramp.decisions)


def _follow_ramp_length(plan: RampedPlan, state: Any, callbacks: list[TrainerCallback]) -> None:
    """Trainer stops (and saves, evaluates at the end) once ``global_step`` reaches ``max_steps``: the plan's updates.
    A progress bar already shown gets the new total."""
    state.max_steps = plan.total_steps
    for callback in callbacks:
        bar = getattr(callback, "training_bar", None) if isinstance(callback, ProgressCallback) else None
        if bar is not None:
            bar.total = plan.total_steps
            bar.refresh()


def _follow_data_epochs(plan: RampedPlan, args: Any, state: Any, control: Any) -> None:
    """Trainer sees one epoch of the whole ramp: ``state.epoch`` is set to the data's (samples taken ÷ dataset size),
    and an update in which a data epoch ends gets what Trainer does at an epoch end (``*_strategy="epoch"``: log,
    evaluate, save). The last update's is Trainer's own epoch end."""
    done = plan.samples_before(state.global_step)
    state.epoch = done / plan.dataset_size
    before = plan.samples_before(state.global_step - 1)
    if done // plan.dataset_size > before // plan.dataset_size and state.global_step < state.max_steps:
        DefaultFlowCallback().on_epoch_end(args, state, control)


def _check_ramp_matches_run(plan: RampedPlan, args: LegwArguments, state: Any) -> None:
    micro_step = args.train_batch_size * args.world_size
    mismatches = []
    if plan.micro_step_samples != micro_step:
        mismatches.append(f"micro-batch step {plan.micro_step_samples} vs Trainer's {micro_step}")
    if plan.total_steps != state.max_steps:
        mismatches.append(f"total steps {plan.total_steps} vs Trainer's {state.max_steps}")
    if mismatches:
        raise ValueError("The LEGW batch ramp does not match this run: " + "; ".join(mismatches))


def _check_plan_matches_run(plan: LegwPlan, args: LegwArguments, state: Any, train_dataloader: Any) -> None:
    # The prepared dataloader knows the batch of all processes; state.train_batch_size is the checkpoint's after
    # a resume, even when the run resumes at another batch.
    loader_batch = getattr(train_dataloader, "total_batch_size", None)
    if loader_batch is not None:
        global_batch = loader_batch * args.gradient_accumulation_steps
    else:
        global_batch = args.legw_global_batch(state.train_batch_size)
    mismatches = []
    if plan.batch_size != global_batch:
        mismatches.append(f"global batch {plan.batch_size} vs Trainer's {global_batch}")
    if args.legw_dataset_size is None and hasattr(train_dataloader, "__len__"):
        steps = -(-len(train_dataloader) // args.gradient_accumulation_steps)
        if plan.steps_per_epoch != max(steps, 1):
            mismatches.append(f"steps per epoch {plan.steps_per_epoch} vs Trainer's {steps}")
    if plan.total_steps != state.max_steps:
        mismatches.append(f"total steps {plan.total_steps} vs Trainer's {state.max_steps}")
    if mismatches:
        raise ValueError("The LEGW plan does not match this run: " + "; ".join(mismatches))
