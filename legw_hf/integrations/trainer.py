"""LEGW for ``transformers.Trainer``: argument fields, a Trainer subclass and a validating callback.

The only change a ``run_mlm.py``-style script needs::

    from legw_hf import LegwTrainer as Trainer, LegwTrainingArguments as TrainingArguments

``--learning_rate`` is then the peak LR tuned at ``--legw_base_batch_size``; the plan is computed from
Trainer's own arithmetic (global batch = per-device × gradient accumulation × data-parallel processes, steps
per epoch from Trainer's dataloader) when training starts, and :class:`LegwCallback` checks it against the
run and logs it. This module only converts between Trainer's vocabulary and :mod:`legw_hf.plan`.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..adascale import MODES as ADASCALE_MODES, AdaScaleScheduler, GradientStatistics
from ..distributed import deepspeed as deepspeed_layouts
from ..errors import SettingError
from ..noise_scale import GradientNoise, check_scale
from ..optim import LAMB_PRESETS, LARS_PRESETS, Lamb, Lars, decay_param_groups, layerwise_optimizer_of
from ..optim.choice import OPTIMIZER_NAMES, check_optimizer, optimizer_class_and_keywords
from ..plan import RULES, LegwConfig, LegwPlan, epoch_steps
from ..record import record_plan, write_json
from ..scheduler import STATE_FORMAT as SCHEDULER_STATE_FORMAT, LegwScheduler, SkippedStepDetector, updates_in_new_plan
from ..schedules import DECAY_OPTIONS, DECAYS, make_decay
from . import deepspeed as deepspeed_config

logger = logging.getLogger(__name__)

#: The gradient noise statistics (--legw_adascale) in a Trainer checkpoint folder.
NOISE_STATE_FILE = "gradient_noise.json"

#: The ``--legw_*`` flags of :mod:`legw_hf.optim.choice`'s optimizer keywords (``--legw_optimizer adamw`` takes
#: Trainer's own ``--adam_*`` flags instead of ``--legw_betas`` / ``--legw_eps``).
_KEYWORD_OF_FLAG = {
    "legw_optimizer_preset": "preset",
    "legw_betas": "betas",
    "legw_eps": "eps",
    "legw_momentum": "momentum",
    "legw_nesterov": "nesterov",
    "legw_bias_correction": "bias_correction",
    "legw_lamb_max_grad_norm": "max_grad_norm",
    "legw_trust_clamp": "trust_clamp",
    "legw_trust_coefficient": "trust_coefficient",
    "legw_adapt": "adapt",
    "legw_master_weights": "master_weights",
    "legw_fused": "fused",
}
_FLAG_OF_KEYWORD = {keyword: flag for flag, keyword in _KEYWORD_OF_FLAG.items()} | {
    "lr": "learning_rate",
    "optimizer": "legw_optimizer",
}

# Core setting name -> the Trainer argument a user typed, so errors name the flag they can fix.
_ARGUMENT_FOR_SETTING = {
    "base_batch_size": "legw_base_batch_size",
    "base_lr": "learning_rate",
    "base_warmup_epochs": "legw_base_warmup_epochs",
    "base_warmup_steps": "legw_base_warmup_steps",
    "rule": "legw_rule",
    "decay": "legw_decay",
    "power": "legw_power",
    "end_lr": "legw_end_lr",
    "milestones": "legw_milestones",
    "gamma": "legw_gamma",
    "period": "legw_decay_period",
    "staircase": "legw_staircase",
    "batch_size": "legw_global_batch_size",
    "dataset_size": "legw_dataset_size",
    "epochs": "num_train_epochs",
    "steps": "max_steps",
}


def _as_argument_error(error: SettingError) -> SettingError:
    return error.renamed_by(lambda field: _ARGUMENT_FOR_SETTING.get(field, field))


#: The LEGW flags that shape the plan; without ``--legw_base_batch_size`` they would be silently ignored.
_PLAN_FLAGS = tuple(
    dict.fromkeys(
        flag for flag in _ARGUMENT_FOR_SETTING.values() if flag.startswith("legw_") and flag != "legw_base_batch_size"
    )
)
_DECAY_FLAGS = ", ".join(f"--{_ARGUMENT_FOR_SETTING[option]}" for option in sorted(DECAY_OPTIONS))
#: Trainer's own schedule arguments, which LEGW replaces, and the LEGW flags to use instead.
_TRAINER_SCHEDULE_FLAGS = {
    "lr_scheduler_type": f"--legw_decay ({', '.join(DECAYS)})",
    "warmup_steps": "--legw_base_warmup_epochs or --legw_base_warmup_steps (the warmup at the base batch)",
    "lr_scheduler_kwargs": f"the decay flags ({_DECAY_FLAGS})",
}


def changed_fields(args: Any, names: tuple[str, ...] | Any, defaults: dict[str, Any] | None = None) -> list[str]:
    """Which of the dataclass fields ``names`` hold something other than their default (``defaults``, else the
    dataclass's own). An empty dict (also as the JSON text a command line gives) stands for a default of None; an
    enum stands for its value."""
    if defaults is None:
        defaults = {f.name: f.default for f in fields(args) if f.default is not MISSING}
    changed = []
    for name in names:
        value, default = getattr(args, name), defaults.get(name)
        value = getattr(value, "value", value)  # Trainer converts some of these to enums
        if value in ({}, "", "{}") and default is None:
            continue
        if value != default:
            changed.append(name)
    return changed


@dataclass
class LegwArguments:
    """LEGW fields for any ``TrainingArguments`` class; they become ``--legw_*`` flags in ``HfArgumentParser``.

    Mix into another arguments class with ``@dataclass class MyArgs(LegwArguments, Seq2SeqTrainingArguments)``.
    LEGW is on when ``legw_base_batch_size`` is set; ``learning_rate`` is then the base peak LR.
    """

    legw_base_batch_size: int | None = field(
        default=None,
        metadata={"help": "Global batch at which --learning_rate and the base warmup were tuned. Turns LEGW on."},
    )
    legw_rule: Literal[tuple(RULES)] | None = field(
        default=None,
        metadata={
            "help": "legw (default): sqrt(k) LR and k x warmup epochs; sqrt: sqrt(k) LR; linear: k x LR; none. "
            "--legw_adascale gain/sqrt_gain replaces the rule."
        },
    )
    legw_base_warmup_epochs: float | None = field(
        default=None, metadata={"help": "Warmup at the base batch, in epochs (or give --legw_base_warmup_steps)."}
    )
    legw_base_warmup_steps: float | None = field(
        default=None, metadata={"help": "Warmup at the base batch, in optimizer steps at that batch."}
    )
    legw_decay: Literal[tuple(DECAYS)] = field(default="poly", metadata={"help": "Decay shape after warmup."})
    legw_power: float | None = field(
        default=None, metadata={"help": "poly: exponent (default 1); poly_run: (default 0.5)."}
    )
    legw_end_lr: float | None = field(default=None, metadata={"help": "poly, cosine: final LR (default 0)."})
    legw_milestones: list[float] | None = field(
        default=None, metadata={"help": "multistep: epochs at which the LR is multiplied by --legw_gamma."}
    )
    legw_gamma: float | None = field(default=None, metadata={"help": "multistep, exp: decay factor."})
    legw_decay_period: float | None = field(default=None, metadata={"help": "exp: epochs per gamma (default 1)."})
    legw_staircase: bool | None = field(default=None, metadata={"help": "exp: decay in whole periods."})
    legw_global_batch_size: int | None = field(
        default=None,
        metadata={"help": "Expected global batch; checked against per-device x accumulation x processes."},
    )
    legw_dataset_size: int | None = field(
        default=None, metadata={"help": "Examples per epoch, for train datasets without a length (streaming)."}
    )
    legw_optimizer: Literal[OPTIMIZER_NAMES] | None = field(
        default=None, metadata={"help": "Optimizer to build instead of --optim's: adamw, sgd, lamb or lars."}
    )
    legw_optimizer_preset: str | None = field(
        default=None,
        metadata={"help": f"lamb: {', '.join(LAMB_PRESETS)}; lars: {', '.join(LARS_PRESETS)} (see legw_hf.Lamb)."},
    )
    legw_betas: list[float] | None = field(default=None, metadata={"help": "lamb: beta1 beta2 (preset's)."})
    legw_eps: float | None = field(default=None, metadata={"help": "lamb, lars: epsilon (preset's)."})
    legw_momentum: float | None = field(default=None, metadata={"help": "sgd (0.9), lars (preset's): momentum."})
    legw_nesterov: bool | None = field(default=None, metadata={"help": "sgd, lars: Nesterov momentum."})
    legw_bias_correction: Literal["inside", "step_size", "off"] | None = field(
        default=None, metadata={"help": "lamb: where Adam's bias correction goes (preset's)."}
    )
    legw_lamb_max_grad_norm: float | None = field(
        default=None,
        metadata={
            "help": "lamb: global gradient pre-normalisation max norm, 0 = off (preset's; nvidia: 1.0). "
            "When it is on, Trainer's --max_grad_norm clipping is turned off."
        },
    )
    legw_trust_clamp: list[float] | None = field(
        default=None, metadata={"help": "lamb: min max bounds of the trust ratio (preset's; deepspeed: 0.01 10)."}
    )
    legw_trust_coefficient: float | None = field(default=None, metadata={"help": "lars: trust coefficient."})
    legw_adapt: Literal["all", "decayed"] | None = field(
        default=None, metadata={"help": "lamb, lars: trust ratio for all tensors or only decayed ones."}
    )
    legw_master_weights: bool | None = field(
        default=None, metadata={"help": "lamb, lars: fp32 master copies of fp16/bf16 parameters."}
    )
    legw_fused: Literal["cpu", "triton", "off"] | None = field(
        default=None,
        metadata={
            "help": "lamb, lars: legw_hf's fused kernels: cpu (lamb, fp32 CPU tensors), triton (CUDA, pip install "
            "'legw_hf[gpu]'; opt-in until measured on a GPU), off (torch ops). Default: lamb's CPU kernel where it "
            "fits, torch ops elsewhere."
        },
    )
    legw_trust_log: Literal["summary", "per_layer", "off"] = field(
        default="summary", metadata={"help": "lamb, lars: trust ratios in the logs: min/median/max, per layer, none."}
    )

    legw_adascale: Literal[tuple(ADASCALE_MODES)] | None = field(
        default=None,
        metadata={
            "help": "gain: AdaScale's LR (r x the base run's schedule at the scale-invariant progress; SGD, LARS); "
            "sqrt_gain: sqrt(r) on Adam-preconditioned statistics (AdamW, LAMB); both replace the LEGW rule and need "
            "--legw_base_batch_size, the batch the schedule was tuned at. diagnostics: log noise_scale/b_simple, "
            "adascale/gain and adascale/efficiency beside any schedule."
        },
    )
    legw_adascale_scale: float | None = field(
        default=None,
        metadata={"help": "Expected scale S = global batch / --legw_base_batch_size, checked against the run."},
    )

    def __post_init__(self) -> None:
        if self.deepspeed:
            deepspeed_config.require_deepspeed("deepspeed", self.deepspeed)
        self._refuse_ignored_settings()
        self._check_adascale_settings()
        self._legw_clipping_off = None
        if self.legw_optimizer is not None:
            probe = _probe_optimizer(self)
            self._settle_clipping(probe)
            self._warn_without_trust_ratio(probe)
        super().__post_init__()
        self._check_deepspeed_blocks()
        if self._legw_clipping_off is not None:
            self._settle_deepspeed_clipping()
        if self.legw_enabled:
            self.legw_config()
            self._check_global_batch()
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
            _refuse_scale_without_gain(self.legw_adascale_scale)
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
            _refuse_scale_without_gain(self.legw_adascale_scale)
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
        if self.legw_adascale == "sqrt_gain" and not _adam_family(self):
            raise SettingError(
                "legw_adascale",
                "sqrt_gain is for Adam-family optimizers (--legw_optimizer lamb or adamw, or an adamw --optim); use "
                "gain with SGD or LARS",
                self.legw_adascale,
            )

    def _check_adascale_under_deepspeed(self) -> None:
        """Under DeepSpeed the applied gradient's norm is DeepSpeed's own (its partitions hold the gradient): no
        preconditioned norms, and DeepSpeed's fp16 loss scale may change inside the step that is measured."""
        config = self.deepspeed if isinstance(self.deepspeed, dict) else json.loads(Path(self.deepspeed).read_text())
        refusal = deepspeed_config.adascale_refusal(config, self.legw_adascale, fp16=self.fp16)
        if refusal is not None:
            raise SettingError("legw_adascale", refusal, self.legw_adascale)

    def _check_adascale_run(self) -> None:
        """S = global batch / base batch >= 1, and equal to --legw_adascale_scale when given."""
        global_batch = self.legw_global_batch()
        base = self.legw_base_batch_size if self.legw_enabled else self.train_batch_size
        try:
            check_scale(
                self.legw_adascale_scale, global_batch=global_batch, base_batch=base, field_name="legw_adascale_scale"
            )
        except SettingError as error:
            raise _as_argument_error(error) from None
        if self.deepspeed and global_batch == self.train_batch_size:
            raise SettingError(
                "legw_adascale",
                "needs at least 2 gradient estimates per update under DeepSpeed (processes x "
                "gradient_accumulation_steps >= 2): one estimate per update is differenced with the previous update's "
                "gradient, which ZeRO does not keep whole",
                self.legw_adascale,
            )

    def _refuse_ignored_settings(self) -> None:
        """Settings that would be silently ignored are errors: LEGW flags with LEGW off, and Trainer's own
        schedule arguments with LEGW on (the LEGW plan replaces that schedule)."""
        if not self.legw_enabled:
            orphans = changed_fields(self, _PLAN_FLAGS)
            if orphans:
                raise SettingError(
                    "legw_base_batch_size",
                    f"is required by {', '.join('--' + flag for flag in orphans)}: without it LEGW is off and "
                    "Trainer's own schedule would run; give the global batch --learning_rate was tuned at",
                    None,
                )
            return
        for name in changed_fields(self, tuple(_TRAINER_SCHEDULE_FLAGS)):
            raise SettingError(
                name,
                f"must keep its default with LEGW on (--legw_base_batch_size): the LEGW plan replaces Trainer's "
                f"schedule; use {_TRAINER_SCHEDULE_FLAGS[name]} instead",
                getattr(getattr(self, name), "value", getattr(self, name)),
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
        clipping = ds_config.get("gradient_clipping")
        why = (
            f"--legw_optimizer {self.legw_optimizer} pre-normalises gradients by their global norm (max norm "
            f"{lamb_norm:g}), so legw_hf turned Trainer's max_grad_norm ({trainer_norm:g}) off to clip once"
        )
        if clipping is None:
            logger.warning("%s; DeepSpeed's own clipping (default 1.0) is turned off too (gradient_clipping=0).", why)
            ds_config["gradient_clipping"] = 0.0
        elif clipping != "auto" and float(clipping) != 0:
            raise SettingError(
                "gradient_clipping",
                f'in the DeepSpeed config would clip a second time: {why}. Set "gradient_clipping" to "auto" or 0 '
                "in the DeepSpeed config, or keep DeepSpeed's clipping and turn LAMB's off with "
                "--legw_lamb_max_grad_norm 0",
                clipping,
            )

    @property
    def legw_enabled(self) -> bool:
        return self.legw_base_batch_size is not None

    def legw_config(self) -> LegwConfig:
        """The :class:`~legw_hf.plan.LegwConfig` these arguments describe."""
        try:
            decay = make_decay(
                self.legw_decay,
                **{option: getattr(self, _ARGUMENT_FOR_SETTING[option]) for option in DECAY_OPTIONS},
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
            raise _as_argument_error(error) from None

    def legw_global_batch(self, per_device_batch_size: int | None = None) -> int:
        """Samples per optimizer update across all processes, as Trainer forms them.

        ``per_device_train_batch_size`` × ``gradient_accumulation_steps`` × data-parallel processes; with
        ``accelerator_config.split_batches`` the per-device size already is the global one.
        """
        per_device = self.train_batch_size if per_device_batch_size is None else per_device_batch_size
        split = getattr(self.accelerator_config, "split_batches", False)
        return per_device * self.gradient_accumulation_steps * (1 if split else self.world_size)

    def _check_global_batch(self) -> None:
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

    def legw_plan(
        self, *, global_batch: int, dataset_size: int | None, steps_per_epoch: int | None, max_steps: int
    ) -> LegwPlan:
        """The plan for a run of these arguments; ``max_steps`` is Trainer's step count for the run."""
        if self.legw_dataset_size is not None:
            dataset_size, steps_per_epoch = self.legw_dataset_size, None
        if dataset_size is None:
            raise SettingError(
                "legw_dataset_size", "is required when the train dataset has no length (LEGW counts epochs)", None
            )
        length = {"steps": max_steps} if self.max_steps > 0 else {"epochs": self.num_train_epochs}
        try:
            return self.legw_config().plan(
                batch_size=global_batch,
                dataset_size=dataset_size,
                steps_per_epoch=steps_per_epoch,
                drop_last=self.dataloader_drop_last,
                **length,
            )
        except SettingError as error:
            raise _as_argument_error(error) from None


@dataclass
class LegwTrainingArguments(LegwArguments, TrainingArguments):
    """``TrainingArguments`` with the LEGW fields of :class:`LegwArguments`."""


@dataclass(frozen=True)
class _RunShape:
    """What Trainer measured about the run (``set_initial_training_values``)."""

    steps_per_epoch: int | None
    dataset_size: int | None


class LegwTrainer(Trainer):
    """``Trainer`` whose LR scheduler is the LEGW plan when ``args.legw_base_batch_size`` is set.

    Also builds ``--legw_optimizer`` when given and installs :class:`LegwCallback`. Combine with another
    Trainer subclass by listing it first: ``class MyTrainer(LegwTrainer, Seq2SeqTrainer)``.
    Settings are checked before ``Trainer.__init__`` touches the output directory.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = inspect.signature(Trainer.__init__).bind(self, *args, **kwargs).arguments
        training_args = bound.get("args")
        if isinstance(training_args, LegwArguments) and training_args.legw_enabled:
            _check_plan_before_training(training_args, bound.get("train_dataset"))
        super().__init__(*args, **kwargs)
        follow_trainer_log_level(self.args)
        if not any(isinstance(cb, LegwCallback) for cb in self.callback_handler.callbacks):
            # First, so reporting integrations and the progress printer see the keys it adds to the logs.
            self.callback_handler.callbacks.insert(0, LegwCallback())
        self._legw_run = _RunShape(None, None)
        self._legw_loss_kwargs_unchecked = True
        #: AdaScale / noise-scale statistics of this run (--legw_adascale), created with the scheduler.
        self.legw_noise: GradientNoise | None = None
        self._legw_statistics: GradientStatistics | None = None
        self._legw_resume_checkpoint: str | None = None
        self._legw_step_hook: Any = None

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
        self._legw_resume_checkpoint = checkpoint or None
        if checkpoint and self.is_deepspeed_enabled:
            self._reshard_deepspeed_checkpoint(checkpoint)
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            if self._legw_statistics is not None:
                self._legw_statistics.detach()
                self._legw_statistics = None
            if self._legw_step_hook is not None:
                self._legw_step_hook.remove()
                self._legw_step_hook = None

    def _reshard_deepspeed_checkpoint(self, checkpoint: str) -> None:
        """Resuming a ZeRO checkpoint at another data-parallel world size: DeepSpeed refuses its own checkpoint
        then, so convert it to DeepSpeed's universal form (once, on the main process) and have the engine load that,
        which re-partitions the weights and optimizer moments for this world."""
        saved = deepspeed_config.checkpoint_data_parallel_size(checkpoint)
        world = self.args.world_size
        if saved is None or saved == world:
            return
        ds_config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        if stage not in (1, 2):
            raise SettingError(
                "resume_from_checkpoint",
                f"was saved by {saved} DeepSpeed ranks and this run has {world}: legw_hf re-shards ZeRO-1/2 "
                f"checkpoints (through DeepSpeed's universal checkpoint), not ZeRO stage {stage}. Resume at {saved} "
                "processes, or convert it with deepspeed.checkpoint.ds_to_universal and set "
                '"checkpoint": {"load_universal": true}',
                checkpoint,
            )
        if self.args.should_save:  # the main process; the others wait for its files
            deepspeed_config.convert_to_universal(checkpoint)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        universal = Path(checkpoint) / (Path(checkpoint) / "latest_universal").read_text().strip()
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
        logger.warning(
            "The checkpoint %s was saved by %d DeepSpeed ranks and this run has %d: resuming from its universal form "
            "%s, which DeepSpeed re-partitions for %d ranks.",
            checkpoint,
            saved,
            world,
            universal,
            world,
        )

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None):
        self._check_loss_kwargs_once(model, inputs, num_items_in_batch)
        if self.legw_noise is None:
            return super().training_step(model, inputs, num_items_in_batch)
        statistics = self._gradient_statistics(model)
        weight = self._micro_batch_weight(inputs, num_items_in_batch)
        if self.is_deepspeed_enabled and self.accelerator.sync_gradients:
            # DeepSpeed steps inside this backward; the step pre-hook folds this micro-batch in and measures.
            statistics.defer_micro_step(weight)
            loss = super().training_step(model, inputs, num_items_in_batch)
            statistics.discard_deferred()
            return loss
        loss = super().training_step(model, inputs, num_items_in_batch)
        statistics.micro_step_done(weight)
        if self.accelerator.sync_gradients:  # the last micro-batch: gradients are all-reduced, not yet clipped
            statistics.update_done()
            self._begin_adascale_update()
        return loss

    def _begin_adascale_update(self) -> None:
        scheduler = _unwrap_scheduler(self.lr_scheduler)
        if isinstance(scheduler, AdaScaleScheduler):
            scheduler.begin_update()

    def _measure_inside_deepspeed_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """The client optimizer's step pre-hook under DeepSpeed: its norm of the applied gradient is computed by
        now, and the step, called once per parameter group, has not run. The first call measures; each sets the
        LR of the group it steps (DeepSpeed hands the optimizer one group at a time)."""
        self._legw_statistics.measure_deferred()
        self._begin_adascale_update()

    def _gradient_statistics(self, model: torch.nn.Module) -> GradientStatistics:
        if self._legw_statistics is not None:
            return self._legw_statistics
        scaler = self.accelerator.scaler
        applied_norm, step_hook = None, None
        if self.is_deepspeed_enabled:
            applied_norm, client = deepspeed_config.zero_gradient_norm(self.optimizer)
            step_hook = client.register_step_pre_hook(self._measure_inside_deepspeed_step)
        self._legw_statistics = GradientStatistics(
            model.parameters(),
            self.legw_noise,
            preconditioner=self.optimizer if self.args.legw_adascale == "sqrt_gain" else None,
            loss_scale=lambda: scaler.get_scale() if scaler is not None and scaler.is_enabled() else None,
            applied_norm=applied_norm,
        ).attach()
        self._legw_step_hook = step_hook
        return self._legw_statistics

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
                self.args.gradient_accumulation_steps
                * (self.accelerator.num_processes if self.args.average_tokens_across_devices else 1),
            )
            self.model_accepts_loss_kwargs = False

    @property
    def legw_enabled(self) -> bool:
        return isinstance(self.args, LegwArguments) and self.args.legw_enabled

    def set_initial_training_values(self, args: TrainingArguments, dataloader: Any) -> tuple:
        values = super().set_initial_training_values(args, dataloader)
        sized = hasattr(dataloader, "__len__")
        self._legw_run = _RunShape(values[1] if sized else None, values[2] if sized else None)
        if self.legw_enabled and self.args.legw_adascale_lr:
            # The run is as long as it takes τ to reach the base run's length: at most that many updates (r >= 1).
            longest = self.adascale_base_plan().total_steps
            _, steps_per_epoch, examples, _, total_batch, steps_in_epoch, _ = values
            values = (
                -(-longest // steps_per_epoch),
                steps_per_epoch,
                examples,
                longest * total_batch,
                total_batch,
                steps_in_epoch,
                longest,
            )
        return values

    def adascale_base_plan(self) -> LegwPlan:
        """The base run AdaScale follows: the schedule flags at --legw_base_batch_size for --num_train_epochs."""
        dataset_size = self.args.legw_dataset_size or self._legw_run.dataset_size
        if dataset_size is None:
            raise SettingError(
                "legw_dataset_size", "is required when the train dataset has no length (AdaScale counts epochs)", None
            )
        return _adascale_base_plan(self.args, dataset_size)

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
        saved = _checkpoint_plan(resume_from_checkpoint) if self.legw_enabled and resume_from_checkpoint else None
        if saved is None:
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

    def legw_plan(self, num_training_steps: int) -> LegwPlan:
        """The plan for this run, from Trainer's global batch and dataloader."""
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
        )
        if plan.total_steps != num_training_steps:
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
            self.lr_scheduler = LegwScheduler(optimizer or self.optimizer, self.legw_plan(num_training_steps))
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _start_gradient_noise(self) -> None:
        """The run's :class:`GradientNoise`, restored from the checkpoint being resumed when it has one."""
        args = self.args
        noise = GradientNoise(
            micro_batch=self._train_batch_size,
            base_batch=args.legw_base_batch_size or self._train_batch_size,
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
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, LegwCallback):
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


def _adascale_base_plan(args: LegwArguments, dataset_size: int) -> LegwPlan:
    try:
        return args.legw_config().plan(
            batch_size=args.legw_base_batch_size,
            dataset_size=dataset_size,
            epochs=args.num_train_epochs,
            drop_last=args.dataloader_drop_last,
        )
    except SettingError as error:
        raise _as_argument_error(error) from None


def _refuse_scale_without_gain(scale: float | None) -> None:
    if scale is not None:
        raise SettingError("legw_adascale_scale", "is only used with --legw_adascale gain or sqrt_gain", scale)


def _adam_family(args: LegwArguments) -> bool:
    if args.legw_optimizer is not None:
        return args.legw_optimizer in ("lamb", "adamw")
    return "adam" in str(getattr(args.optim, "value", args.optim)).lower()


def _checkpoint_plan(checkpoint: str) -> dict[str, Any] | None:
    """The LEGW plan a Trainer checkpoint was saved under (its ``scheduler.pt``), or None."""
    path = Path(checkpoint) / "scheduler.pt"
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=True)
    return state.get("plan") if isinstance(state, dict) and state.get("format") == SCHEDULER_STATE_FORMAT else None


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


def _optimizer_keywords(args: LegwArguments) -> dict[str, Any]:
    keywords = {keyword: getattr(args, flag) for flag, keyword in _KEYWORD_OF_FLAG.items()}
    if args.legw_optimizer == "adamw":
        for flag in ("legw_betas", "legw_eps"):
            if getattr(args, flag) is not None:
                value = getattr(args, flag)
                raise SettingError(flag, "is not an option of optimizer 'adamw' (it takes --adam_*)", value)
        keywords.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    return keywords


def _as_flag_error(error: SettingError) -> SettingError:
    def flag(field: str) -> str:
        keyword = field.split("[")[0]
        return _FLAG_OF_KEYWORD.get(keyword, keyword)

    return error.renamed_by(flag)


def optimizer_cls_and_kwargs(args: LegwArguments) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The class and keywords ``--legw_optimizer`` and its flags select (weight decay comes from Trainer's
    groups). A flag the chosen optimizer does not take is an error rather than silently ignored."""
    try:
        return optimizer_class_and_keywords(args.legw_optimizer, args.learning_rate, **_optimizer_keywords(args))
    except SettingError as error:
        raise _as_flag_error(error) from None


def _probe_optimizer(args: LegwArguments) -> torch.optim.Optimizer:
    """The chosen optimizer built over one dummy parameter: its own checks validate the flags up front."""
    try:
        return check_optimizer(args.legw_optimizer, args.learning_rate, **_optimizer_keywords(args))
    except SettingError as error:
        raise _as_flag_error(error) from None


def _check_plan_before_training(args: LegwArguments, train_dataset: Any) -> None:
    """Build the plan from the settings alone, so a bad one fails before Trainer writes anything.

    Steps per epoch here come from the dataset size, not yet from Trainer's dataloader: the exact plan is
    built again when training starts.
    """
    dataset_size = args.legw_dataset_size
    if dataset_size is None and hasattr(train_dataset, "__len__"):
        dataset_size = len(train_dataset)
    if dataset_size is None:
        return
    if args.legw_adascale_lr:
        _adascale_base_plan(args, dataset_size)
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
    args.legw_plan(global_batch=global_batch, dataset_size=dataset_size, steps_per_epoch=spe, max_steps=max_steps)


class LegwCallback(TrainerCallback):
    """Checks the LEGW plan against the real run, logs it once, and adds the LEGW scale to the logs.

    On train begin: the scheduler must be a :class:`LegwScheduler` whose plan matches Trainer's global
    batch, steps per epoch and total steps (else ``ValueError`` before the first step). Each log gets
    ``legw_k`` (batch ÷ base batch) and ``legw_lr_scale`` (logged LR ÷ base LR), and with
    :class:`~legw_hf.Lamb` or :class:`~legw_hf.Lars` the last step's trust ratios
    (``trust_ratio/min|median|max``; per parameter with ``--legw_trust_log per_layer``).

    With fp16 loss scaling it also marks GradScaler-skipped steps that accelerate reports as applied (fused
    AdamW, see :class:`~legw_hf.scheduler.SkippedStepDetector`), so Trainer does not step the
    scheduler — any scheduler — through an overflow.
    """

    def __init__(self) -> None:
        self.plan: LegwPlan | None = None
        #: The run's gradient noise statistics (--legw_adascale); LegwTrainer sets it.
        self.noise: GradientNoise | None = None
        self._skips = SkippedStepDetector(None)
        self._warned_about_batch = False

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._skips.step_was_skipped() and not getattr(optimizer, "step_was_skipped", True):
            optimizer._is_overflow = True  # what accelerate's AcceleratedOptimizer reads back

    def on_train_begin(self, args, state, control, lr_scheduler=None, train_dataloader=None, optimizer=None, **kwargs):
        self._skips = SkippedStepDetector(getattr(optimizer, "scaler", None))
        # Under DeepSpeed, learn its partitions now: a setting that would make trust ratios wrong fails here.
        deepspeed_layouts.attach(optimizer)
        if not (isinstance(args, LegwArguments) and args.legw_enabled):
            return
        lr_scheduler = _unwrap_scheduler(lr_scheduler)
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
        lr_scheduler = _unwrap_scheduler(lr_scheduler)
        if isinstance(lr_scheduler, LegwScheduler):
            plan = lr_scheduler.plan
            extra.update(legw_k=plan.k, legw_lr_scale=logs["learning_rate"] / plan.base_lr)
        if isinstance(lr_scheduler, AdaScaleScheduler):
            extra["adascale/progress"] = lr_scheduler.progress
        if self.noise is not None:
            extra.update(self.noise.summary())
            warning = None if self._warned_about_batch else self.noise.batch_warning()
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
        lr_scheduler = _unwrap_scheduler(lr_scheduler)
        if isinstance(lr_scheduler, AdaScaleScheduler) and lr_scheduler.finished:
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        if self.noise is None or not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if checkpoint.is_dir():  # the statistics are the same on every process
            write_json(checkpoint / NOISE_STATE_FILE, self.noise.state_dict())


def _unwrap_scheduler(scheduler: Any) -> Any:
    """The scheduler inside accelerate's ``AcceleratedScheduler`` (which DeepSpeed runs get), or itself."""
    while not isinstance(scheduler, LegwScheduler) and hasattr(scheduler, "scheduler"):
        scheduler = scheduler.scheduler
    return scheduler


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
