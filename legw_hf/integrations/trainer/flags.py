"""Trainer's vocabulary for legw_hf's settings: which ``--legw_*`` flag (or Trainer argument) carries which
setting of the plan or the optimizer, so errors name the flag a user can fix."""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any

from ...errors import SettingError
from ...schedules import DECAY_OPTIONS, DECAYS

#: The ``--legw_*`` flags of :mod:`legw_hf.optim.choice`'s optimizer keywords (``--legw_optimizer adamw`` takes
#: Trainer's own ``--adam_*`` flags instead of ``--legw_betas`` / ``--legw_eps``).
KEYWORD_OF_FLAG = {
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


FLAG_OF_KEYWORD = {keyword: flag for flag, keyword in KEYWORD_OF_FLAG.items()} | {
    "lr": "learning_rate",
    "optimizer": "legw_optimizer",
}


# Core setting name -> the Trainer argument a user typed, so errors name the flag they can fix.
ARGUMENT_FOR_SETTING = {
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


def as_argument_error(error: SettingError) -> SettingError:
    return error.renamed_by(lambda field: ARGUMENT_FOR_SETTING.get(field, field))


#: The LEGW flags that shape the plan; without ``--legw_base_batch_size`` they would be silently ignored.
PLAN_FLAGS = tuple(
    dict.fromkeys(
        flag for flag in ARGUMENT_FOR_SETTING.values() if flag.startswith("legw_") and flag != "legw_base_batch_size"
    )
)


_DECAY_FLAGS = ", ".join(f"--{ARGUMENT_FOR_SETTING[option]}" for option in sorted(DECAY_OPTIONS))


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
    def flag(field: str) -> str:
        keyword = field.split("[")[0]
        return FLAG_OF_KEYWORD.get(keyword, keyword)

    return error.renamed_by(flag)
