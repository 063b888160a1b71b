"""The LEGW plan as a torch LR scheduler, and ``get_scheduler`` extended with LEGW names.

:class:`LegwScheduler` counts optimizer updates and nothing else: each ``step()`` is one applied update, and
the LR it sets is the plan's LR for the next update. Its state is that count plus the plan it was computed
from, all primitives, so Trainer's ``torch.load(weights_only=True)`` loads it; on load only the progress is
restored, and the schedule comes from the current plan.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from .errors import SettingError
from .plan import LegwConfig, LegwPlan, PhasedPlan, plan_from_dict
from .ramp import RampedPlan
from .schedules import DECAY_OPTIONS, DECAYS, make_decay
from .settings import names_of

logger = logging.getLogger(__name__)

STATE_FORMAT = "legw_hf.LegwScheduler/1"

#: Names :func:`get_scheduler` answers itself: ``legw`` takes the decay from the plan or its kwargs,
#: ``legw_<decay>`` names the decay shape.
SCHEDULER_NAMES: tuple[str, ...] = ("legw", *(f"legw_{name}" for name in DECAYS))


class LegwScheduler(LRScheduler):
    """Sets each param group's LR to the plan's LR for the coming update.

    Call ``step()`` once per *applied* optimizer update: not per micro-batch, not per process, and not after
    a step the GradScaler skipped. A group's LR is the plan's LR times the group's ``lr_scale`` key
    (default 1); the optimizer's own initial ``lr`` is ignored, so the plan is the only source of the LR.

    Args:
        optimizer: the optimizer whose groups to drive.
        plan: a :class:`~legw_hf.plan.LegwPlan`, :class:`~legw_hf.plan.PhasedPlan` or
            :class:`~legw_hf.ramp.RampedPlan` (a batch ramp: the LR of each update for its own batch).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, plan: LegwPlan | PhasedPlan | RampedPlan) -> None:
        if not isinstance(plan, (LegwPlan, PhasedPlan, RampedPlan)):
            raise TypeError(f"plan must be a LegwPlan, PhasedPlan or RampedPlan, got {type(plan).__name__}")
        self.plan = plan
        #: The plan (as a dict) of the checkpoint last loaded, when it differs from ``plan``; else None.
        self.checkpoint_plan: dict[str, Any] | None = None
        #: What the last load changed, as its warning said (Trainer swallows warnings raised while it loads).
        self.resume_note: str | None = None
        super().__init__(optimizer)

    @property
    def updates(self) -> int:
        """Optimizer updates applied so far."""
        return self.last_epoch

    def get_lr(self) -> list[float]:
        lr = self.plan.lr_for_update(self.last_epoch)
        return [lr * group.get("lr_scale", 1.0) for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "updates": self.last_epoch, "plan": self.plan.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the progress; the schedule itself stays the current plan's.

        If the saved plan differs (another batch size, dataset or LR), a warning lists what changed and the
        progress is carried over in epochs, so the run continues at the same point of the epoch schedule.
        """
        if state_dict.get("format") == STATE_FORMAT:
            updates = int(state_dict["updates"])
            saved = state_dict["plan"]
            current = self.plan.to_dict()
            if saved != current:
                if isinstance(self.plan, RampedPlan) and "ramp" in saved:
                    self._resume_ramp(saved)
                else:
                    updates = self._carry_over(updates, saved)
                self.checkpoint_plan = saved
        elif "last_epoch" in state_dict:
            updates = int(state_dict["last_epoch"])
            warnings.warn(
                f"Restoring a non-LEGW scheduler state: keeping its progress ({updates} updates) only; the LR "
                "schedule is the current LEGW plan's.",
                stacklevel=2,
            )
        else:
            raise ValueError(f"not a scheduler state dict (keys: {sorted(state_dict)})")
        self.last_epoch = updates
        self._last_lr = set_group_lrs(self.optimizer, self.get_lr())

    def _resume_ramp(self, saved: dict[str, Any]) -> None:
        """A batch ramp resumes only a checkpoint of the same ramp over the same data and length: its update n is
        then the same samples and LR at any world size or per-device batch, only each stage's accumulation differs."""
        if not self.plan.has_updates_of(saved):
            first = (saved.get("plans") or [{}])[0]
            raise ValueError(
                f"the checkpoint's batch ramp {saved.get('ramp')} over {first.get('epochs')} epochs of "
                f"{first.get('dataset_size')} samples is not this run's {self.plan.ramp.to_text()} over "
                f"{self.plan.epochs} epochs of {self.plan.dataset_size}: update n of another ramp is not the same "
                "samples; resume it with the checkpoint's ramp, dataset and epochs"
            )
        self.resume_note = (
            f"Resuming the batch ramp {self.plan.ramp.to_text()} with micro-batch steps of "
            f"{self.plan.micro_step_samples} samples (the checkpoint's: {saved['micro_step_samples']}): the same "
            "updates, each stage's accumulation derived again."
        )
        logger.info(self.resume_note)

    def _carry_over(self, updates: int, saved: dict[str, Any]) -> int:
        current = self.plan.to_dict()
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        message = f"The LEGW plan changed since the checkpoint ({', '.join(changed)} differ)."
        if isinstance(self.plan, LegwPlan) and "steps_per_epoch" in saved:
            converted = updates_in_new_plan(updates, saved, self.plan.steps_per_epoch)
            message += (
                f" Continuing at epoch {updates / saved['steps_per_epoch']:g}: update {updates} of the checkpoint's "
                f"plan is update {converted} of the current plan."
            )
            updates = converted
        message += f"\n  checkpoint: {_describe(saved)}\n  now:        {self.plan.describe()}"
        self.resume_note = message
        warnings.warn(message, stacklevel=3)
        return updates


def set_group_lrs(optimizer: torch.optim.Optimizer, lrs: list[float]) -> list[Any]:
    """Set each param group's LR (in place for a tensor LR, as the fused optimizers keep it); the LRs as set."""
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
    return [group["lr"] for group in optimizer.param_groups]


def updates_in_new_plan(updates: int, saved_plan: dict[str, Any], steps_per_epoch: int) -> int:
    """``updates`` optimizer updates of a saved plan as updates of a plan with ``steps_per_epoch``: the same
    epochs of progress. A run resumed at another global batch (more or fewer processes, another per-device batch)
    continues at the same point of its epoch schedule."""
    saved_steps = saved_plan.get("steps_per_epoch")
    if not saved_steps or saved_steps == steps_per_epoch:
        return updates
    return round(updates / saved_steps * steps_per_epoch)


def _describe(plan: dict[str, Any]) -> str:
    try:
        return plan_from_dict(plan).describe()
    except (KeyError, TypeError, ValueError):
        return str(plan)


class SkippedStepDetector:
    """Tells whether the GradScaler skipped the last optimizer step.

    ``accelerator.optimizer_step_was_skipped`` (accelerate 1.x) only notices a skip when the scaler did not
    call ``optimizer.step()``. Optimizers that take the inf check inside ``step()`` — fused AdamW, Trainer's
    default optimizer since transformers 5 — are always called, so accelerate reports every overflowed step as
    applied and schedulers advance through it. A skipped step always lowers the scale (growth never follows
    an overflow in the same update), so a lower scale than at the previous check is a skip.
    """

    def __init__(self, scaler: torch.amp.GradScaler | None) -> None:
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self._scale = self.scaler.get_scale() if self.scaler is not None else None

    def step_was_skipped(self) -> bool:
        """Whether the scale dropped since the last call (a host sync, only when a scaler is in use)."""
        if self.scaler is None:
            return False
        scale, self._scale = self._scale, self.scaler.get_scale()
        return self._scale < scale


def get_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    num_warmup_steps: int | None = None,
    num_training_steps: int | None = None,
    scheduler_specific_kwargs: dict[str, Any] | None = None,
) -> LRScheduler:
    """``transformers.get_scheduler`` plus the LEGW names in :data:`SCHEDULER_NAMES`.

    Every other name is passed to ``transformers.get_scheduler`` unchanged. For a LEGW name,
    ``scheduler_specific_kwargs`` holds either ``plan`` (a ready plan) or the settings of one: the
    :class:`~legw_hf.plan.LegwConfig` fields, ``batch_size``, ``dataset_size``, the length (``epochs``,
    ``base_steps`` or ``steps``; ``num_training_steps`` stands for ``steps`` when none is given), optional
    ``drop_last`` and ``steps_per_epoch``, and ``decay`` with its options (``power``, ``end_lr``, ...).

    The warmup and length come from the plan: ``num_warmup_steps`` and ``num_training_steps``, when given,
    must agree with it.
    """
    if name not in SCHEDULER_NAMES:
        import transformers

        return transformers.get_scheduler(
            name,
            optimizer,
            num_warmup_steps=num_warmup_steps,
            num_training_steps=num_training_steps,
            scheduler_specific_kwargs=scheduler_specific_kwargs,
        )
    kwargs = dict(scheduler_specific_kwargs or {})
    decay_name = name.removeprefix("legw").removeprefix("_") or None
    if "plan" in kwargs:
        plan = kwargs.pop("plan")
        if kwargs:
            raise SettingError(
                "scheduler_specific_kwargs", "must hold either a plan or plan settings, not both", sorted(kwargs)
            )
        if decay_name and isinstance(plan, LegwPlan) and plan.decay.name != decay_name:
            raise SettingError("plan", f"must have a {decay_name!r} decay for scheduler {name!r}", plan.decay.name)
    else:
        plan = _plan_from_settings(kwargs, decay_name, num_training_steps)
    if num_training_steps is not None and num_training_steps != plan.total_steps:
        raise SettingError(
            "num_training_steps", f"must equal the LEGW plan's total steps ({plan.total_steps})", num_training_steps
        )
    if num_warmup_steps is not None and isinstance(plan, LegwPlan) and num_warmup_steps != plan.warmup_steps:
        raise SettingError(
            "num_warmup_steps",
            f"must be None or equal the LEGW plan's warmup steps ({plan.warmup_steps}); LEGW derives the warmup",
            num_warmup_steps,
        )
    return LegwScheduler(optimizer, plan)


_CONFIG_KEYS = names_of("config")
# a batch ramp is a RampedPlan (legw_hf.ramp.ramped_plan), handed over as plan=
_RUN_KEYS = tuple(name for name in names_of("run") if name != "batch_ramp")


def _plan_from_settings(
    settings: dict[str, Any], decay_name: str | None, num_training_steps: int | None
) -> LegwPlan | PhasedPlan:
    unknown = sorted(set(settings) - {*_CONFIG_KEYS, *_RUN_KEYS, *names_of("decay")})
    if unknown:
        raise SettingError(unknown[0], "is not a LEGW scheduler setting", settings[unknown[0]])
    missing = [k for k in ("base_batch_size", "base_lr", "batch_size", "dataset_size") if k not in settings]
    if missing:
        raise SettingError(missing[0], "is required by a LEGW scheduler", None)
    given_decay = settings.get("decay")
    if decay_name and given_decay not in (None, decay_name):
        raise SettingError("decay", f"must be {decay_name!r} for this scheduler name", given_decay)
    decay = make_decay(decay_name or given_decay or "poly", **{k: settings[k] for k in DECAY_OPTIONS & set(settings)})
    config = LegwConfig(decay=decay, **{k: settings[k] for k in _CONFIG_KEYS if k in settings})
    run = {k: settings[k] for k in _RUN_KEYS if k in settings}
    if not {"epochs", "base_steps", "steps"} & set(run) and num_training_steps is not None:
        run["steps"] = num_training_steps
    return config.plan(**run)
