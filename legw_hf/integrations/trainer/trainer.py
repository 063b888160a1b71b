"""``LegwTrainer``: Trainer whose LR scheduler is the LEGW plan (or AdaScale), with the optimizer, resume and
``num_items_in_batch`` handling that needs."""

from __future__ import annotations

import functools
import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ...adascale import MODES as ADASCALE_MODES, AdaScaleScheduler
from ...errors import SettingError
from ...noise_scale import GradientNoise
from ...optim import Lamb, Lars, decay_param_groups
from ...plan import LegwConfig, LegwPlan
from ...ramp import RampedPlan
from ...scheduler import LegwScheduler, updates_in_new_plan
from ...settings import settings_of
from ..accelerate import AcceleratorAutoRamp, create_auto_ramp, ramp_engine, ramp_micro_batch
from ..adascale import MicroStepProtocol, measure_micro_steps
from ..deepspeed import accumulation as deepspeed_accumulation
from ..deepspeed.checkpoints import reshard_checkpoint
from .arguments import LegwArguments, check_plan_before_training
from .callback import NOISE_STATE_FILE, LegwCallback, unwrap_scheduler
from .flags import TRAINER_SCHEDULE_FLAGS, as_argument_error, changed_fields
from .optimizer import optimizer_cls_and_kwargs
from .ramp import MicroBatches, auto_ramp, check_ramp_resume, plan_of_ramp, ramp_dataloader, ramp_samples
from .resume import checkpoint_scheduler_state

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _RunShape:
    """What Trainer measured about the run (``set_initial_training_values``)."""

    steps_per_epoch: int | None
    dataset_size: int | None


#: The arguments that describe a :class:`~legw_hf.plan.LegwConfig` (base batch, base LR, warmup, rule, decay).
CONFIG_ARGUMENTS = tuple(setting.trainer_argument for setting in settings_of("config", "decay"))


class LegwTrainer(Trainer):
    """``Trainer`` whose LR scheduler is the LEGW plan when ``args.legw_base_batch_size`` is set, or when a config
    is given in code.

    Args:
        legw_config: the :class:`~legw_hf.plan.LegwConfig` to plan with (base batch, base LR, warmup, rule and the
            decay object), instead of the ``--legw_*`` fields of ``args``: a program that holds its schedule as
            data hands it over as it is. ``args`` must then be :class:`LegwArguments` and leave the config's own
            fields at their defaults (``legw_base_batch_size``, the warmup, rule and decay fields, Trainer's
            schedule arguments; ``learning_rate`` unless it equals ``base_lr``), else a :class:`SettingError`
            names them. The run's shape still comes from Trainer: per-device batch × accumulation × processes,
            the dataloader's steps per epoch, ``num_train_epochs`` or ``max_steps``.
        *args, **kwargs: ``Trainer``'s.

    With ``--legw_batch_ramp`` the global batch grows by stages and each update takes LEGW's LR for its own batch
    (:mod:`legw_hf.integrations.trainer.ramp`: each update's micro-batches gathered here as the plan gives them);
    with ``--legw_batch_ramp auto`` the stages are decided during the run from the measured gradient noise scale
    (the scheduler is then an :class:`~legw_hf.integrations.accelerate.AcceleratorAutoRamp`).
    Also builds ``--legw_optimizer`` when given and installs :class:`LegwCallback`. Combine with another
    Trainer subclass by listing it first: ``class MyTrainer(LegwTrainer, Seq2SeqTrainer)``.
    Settings are checked before ``Trainer.__init__`` touches the output directory.
    """

    def __init__(self, *args: Any, legw_config: LegwConfig | None = None, **kwargs: Any) -> None:
        bound = inspect.signature(Trainer.__init__).bind(self, *args, **kwargs).arguments
        training_args = bound.get("args")
        if legw_config is not None:
            refuse_arguments_beside_config(training_args, legw_config)
        self._legw_config_given = legw_config
        if isinstance(training_args, LegwArguments):
            if training_args.legw_enabled or legw_config is not None:
                training_args.check_global_batch()
                check_plan_before_training(training_args, bound.get("train_dataset"), config=legw_config)
            else:
                training_args.refuse_legw_flags_without_plan()
        super().__init__(*args, **kwargs)
        follow_trainer_log_level(self.args)
        if not any(isinstance(cb, LegwCallback) for cb in self.callback_handler.callbacks):
            # First, so reporting integrations and the progress printer see the keys it adds to the logs.
            self.callback_handler.callbacks.insert(0, LegwCallback())
        for callback in self._legw_callbacks():
            callback.config_from_code = legw_config is not None
            callback.trainer_callbacks = self.callback_handler.callbacks
        self._legw_run = _RunShape(None, None)
        self._legw_loss_kwargs_unchecked = True
        #: AdaScale / noise-scale statistics of this run (--legw_adascale, or an automatic batch ramp's), created
        #: with the scheduler.
        self.legw_noise: GradientNoise | None = None
        self._legw_micro_steps: MicroStepProtocol | None = None
        self._legw_resume_checkpoint: str | None = None

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        self._legw_resume_checkpoint = checkpoint or None
        if checkpoint and self.is_deepspeed_enabled:
            ds_config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            reshard_checkpoint(
                checkpoint, ds_config, world_size=self.args.world_size, main_process=self.args.should_save
            )
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            if self._legw_micro_steps is not None:
                self._legw_micro_steps.close()
                self._legw_micro_steps = None

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None):
        if isinstance(inputs, MicroBatches):
            return self._ramped_training_step(model, inputs, num_items_in_batch)
        self._check_loss_kwargs_once(model, inputs, num_items_in_batch)
        if self.legw_noise is None:
            return super().training_step(model, inputs, num_items_in_batch)
        if self._legw_micro_steps is None:
            self._legw_micro_steps = self._measure_micro_steps(model)
        return self._legw_micro_steps.backward(
            functools.partial(super().training_step, model, inputs, num_items_in_batch),
            self._micro_batch_weight(inputs, num_items_in_batch),
            last_micro_batch=self.accelerator.sync_gradients,
        )

    def _measure_micro_steps(self, model: torch.nn.Module) -> MicroStepProtocol:
        """The gradient statistics of every micro-batch: an automatic ramp's own (its update begins once measured),
        else AdaScale's (--legw_adascale)."""
        if isinstance(self.lr_scheduler, AcceleratorAutoRamp):
            return self.lr_scheduler.measure(model)
        return measure_micro_steps(
            self.accelerator,
            model,
            self.optimizer,
            self.legw_noise,
            mode=self.args.legw_adascale,
            begin_update=self._begin_adascale_update,
        )

    def _ramped_training_step(self, model: torch.nn.Module, share: MicroBatches, num_items_in_batch: Any) -> Any:
        """One update of a batch ramp (``--legw_batch_ramp``): Trainer's step on each micro-batch of this process's
        share, gradients reduced on the last only (and ``sync_gradients`` set on it only, as Trainer's own accumulation
        sets it, which tells the gradient statistics where the update ends); a mean loss is averaged over the update's
        micro-batches (a loss normalised by ``num_items_in_batch`` already is: the count is the whole update's). The
        summed loss, as Trainer's accumulation sums it.

        Under DeepSpeed (ZeRO 1-3) the engine's train batch becomes the update's first, and the engine applies the
        update inside the last micro-batch's backward (:mod:`legw_hf.integrations.deepspeed.accumulation`)."""
        self.current_gradient_accumulation_steps = len(share)
        engine = ramp_engine(self.accelerator)
        if engine is not None:
            plan = unwrap_scheduler(self.lr_scheduler).plan
            deepspeed_accumulation.begin_update(engine, plan.batch_for_update(self.state.global_step), len(share))
        total = None
        for position, inputs in enumerate(share):
            last = position == len(share) - 1
            self.accelerator.gradient_state._set_sync_gradients(last)
            with ramp_micro_batch(self.accelerator, model, last=last):
                loss = self.training_step(model, inputs, num_items_in_batch)
            total = loss if total is None else total + loss
        return total

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        """Trainer's; with a batch ramp, the update's share: as many micro-batches as the plan gives the update (read
        now, so an automatic ramp's change applies from the next update on), as one :class:`MicroBatches`, and
        ``num_items_in_batch`` counted by Trainer over all of them (and processes, with
        ``average_tokens_across_devices``)."""
        if not self.legw_ramp:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        plan = unwrap_scheduler(self.lr_scheduler).plan
        accumulation = plan.accumulation_for_update(self.state.global_step)
        micro_batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, accumulation, device)
        return ([MicroBatches(micro_batches)] if micro_batches else []), num_items_in_batch

    def get_resumed_dataloader(self, dataloader: Any, num_batches: int) -> Any:
        """Trainer's; with a batch ramp ``num_batches`` is the updates done, whose micro-batches are skipped."""
        if self.legw_ramp:
            plan = unwrap_scheduler(self.lr_scheduler).plan  # a resumed automatic ramp's: the stages decided so far
            num_batches = plan.samples_before(num_batches) // plan.micro_step_samples
        return super().get_resumed_dataloader(dataloader, num_batches)

    def _begin_adascale_update(self) -> None:
        scheduler = unwrap_scheduler(self.lr_scheduler)
        if isinstance(scheduler, AdaScaleScheduler):
            scheduler.begin_update()

    def _micro_batch_weight(self, inputs: dict[str, Any], num_items_in_batch: Any) -> Any:
        """The weight of this micro-batch's mean gradient in the accumulated gradient, as Trainer forms the loss:
        ``1 / accumulation steps`` for a mean loss, ``its items × processes / the batch's items`` (or without the
        processes, per ``average_tokens_across_devices``) for a loss normalised by ``num_items_in_batch``."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func
        if not scaled or num_items_in_batch is None or "labels" not in inputs:
            return 1.0 / self.current_gradient_accumulation_steps
        labels = inputs.get("shift_labels")
        if labels is None:
            labels = inputs["labels"][..., 1:] if getattr(self, "_loss_shifts_labels", False) else inputs["labels"]
        items = labels.ne(-100).sum().float()
        processes = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        return items.to(self.args.device) * processes / torch.as_tensor(num_items_in_batch, device=self.args.device)

    def _check_loss_kwargs_once(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any) -> None:
        if self._legw_loss_kwargs_unchecked:
            self._legw_loss_kwargs_unchecked = False
            if (
                self.model_accepts_loss_kwargs
                and num_items_in_batch is not None
                and self.compute_loss_func is None
                and self.label_smoother is None
                and getattr(self, "loss_is_scaled_for_ga", None) is None
            ):
                self._check_model_uses_num_items(model, inputs, num_items_in_batch)

    def _check_model_uses_num_items(self, model: torch.nn.Module, inputs: dict[str, Any], num_items: Any) -> None:
        """Whether the model's loss really is normalised by ``num_items_in_batch``; if not, Trainer must average.

        Trainer passes ``num_items_in_batch`` to every model whose ``forward`` takes ``**kwargs`` and then skips
        its own division by the accumulation steps (and multiplies by the processes), trusting the model to
        normalise. Models such as ``BertForMaskedLM`` take ``**kwargs`` yet average their loss themselves, so the
        gradients come out ``gradient_accumulation_steps`` (× processes) times too large. The test: one forward
        of the first micro-batch with the item count doubled, in eval mode and without touching the RNG. A loss
        that does not change at all ignores the count; one that changes uses it.
        """
        inputs = self._prepare_inputs(inputs)
        was_training = model.training
        model.eval()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices), self.compute_loss_context_manager():
                losses = [_loss_of(model(**inputs, num_items_in_batch=n)) for n in (num_items, 2 * num_items)]
        finally:
            model.train(was_training)
        if any(loss is None for loss in losses):
            return
        single, double = (loss.detach().float() for loss in losses)
        if bool(torch.isfinite(single)) and bool(single != 0) and bool(torch.isclose(single, double, rtol=1e-5)):
            name = type(self.accelerator.unwrap_model(model)).__name__
            logger.warning(
                "%s.forward takes **kwargs, but its loss does not depend on num_items_in_batch: Trainer would skip "
                "its division by gradient_accumulation_steps and the gradients would be %d times too large. "
                "legw_hf lets Trainer average the micro-batch losses instead (as model.accepts_loss_kwargs = False "
                "would).",
                name,
                # the update's accumulation: Trainer's, or with a batch ramp the first stage's
                self.current_gradient_accumulation_steps
                * (self.accelerator.num_processes if self.args.average_tokens_across_devices else 1),
            )
            self.model_accepts_loss_kwargs = False

    @property
    def legw_enabled(self) -> bool:
        return self._legw_config_given is not None or (isinstance(self.args, LegwArguments) and self.args.legw_enabled)

    @property
    def legw_config(self) -> LegwConfig | None:
        """The config this trainer plans with: the one given in code, else the ``--legw_*`` fields' (None with LEGW
        off)."""
        if self._legw_config_given is not None:
            return self._legw_config_given
        return self.args.legw_config() if self.legw_enabled else None

    @property
    def legw_ramp(self) -> bool:
        """Whether this run follows a batch ramp (``--legw_batch_ramp`` with LEGW on)."""
        return self.legw_enabled and getattr(self.args, "legw_batch_ramp", None) is not None

    def legw_ramped_plan(self) -> RampedPlan:
        """The batch ramp's plan for this run: the ramp over ``num_train_epochs`` of the train dataset."""
        return plan_of_ramp(self.args, self.train_dataset, config=self._legw_config_given)

    def get_train_dataloader(self) -> Any:
        """Trainer's, or with a batch ramp the run's samples in micro-batches of ``per_device_train_batch_size``
        (:func:`~legw_hf.integrations.trainer.ramp.ramp_dataloader`), which :meth:`get_batch_samples` gathers into
        updates."""
        if not self.legw_ramp:
            return super().get_train_dataloader()
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        return ramp_dataloader(self, ramp_samples(self.legw_ramped_plan(), auto_ramp(self.args)))

    def _legw_callbacks(self) -> list[LegwCallback]:
        return [callback for callback in self.callback_handler.callbacks if isinstance(callback, LegwCallback)]

    def set_initial_training_values(self, args: TrainingArguments, dataloader: Any) -> tuple:
        values = super().set_initial_training_values(args, dataloader)
        sized = hasattr(dataloader, "__len__")
        self._legw_run = _RunShape(values[1] if sized else None, values[2] if sized else None)
        if not self.legw_enabled:
            return values
        if self.legw_ramp:
            # One epoch of one batch per update; the samples are the ramp's. An automatic ramp's first plan has the
            # most updates the run can take (a doubling only shortens it): LegwCallback follows it as it grows.
            plan = self.legw_ramped_plan()
            steps = plan.total_steps
            return (1, steps, values[2], plan.samples_before(steps), values[4], steps, steps)
        if self.args.legw_adascale_lr:
            # The run is as long as it takes τ to reach the base run's length: at most that many updates (r >= 1).
            return _with_total_steps(values, self.adascale_base_plan().total_steps)
        if self.args.legw_base_steps is not None and self.args.max_steps <= 0:
            # The length is the base run's steps: Trainer runs as many updates as the plan counts at this batch.
            return _with_total_steps(values, self.legw_plan(None).total_steps)
        return values

    def adascale_base_plan(self) -> LegwPlan:
        """The base run AdaScale follows: the schedule flags at --legw_base_batch_size for --num_train_epochs."""
        dataset_size = self.args.legw_dataset_size or self._legw_run.dataset_size
        if dataset_size is None:
            raise SettingError(
                "legw_dataset_size", "is required when the train dataset has no length (AdaScale counts epochs)", None
            )
        return self.args.legw_adascale_base_plan(dataset_size)

    def _init_training_state(
        self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
    ) -> tuple[int, int]:
        """Trainer's progress on resume, in this run's steps when the checkpoint's plan counted others.

        Trainer restores ``global_step`` as it was saved and reads it in the new run's steps per epoch: resumed at
        another global batch (another world size, say) it would skip the wrong part of the data, stop after the
        wrong number of updates, and disagree with the LEGW scheduler, which carries progress over in epochs. The
        step count is converted the scheduler's way, so the two agree.
        """
        epochs_trained, steps_trained = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        resumed = self.legw_enabled and resume_from_checkpoint
        state = checkpoint_scheduler_state(resume_from_checkpoint) if resumed else None
        saved = state and state.get("plan")
        check_ramp_resume(
            saved,
            self.legw_ramped_plan() if self.legw_ramp else None,
            auto_ramp(self.args),
            decided=bool(state and "auto_ramp" in state),
        )
        if saved is None or self.legw_ramp:
            # A ramp's update n is the same samples at any world size: Trainer's step is the ramp's.
            return epochs_trained, steps_trained
        saved_step = self.state.global_step
        step = updates_in_new_plan(saved_step, saved, num_update_steps_per_epoch)
        if step == saved_step:
            return epochs_trained, steps_trained
        logger.warning(
            "Resuming at another global batch (%d, was %d): Trainer's step %d of %d per epoch becomes step %d of %d "
            "per epoch (epoch %g), and the LEGW plan is re-derived for the new batch.",
            self.args.legw_global_batch(self._train_batch_size),
            saved.get("batch_size"),
            saved_step,
            saved["steps_per_epoch"],
            step,
            num_update_steps_per_epoch,
            saved_step / saved["steps_per_epoch"],
        )
        self.state.global_step = step
        epochs_trained = step // num_update_steps_per_epoch
        if self.args.ignore_data_skip:
            return epochs_trained, 0
        return epochs_trained, step % num_update_steps_per_epoch * self.args.gradient_accumulation_steps

    def legw_plan(self, num_training_steps: int | None) -> LegwPlan:
        """The plan for this run, from Trainer's global batch and dataloader; ``num_training_steps`` is Trainer's
        step count, checked against the plan (None: the plan sets it, --legw_base_steps)."""
        global_batch = self.args.legw_global_batch(self._train_batch_size)
        expected = self.args.legw_global_batch_size
        if expected is not None and global_batch != expected:
            logger.warning(
                "Global batch is %d, not legw_global_batch_size=%d (auto_find_batch_size shrank it); "
                "LEGW re-plans for %d.",
                global_batch,
                expected,
                global_batch,
            )
        plan = self.args.legw_plan(
            global_batch=global_batch,
            dataset_size=self._legw_run.dataset_size,
            steps_per_epoch=self._legw_run.steps_per_epoch,
            max_steps=num_training_steps,
            config=self._legw_config_given,
        )
        if num_training_steps is not None and plan.total_steps != num_training_steps:
            raise SettingError(
                "max_steps", f"disagrees with the LEGW plan's {plan.total_steps} steps", num_training_steps
            )
        return plan

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        if self.lr_scheduler is None and isinstance(self.args, LegwArguments) and self.args.legw_adascale:
            self._start_gradient_noise()
        if self.legw_enabled and self.args.legw_adascale_lr:
            if self.lr_scheduler is None:
                plan = self.adascale_base_plan()
                self.lr_scheduler = AdaScaleScheduler(
                    optimizer or self.optimizer,
                    plan,
                    self.legw_noise,
                    total_progress=plan.total_steps,
                    power=ADASCALE_MODES[self.args.legw_adascale],
                )
                self._created_lr_scheduler = True
            return self.lr_scheduler
        if not self.legw_enabled:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            automatic = auto_ramp(self.args) if self.legw_ramp else None
            if automatic is not None:
                self.lr_scheduler = self._create_auto_ramp(automatic, optimizer or self.optimizer)
            else:
                # (a ramp's total steps are checked against Trainer's by LegwCallback at train begin)
                plan = self.legw_ramped_plan() if self.legw_ramp else self.legw_plan(num_training_steps)
                self.lr_scheduler = LegwScheduler(optimizer or self.optimizer, plan)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _create_auto_ramp(self, settings: Any, optimizer: torch.optim.Optimizer) -> AcceleratorAutoRamp:
        """The scheduler of ``--legw_batch_ramp auto``; its moving averages are this run's :attr:`legw_noise` (and
        in the logs)."""
        try:
            scheduler = create_auto_ramp(
                self.accelerator,
                optimizer,
                self.legw_config,
                settings,
                self.args.train_batch_size * self.args.world_size,
                len(self.train_dataset),
                self.args.num_train_epochs,
            )
        except SettingError as error:
            raise as_argument_error(error) from None
        self.legw_noise = scheduler.noise
        return scheduler

    def _start_gradient_noise(self) -> None:
        """The run's :class:`GradientNoise`, restored from the checkpoint being resumed when it has one."""
        args = self.args
        noise = GradientNoise(
            micro_batch=self._train_batch_size,
            base_batch=self.legw_config.base_batch_size if self.legw_enabled else self._train_batch_size,
            global_batch=args.legw_global_batch(self._train_batch_size),
        )
        if self._legw_resume_checkpoint:
            path = Path(self._legw_resume_checkpoint) / NOISE_STATE_FILE
            if path.is_file():
                noise.load_state_dict(json.loads(path.read_text()))
            else:
                logger.warning(
                    "The checkpoint %s has no gradient noise state (%s): the --legw_adascale statistics are estimated "
                    "afresh from the next update.",
                    self._legw_resume_checkpoint,
                    NOISE_STATE_FILE,
                )
        self.legw_noise = noise
        for callback in self._legw_callbacks():
            callback.noise = noise

    @staticmethod
    def get_optimizer_cls_and_kwargs(args: TrainingArguments, model: Any = None) -> tuple[Any, dict[str, Any]]:
        if getattr(args, "legw_optimizer", None) is None:
            return Trainer.get_optimizer_cls_and_kwargs(args, model)
        cls, kwargs = optimizer_cls_and_kwargs(args)
        if cls in (Lamb, Lars) and model is not None:
            # Trainer's decay / no-decay split, with parameter names for the per-layer trust-ratio logs.
            kwargs["params"] = decay_param_groups(model, args.weight_decay)
        return cls, kwargs


def _with_total_steps(values: tuple, total_steps: int) -> tuple:
    """Trainer's ``set_initial_training_values`` result for a run of ``total_steps`` updates."""
    _, steps_per_epoch, examples, _, total_batch, steps_in_epoch, _ = values
    return (
        -(-total_steps // steps_per_epoch),
        steps_per_epoch,
        examples,
        total_steps * total_batch,
        total_batch,
        steps_in_epoch,
        total_steps,
    )


def refuse_arguments_beside_config(args: Any, config: LegwConfig) -> None:
    """``LegwTrainer(legw_config=...)``: the config is the plan's only source, so the arguments may not describe
    another one (:data:`CONFIG_ARGUMENTS` changed, ``learning_rate`` other than ``config.base_lr``) nor Trainer's own
    schedule, which the plan replaces."""
    if not isinstance(args, LegwArguments):
        raise SettingError(
            "legw_config",
            "needs arguments with the LEGW fields (legw_hf.LegwTrainingArguments, or a class with LegwArguments "
            "mixed in): LegwTrainer reads the run's global batch and length from them",
            type(args).__name__,
        )
    if not isinstance(config, LegwConfig):
        raise SettingError("legw_config", "must be a legw_hf.plan.LegwConfig", config)
    conflicts = [
        name
        for name in changed_fields(args, (*CONFIG_ARGUMENTS, *TRAINER_SCHEDULE_FLAGS))
        if name != "learning_rate" or args.learning_rate != config.base_lr
    ]
    if conflicts:
        name = conflicts[0]
        raise SettingError(
            name,
            "must keep its default when LegwTrainer is given legw_config=: that config is the plan's only source "
            f"(base batch {config.base_batch_size}, base LR {config.base_lr:g}, its warmup, rule and decay); "
            "drop the plan from the arguments or do not pass legw_config",
            getattr(getattr(args, name), "value", getattr(args, name)),
            detail=f"set beside the config: {', '.join(conflicts)}",
        )


def _loss_of(outputs: Any) -> torch.Tensor | None:
    return outputs.get("loss") if isinstance(outputs, dict) else outputs[0]


def follow_trainer_log_level(args: TrainingArguments) -> None:
    """Make legw_hf's messages follow ``--log_level`` / ``--log_level_replica`` as Trainer's own do.

    Trainer sets the ``transformers`` logger to ``args.get_process_log_level()``; upstream example scripts leave
    the root logger at WARNING (``basicConfig()`` with no level), where legw_hf's INFO lines (the plan) would
    vanish. The ``legw_hf`` logger gets the same level; where nothing would print its records (no handler on it
    or the root), it gets a stderr handler like the one ``transformers`` uses.
    """
    package_logger = logging.getLogger("legw_hf")
    package_logger.setLevel(args.get_process_log_level())
    if not package_logger.hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(levelname)s|%(name)s] %(message)s"))
        package_logger.addHandler(handler)
