"""legw_hf: large-batch training for HuggingFace Transformers and Accelerate.

Plans and schedules are plain Python. Everything that needs torch (the scheduler, the optimizers) or a host
framework (the Trainer and accelerate integrations) loads on first use, so ``import legw_hf`` and the
``legw-hf`` command stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import engines
from .errors import SettingError
from .noise_scale import GradientNoise
from .plan import RULES, LegwConfig, LegwPlan, Phase, PhasedPlan, epoch_steps, plan_from_dict
from .schedules import DECAYS, Constant, Cosine, Exponential, MultiStep, Polynomial, PolynomialOfRun, make_decay

__version__ = "0.1.0.dev0"

# DeepSpeed swaps a client optimizer's parameters for flat buffers of its own however the optimizer reaches it:
# Trainer's --deepspeed, accelerate's DeepSpeed plugin, or deepspeed.initialize(optimizer=Lamb(...)) in a script that
# imports nothing of legw_hf's integrations. Every import of a legw_hf optimizer runs this file first, so registering
# the adapter here covers all three; by module name, so that it is imported (with torch) only on an optimizer's step
# once DeepSpeed itself is loaded, and the optimizers never name it.
engines.register_engine_adapter("deepspeed", "legw_hf.integrations.deepspeed.layouts")

_LAZY = {
    "SCHEDULER_NAMES": "legw_hf.scheduler",
    "LegwScheduler": "legw_hf.scheduler",
    "get_scheduler": "legw_hf.scheduler",
    "LAMB_PRESETS": "legw_hf.optim",
    "LARS_PRESETS": "legw_hf.optim",
    "Lamb": "legw_hf.optim",
    "Lars": "legw_hf.optim",
    "decay_param_groups": "legw_hf.optim",
    "decay_parameter_names": "legw_hf.optim",
    "LegwArguments": "legw_hf.integrations.trainer",
    "LegwTrainingArguments": "legw_hf.integrations.trainer",
    "LegwTrainer": "legw_hf.integrations.trainer",
    "LegwCallback": "legw_hf.integrations.trainer",
    "AcceleratorLegwScheduler": "legw_hf.integrations.accelerate",
    "create_legw_scheduler": "legw_hf.integrations.accelerate",
    "AdaScaleScheduler": "legw_hf.adascale",
    "GradientStatistics": "legw_hf.adascale",
    "AcceleratorAdaScale": "legw_hf.integrations.accelerate",
    "create_adascale": "legw_hf.integrations.accelerate",
    "exit_process": "legw_hf.shutdown",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'legw_hf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "DECAYS",
    "LAMB_PRESETS",
    "LARS_PRESETS",
    "RULES",
    "SCHEDULER_NAMES",
    "AcceleratorAdaScale",
    "AcceleratorLegwScheduler",
    "AdaScaleScheduler",
    "Constant",
    "Cosine",
    "Exponential",
    "GradientNoise",
    "GradientStatistics",
    "Lamb",
    "Lars",
    "LegwArguments",
    "LegwCallback",
    "LegwConfig",
    "LegwPlan",
    "LegwScheduler",
    "LegwTrainer",
    "LegwTrainingArguments",
    "MultiStep",
    "Phase",
    "PhasedPlan",
    "Polynomial",
    "PolynomialOfRun",
    "SettingError",
    "create_adascale",
    "create_legw_scheduler",
    "decay_param_groups",
    "decay_parameter_names",
    "epoch_steps",
    "exit_process",
    "get_scheduler",
    "make_decay",
    "plan_from_dict",
]
