"""The LEGW argument fields (``--legw_*`` flags) and the checks that run when the arguments are built."""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, make_dataclass
from typing import Any, ClassVar

import torch
from transformers import TrainingArguments

from ...adascale import MODES as ADASCALE_MODES
from ...errors import SettingError
from ...noise_scale import check_scale
from ...plan import LegwConfig, LegwPlan, epoch_steps
from ...schedules import DECAY_OPTIONS, make_decay
from ...settings import SETTINGS, trainer_argument
from .. import deepspeed as deepspeed_config
from .flags import PLAN_FLAGS, RUN_FLAGS, TRAINER_SCHEDULE_FLAGS, as_argument_error, changed_fields, legw_fields
from .optimizer import adam_family, probe_optimizer
from .ramp import check_ramp_accelerator, check_ramp_arguments, plan_of_ramp

logger = logging.getLogger(__name__)


#: The ``--legw_*`` fields, generated from :data:`legw_hf.settings.SETTINGS`.
_LegwFields = make_dataclass("_LegwFields", legw_fields())


@dataclass
class LegwArguments(_LegwFields):
    """LEGW fields for any ``TrainingArguments`` class; they become ``--legw_*`` flags in ``HfArgumentParser``.

    Mix into another arguments class with ``@dataclass class MyArgs(LegwArguments, Seq2SeqTrainingArguments)``.
    LEGW is on when ``legw_base_batch_size`` is set; ``learning_rate`` is then the base peak LR. The fields are
    declared once, in :mod:`legw_hf.settings` (each setting's ``legw_<name>`` spelling, help and type).
    """

    def __post_init__(self) -> None:
        if self.deepspeed:
            deepspeed_config.require_deepspeed("deepspeed", self.deepspeed)
        self._warn_deprecated_flags()
        self._refuse_ignored_settings()
        check_ramp_arguments(self)
        self._check_adascale_settings()
        self._legw_clipping_off = None
        if self.legw_optimizer is not None:
            probe = probe_optimizer(self)
            self._settle_clipping(probe)
            self._warn_without_trust_ratio(probe)
        super().__post_init__()
        check_ramp_accelerator(self)
        self._check_deepspeed_blocks()
        if self._legw_clipping_off is not None:
            self._settle_deepspeed_clipping()
        if self.legw_enabled:
            self.legw_config()
            self.check_global_batch()
        if self.legw_adascale is not None:
            self._check_adascale_run()

    @property
    def legw_adascale_lr(self) -> bool:
        """Whether AdaScale sets the LR (``gain`` / ``sqrt_gain``), not only measures."""
        return self.legw_adascale is not None and ADASCALE_MODES[self.legw_adascale] is not None

    #: Why this arguments class does not offer --legw_adascale (None: it does).
    legw_adascale_refused: ClassVar[str | None] = None

    def _check_adascale_settings(self) -> None:
        """What must hold before TrainingArguments.__post_init__ (no FSDP, one schedule rule, ...)."""
        if self.legw_adascale is not None and self.legw_adascale_refused:
            raise SettingError("legw_adascale", self.legw_adascale_refused, self.legw_adascale)
        if self.legw_adascale is None:
            refuse_scale_without_gain(self.legw_adascale_scale)
            return
        mode = f"--legw_adascale {self.legw_adascale}"
        if self.deepspeed:
            self._check_adascale_under_deepspeed()
        if self.fsdp or self.fsdp_config:
            raise SettingError(
                "legw_adascale",
                "is not supported under FSDP: gradients are reduce-scattered before a hook on the sharded parameters "
                "sees them (run it with DDP)",
                self.legw_adascale,
            )
        if not self.legw_adascale_lr:
            refuse_scale_without_gain(self.legw_adascale_scale)
            return
        if not self.legw_enabled:
            raise SettingError(
                "legw_base_batch_size",
                f"is required by {mode}: the global batch the schedule (--learning_rate, --legw_base_warmup_*, "
                "--legw_decay) was tuned at, AdaScale's S = 1 run",
                None,
            )
        if self.legw_rule not in (None, "none"):
            raise SettingError(
                "legw_rule",
                f"must be left unset (or 'none') with {mode}: AdaScale replaces the LEGW scaling rule, choose one",
                self.legw_rule,
            )
        if self.max_steps > 0:
            raise SettingError(
                "max_steps",
                f"must be left unset with {mode}: the run ends when its progress reaches the base run's length, "
                "--num_train_epochs at --legw_base_batch_size",
                self.max_steps,
            )
        if self.legw_adascale == "sqrt_gain" and not adam_family(self):
            raise SettingError(
                "legw_adascale",
                "sqrt_gain is for Adam-family optimizers (--legw_optimizer lamb or adamw, or an adamw --optim); use "
                "gain with SGD or LARS",
                self.legw_adascale,
            )

    def _check_adascale_under_deepspeed(self, estimates: int | None = None) -> None:
        """Under DeepSpeed the applied gradient's norm is DeepSpeed's own (its partitions hold the gradient): no
        preconditioned norms, no previous gradient to difference one estimate per update with (``estimates``, once
        the processes are known), and DeepSpeed's fp16 loss scale may change inside the step that is measured."""
        config = deepspeed_config.user_config(self.deepspeed)
        refusal = deepspeed_config.adascale_refusal(config, self.legw_adascale, fp16=self.fp16, estimates=estimates)
        if refusal is not None:
            raise SettingError("legw_adascale", refusal, self.legw_adascale)

    def _check_adascale_run(self) -> None:
        """S = global batch / base batch >= 1, and equal to --legw_adascale_scale when given; under DeepSpeed at least
        2 gradient estimates per update."""
        global_batch = self.legw_global_batch()
        base = self.legw_base_batch_size if self.legw_enabled else self.train_batch_size
        try:
            check_scale(
                self.legw_adascale_scale, global_batch=global_batch, base_batch=base, field_name="legw_adascale_scale"
            )
        except SettingError as error:
            raise as_argument_error(error) from None
        if self.deepspeed:
            self._check_adascale_under_deepspeed(estimates=global_batch // self.train_batch_size)

    def _warn_deprecated_flags(self) -> None:
        """A FutureWarning (shown by default, as transformers warns of its own deprecated arguments) for every
        deprecated ``--legw_*`` flag that was set."""
        for setting in SETTINGS:
            if setting.deprecated and setting.declared_by_legw and changed_fields(self, (setting.trainer_argument,)):
                warnings.warn(
                    f"--{setting.trainer_argument} is deprecated and goes in the next release: {setting.deprecated}",
                    FutureWarning,
                    stacklevel=3,
                )

    def _refuse_ignored_settings(self) -> None:
        """Settings that would be silently ignored are errors: LEGW flags with LEGW off, and Trainer's own
        schedule arguments with LEGW on (the LEGW plan replaces that schedule)."""
        if self.legw_base_steps is not None:
            for name in changed_fields(self, ("max_steps", "num_train_epochs")):
                raise SettingError(
                    name,
                    "must keep its default with --legw_base_steps, which sets the run's length (the base run's steps "
                    "at the base batch, the same epochs at every batch); give one length",
                    getattr(self, name),
                )
        if not self.legw_enabled:
            self.refuse_legw_flags_without_plan(PLAN_FLAGS)
            return
        for name in changed_fields(self, tuple(TRAINER_SCHEDULE_FLAGS)):
            raise SettingError(
                name,
                f"must keep its default with LEGW on (--legw_base_batch_size): the LEGW plan replaces Trainer's "
                f"schedule; use {TRAINER_SCHEDULE_FLAGS[name]} instead",
                getattr(getattr(self, name), "value", getattr(self, name)),
            )

    def refuse_legw_flags_without_plan(self, flags: tuple[str, ...] = RUN_FLAGS) -> None:
        """With LEGW off (no --legw_base_batch_size, no config given in code), ``flags`` that were set would be
        ignored: refuse them. The run-shape flags are checked by :class:`LegwTrainer`, which knows whether it was
        given ``legw_config``."""
        orphans = changed_fields(self, flags)
        if orphans:
            raise SettingError(
                "legw_base_batch_size",
                f"is required by {', '.join('--' + flag for flag in orphans)}: without it LEGW is off and "
                "Trainer's own schedule would run; give the global batch --learning_rate was tuned at (or hand "
                "LegwTrainer a legw_config)",
                None,
            )

    @property
    def _deepspeed_config(self) -> dict[str, Any] | None:
        """The parsed ``--deepspeed`` config, the dict DeepSpeed will be handed; None without DeepSpeed."""
        return getattr(getattr(self, "hf_deepspeed_config", None), "config", None)

    def _check_deepspeed_blocks(self) -> None:
        """A DeepSpeed config's own ``"scheduler"`` and ``"optimizer"`` blocks beside LEGW and --legw_optimizer, and
        an optimizer offload that would swap --legw_optimizer's optimizer for DeepSpeedCPUAdam."""
        ds_config = self._deepspeed_config
        if not ds_config:
            return
        warning = deepspeed_config.check_config_blocks(
            ds_config,
            legw=self.legw_enabled,
            client_optimizer=None if self.legw_optimizer is None else f"--legw_optimizer {self.legw_optimizer}",
        )
        if warning:
            logger.warning("%s", warning)
        if self.legw_optimizer is not None and deepspeed_config.keep_client_optimizer_under_offload(ds_config):
            logger.warning(
                "The DeepSpeed config offloads the optimizer to the CPU: zero_force_ds_cpu_optimizer is set to false "
                "so --legw_optimizer %s runs there (otherwise accelerate would replace it by DeepSpeedCPUAdam).",
                self.legw_optimizer,
            )

    def _warn_without_trust_ratio(self, optimizer: torch.optim.Optimizer) -> None:
        """A LAMB that adapts only decayed tensors (apex's ``use_nvlamb=False``: the ``nvidia`` and ``paper``
        presets) gives no tensor a trust ratio when nothing is decayed: it is then Adam with pre-normalisation."""
        group = optimizer.param_groups[0]
        if group.get("adapt") == "decayed" and "layer_adaptation" not in group and self.weight_decay == 0:
            logger.warning(
                "--legw_optimizer %s with preset %r gives a trust ratio only to tensors with weight decay (apex's "
                "use_nvlamb=False), and --weight_decay is 0: no tensor gets one, so LAMB runs as Adam with "
                "global-norm pre-normalisation and the trust_ratio/* logs are absent. NVIDIA's BERT recipe uses "
                "--weight_decay 0.01; --legw_adapt all gives every tensor one.",
                self.legw_optimizer,
                getattr(optimizer, "preset", None) or self.legw_optimizer_preset,
            )

    def _settle_clipping(self, optimizer: torch.optim.Optimizer) -> None:
        # Before TrainingArguments.__post_init__, which copies max_grad_norm into DeepSpeed's "auto" clipping.
        pre_normalisation = getattr(optimizer, "max_grad_norm", None)
        if pre_normalisation is not None and self.max_grad_norm > 0:
            # Expected with Trainer's default max_grad_norm; worth a warning only when the user chose a value.
            chosen = self.max_grad_norm != type(self).__dataclass_fields__["max_grad_norm"].default
            logger.log(
                logging.WARNING if chosen else logging.INFO,
                "LAMB pre-normalises gradients by their global norm (max norm %g); Trainer's own clipping "
                "(max_grad_norm=%g) is turned off so gradients are not clipped twice.",
                pre_normalisation,
                self.max_grad_norm,
            )
            self._legw_clipping_off = (self.max_grad_norm, pre_normalisation)
            self.max_grad_norm = 0.0

    def _settle_deepspeed_clipping(self) -> None:
        """DeepSpeed clips in its engine too: a number in the config would clip a second time (and Trainer would
        later report it as a mismatch with the max_grad_norm=0 set here), and no entry means DeepSpeed's default
        of 1.0. Refuse the first now, saying why; set the second to 0, saying so."""
        ds_config = self._deepspeed_config
        if ds_config is None:
            return
        trainer_norm, lamb_norm = self._legw_clipping_off
        note = deepspeed_config.clip_once(
            ds_config.get("gradient_clipping"),
            lamb_norm,
            lamb=f"--legw_optimizer {self.legw_optimizer}",
            because=f", so legw_hf turned Trainer's max_grad_norm ({trainer_norm:g}) off to clip once",
            lamb_off="--legw_lamb_max_grad_norm 0",
        )
        if note:
            logger.warning("%s", note)
            ds_config["gradient_clipping"] = 0.0

    @property
    def legw_enabled(self) -> bool:
        return self.legw_base_batch_size is not None

    def legw_config(self) -> LegwConfig:
        """The :class:`~legw_hf.plan.LegwConfig` these arguments describe."""
        try:
            decay = make_decay(
                self.legw_decay,
                **{option: getattr(self, trainer_argument(option)) for option in DECAY_OPTIONS},
            )
            return LegwConfig(
                base_batch_size=self.legw_base_batch_size,
                base_lr=self.learning_rate,
                base_warmup_epochs=self.legw_base_warmup_epochs,
                base_warmup_steps=self.legw_base_warmup_steps,
                rule=self.legw_rule or "legw",
                decay=decay,
            )
        except SettingError as error:
            raise as_argument_error(error) from None

    def legw_global_batch(self, per_device_batch_size: int | None = None) -> int:
        """Samples per optimizer update across all processes, as Trainer forms them.

        ``per_device_train_batch_size`` × ``gradient_accumulation_steps`` × data-parallel processes; with
        ``accelerator_config.split_batches`` the per-device size already is the global one.
        """
        per_device = self.train_batch_size if per_device_batch_size is None else per_device_batch_size
        split = getattr(self.accelerator_config, "split_batches", False)
        return per_device * self.gradient_accumulation_steps * (1 if split else self.world_size)

    def check_global_batch(self) -> None:
        """--legw_global_batch_size, when given, must be the global batch Trainer will form."""
        if self.legw_global_batch_size is None:
            return
        actual = self.legw_global_batch()
        if actual != self.legw_global_batch_size:
            raise SettingError(
                "legw_global_batch_size",
                f"must equal per_device_train_batch_size x gradient_accumulation_steps x processes = {actual}",
                self.legw_global_batch_size,
                detail=f"{self.train_batch_size} x {self.gradient_accumulation_steps} x "
                f"{1 if getattr(self.accelerator_config, 'split_batches', False) else self.world_size}",
            )

    def _legw_length(self) -> dict[str, float | int]:
        """The run's length as the plan takes it when Trainer's --max_steps is unset: --legw_base_steps (steps at
        the base batch) or --num_train_epochs."""
        if self.legw_base_steps is not None:
            return {"base_steps": self.legw_base_steps}
        return {"epochs": self.num_train_epochs}

    def legw_plan(
        self,
        *,
        global_batch: int,
        dataset_size: int | None,
        steps_per_epoch: int | None,
        max_steps: int,
        config: LegwConfig | None = None,
    ) -> LegwPlan:
        """The plan for a run of these arguments; ``max_steps`` is Trainer's step count for the run. ``config``
        (given in code, ``LegwTrainer(legw_config=...)``) replaces the config of the ``--legw_*`` fields."""
        if self.legw_dataset_size is not None:
            dataset_size, steps_per_epoch = self.legw_dataset_size, None
        if dataset_size is None:
            raise SettingError(
                "legw_dataset_size", "is required when the train dataset has no length (LEGW counts epochs)", None
            )
        length = {"steps": max_steps} if self.max_steps > 0 else self._legw_length()
        try:
            return (config or self.legw_config()).plan(
                batch_size=global_batch,
                dataset_size=dataset_size,
                steps_per_epoch=steps_per_epoch,
                drop_last=self.dataloader_drop_last,
                **length,
            )
        except SettingError as error:
            if config is not None and (error.field in LegwConfig.__dataclass_fields__ or error.field in DECAY_OPTIONS):
                raise  # a setting of the config given in code, named as that config names it
            raise as_argument_error(error) from None

    def legw_adascale_base_plan(self, dataset_size: int) -> LegwPlan:
        """The base run AdaScale follows: the schedule flags at --legw_base_batch_size for --num_train_epochs (or
        --legw_base_steps)."""
        try:
            return self.legw_config().plan(
                batch_size=self.legw_base_batch_size,
                dataset_size=dataset_size,
                drop_last=self.dataloader_drop_last,
                **self._legw_length(),
            )
        except SettingError as error:
            raise as_argument_error(error) from None


@dataclass
class LegwTrainingArguments(LegwArguments, TrainingArguments):
    """``TrainingArguments`` with the LEGW fields of :class:`LegwArguments`."""


def refuse_scale_without_gain(scale: float | None) -> None:
    if scale is not None:
        raise SettingError("legw_adascale_scale", "is only used with --legw_adascale gain or sqrt_gain", scale)


def check_plan_before_training(args: LegwArguments, train_dataset: Any, config: LegwConfig | None = None) -> None:
    """Build the plan from the settings alone (and ``config``, when one is given in code), so a bad one fails before
    Trainer writes anything.

    Steps per epoch here come from the dataset size, not yet from Trainer's dataloader: the exact plan is
    built again when training starts. A batch ramp's plan is the whole plan already (it needs a sized dataset).
    """
    if args.legw_batch_ramp is not None:
        if train_dataset is not None:  # (else checked when training starts)
            plan_of_ramp(args, train_dataset, config)
        return
    dataset_size = args.legw_dataset_size
    if dataset_size is None and hasattr(train_dataset, "__len__"):
        dataset_size = len(train_dataset)
    if dataset_size is None:
        return
    if args.legw_adascale_lr:
        args.legw_adascale_base_plan(dataset_size)
        return
    global_batch = args.legw_global_batch()
    spe = epoch_steps(dataset_size, global_batch, args.dataloader_drop_last)
    if spe == 0:
        raise SettingError(
            "per_device_train_batch_size",
            f"gives a global batch ({global_batch}) larger than the dataset ({dataset_size}) with "
            "dataloader_drop_last: 0 steps per epoch",
            args.per_device_train_batch_size,
        )
    max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * spe)
    # (with --legw_base_steps, legw_plan takes the length from it and max_steps is not read)
    args.legw_plan(
        global_batch=global_batch, dataset_size=dataset_size, steps_per_epoch=spe, max_steps=max_steps, config=config
    )
