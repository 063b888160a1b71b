"""legw_hf: large-batch training for HuggingFace Transformers and Accelerate.

Plans and schedules are plain Python. Everything that needs torch (the scheduler, the optimizers) or a host
framework (the Trainer and accelerate integrations) loads on first use, so ``import legw_hf`` and the
``legw-hf`` command stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import SettingError
from .plan import RULES, LegwConfig, LegwPlan, Phase, PhasedPlan, epoch_steps, plan_from_dict
from .schedules import DECAYS, Constant, Cosine, Exponential, MultiStep, Polynomial, make_decay

__version__ = "0.1.0.dev0"

_LAZY = {
    "SCHEDULER_NAMES": "legw_hf.scheduler",
    "LegwScheduler": "legw_hf.scheduler",
    "get_scheduler": "legw_hf.scheduler",
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
    "RULES",
    "Constant",
    "Cosine",
    "Exponential",
    "LegwConfig",
    "LegwPlan",
    "MultiStep",
    "Phase",
    "PhasedPlan",
    "Polynomial",
    "SettingError",
    "epoch_steps",
    "make_decay",
    "plan_from_dict",
    *_LAZY,
]
