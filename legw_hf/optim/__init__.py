"""LAMB and LARS for PyTorch, with the reference implementations' behaviours as presets."""

from ._base import LayerwiseOptimizer, layerwise_optimizer_of
from .choice import OPTIMIZER_NAMES, check_optimizer, optimizer_class_and_keywords
from .groups import DEFAULT_NO_DECAY_PATTERNS, decay_param_groups, decay_parameter_names
from .lamb import LAMB_PRESETS, Lamb
from .lars import LARS_PRESETS, Lars

__all__ = [
    "DEFAULT_NO_DECAY_PATTERNS",
    "LAMB_PRESETS",
    "LARS_PRESETS",
    "OPTIMIZER_NAMES",
    "Lamb",
    "Lars",
    "LayerwiseOptimizer",
    "check_optimizer",
    "decay_param_groups",
    "decay_parameter_names",
    "layerwise_optimizer_of",
    "optimizer_class_and_keywords",
]
