"""legw_hf: large-batch training for HuggingFace Transformers and Accelerate.

The core (plans, schedules, the scheduler) and the optimizers (:class:`Lamb`, :class:`Lars`) import only torch.
The Trainer and accelerate integrations load on first use, so ``import legw_hf`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import SettingError
from .optim import LAMB_PRESETS, LARS_PRESETS, Lamb, Lars, decay_param_groups, decay_parameter_names
from .plan import RULES, LegwConfig, LegwPlan, Phase, PhasedPlan, epoch_steps, plan_from_dict
from .scheduler import SCHEDULER_NAMES, LegwScheduler, get_scheduler
from .schedules import DECAYS, Constant, Cosine, Exponential, MultiStep, Polynomial, make_decay

__version__ = "0.1.0.dev0"

_LAZY = {
    "LegwArguments": "legw_hf.integrations.trainer",
    "LegwTrainingArguments": "legw_hf.integrations.trainer",
    "LegwTrainer": "legw_hf.integrations.trainer",
    "LegwCallback": "legw_hf.integrations.trainer",
    "AcceleratorLegwScheduler": "legw_hf.integrations.accelerate",
    "create_legw_scheduler": "legw_hf.integrations.accelerate",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'legw_hf' has no attribute {name!r}")


__all__ = [
    "DECAYS",
    "LAMB_PRESETS",
    "LARS_PRESETS",
    "RULES",
    "SCHEDULER_NAMES",
    "Constant",
    "Cosine",
    "Exponential",
    "Lamb",
    "Lars",
    "LegwConfig",
    "LegwPlan",
    "LegwScheduler",
    "MultiStep",
    "Phase",
    "PhasedPlan",
    "Polynomial",
    "SettingError",
    "decay_param_groups",
    "decay_parameter_names",
    "epoch_steps",
    "get_scheduler",
    "make_decay",
    "plan_from_dict",
    *_LAZY,
]
