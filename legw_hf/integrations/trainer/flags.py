"""Trainer's vocabulary for legw_hf's settings, derived from :mod:`legw_hf.settings`: the ``--legw_*`` fields, which
flag (or Trainer argument) carries which setting of the plan or the optimizer, so errors name the flag a user can
fix."""

from __future__ import annotations

from dataclasses import MISSING, field, fields
from typing import Any, Literal

from ...errors import SettingError
from ...schedules import DECAY_OPTIONS, DECAYS
from ...settings import SETTINGS, settings_of, trainer_argument

#: The ``--legw_*`` flags of the optimizer keywords (``--legw_optimizer adamw`` takes Trainer's own ``--adam_*``
#: flags instead of ``--legw_betas`` / ``--legw_eps``).
KEYWORD_OF_FLAG = {setting.trainer_argument: setting.name for setting in settings_of("optimizer")}


#: The ``--legw_*`` flags that describe the tuned config and its decay: without ``--legw_base_batch_size`` they
#: would be silently ignored.
PLAN_FLAGS = tuple(
    setting.trainer_argument
    for setting in settings_of("config", "decay")
    if setting.declared_by_legw and setting.name != "base_batch_size"
)

#: The ``--legw_*`` flags of the run's shape: they serve a plan from the config flags or from
#: ``LegwTrainer(legw_config=...)``, so they are checked once the trainer knows whether it has one.
RUN_FLAGS = tuple(setting.trainer_argument for setting in settings_of("run") if setting.declared_by_legw)


def legw_fields() -> list[tuple[str, Any, Any]]:
    """The ``--legw_*`` fields of :class:`~legw_hf.LegwArguments`, one per setting Trainer takes, in
    :data:`~legw_hf.settings.SETTINGS` order, for :func:`dataclasses.make_dataclass`."""
    declared = []
    for setting in SETTINGS:
        if not setting.declared_by_legw:
            continue
        kind: Any = Literal[setting.choices] if setting.choices else setting.type
        if setting.nargs is not None:
            kind = list[setting.type]
        if setting.default is None:
            kind = kind | None
        help_ = setting.help + (f" Deprecated: {setting.deprecated}" if setting.deprecated else "")
        declared.append((setting.trainer_argument, kind, field(default=setting.default, metadata={"help": help_})))
    return declared


def as_argument_error(error: SettingError) -> SettingError:
    """The error naming each setting as Trainer's arguments spell it (``--legw_base_batch_size``, ``max_steps``)."""
    return error.renamed_by(trainer_argument)


_DECAY_FLAGS = ", ".join(f"--{trainer_argument(option)}" for option in sorted(DECAY_OPTIONS))


#: Trainer's own schedule arguments, which LEGW replaces, and the LEGW flags to use instead.
TRAINER_SCHEDULE_FLAGS = {
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


def as_flag_error(error: SettingError) -> SettingError:
    """An optimizer's error naming the flag (``betas[1]`` is ``--legw_betas``, ``lr`` is ``--learning_rate``)."""
    return error.renamed_by(lambda field: trainer_argument("base_lr" if field == "lr" else field.split("[")[0]))
