"""Decay / no-decay param groups the way HF Trainer builds them, with a per-group layer-adaptation switch."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..errors import non_negative
from ._settings import check_flag

#: Name patterns (searched in the lower-cased dotted name) that exclude a parameter from weight decay; the list
#: ``transformers.Trainer.get_decay_parameter_names`` uses.
DEFAULT_NO_DECAY_PATTERNS: tuple[str, ...] = (
    r"bias",
    r"layernorm",
    r"rmsnorm",
    r"(?:^|\.)norm(?:$|\.)",
    r"_norm(?:$|\.)",
)


def decay_parameter_names(
    model: nn.Module,
    no_decay_patterns: Sequence[str] = DEFAULT_NO_DECAY_PATTERNS,
    no_decay_layers: Sequence[type[nn.Module]] = (nn.LayerNorm,),
) -> list[str]:
    """Names of the parameters that get weight decay.

    Same rule as ``transformers.trainer_pt_utils.get_parameter_names(model, [nn.LayerNorm], patterns)``: a
    parameter is excluded when it sits directly in a ``no_decay_layers`` module, or when a pattern matches its
    lower-cased dotted name. Without importing transformers.
    """
    patterns = [re.compile(pattern) for pattern in no_decay_patterns]
    layers = tuple(no_decay_layers)

    def allowed(name: str) -> bool:
        return not any(pattern.search(name.lower()) for pattern in patterns)

    def walk(module: nn.Module) -> list[str]:
        names = []
        for child_name, child in module.named_children():
            names += [
                f"{child_name}.{name}"
                for name in walk(child)
                if not isinstance(child, layers) and allowed(f"{child_name}.{name}")
            ]
        return names + [name for name in module._parameters if allowed(name)]

    return walk(model)


def decay_param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    no_decay_patterns: Sequence[str] = DEFAULT_NO_DECAY_PATTERNS,
    no_decay_layers: Sequence[type[nn.Module]] = (nn.LayerNorm,),
    adapt_no_decay: bool | None = None,
) -> list[dict[str, Any]]:
    """Param groups for :class:`~legw_hf.Lamb` / :class:`~legw_hf.Lars` (or any torch optimizer).

    Returns up to two groups over the trainable parameters (empty ones are left out), each with
    ``param_names`` so :meth:`~legw_hf.Lamb.trust_summary` can name its rows:

    - ``{"params", "param_names", "weight_decay": weight_decay}`` for :func:`decay_parameter_names`,
    - ``{"params", "param_names", "weight_decay": 0.0}`` for the rest (biases, LayerNorm/RMSNorm weights).

    ``adapt_no_decay`` is the layer-adaptation switch of the no-decay group: ``False`` keeps its tensors out of
    the trust ratio (the LAMB paper's and NVIDIA's BERT convention), ``True`` adapts them (optax, DeepSpeed), and
    ``None`` leaves it to the optimizer's ``adapt`` rule. The optimizer reads it as the group's
    ``layer_adaptation`` key, which any param group may carry.
    """
    weight_decay = non_negative("weight_decay", weight_decay)
    if adapt_no_decay is not None:
        check_flag("adapt_no_decay", adapt_no_decay)
    decayed = set(decay_parameter_names(model, no_decay_patterns, no_decay_layers))
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    decay_group = {
        "params": [p for n, p in named if n in decayed],
        "param_names": [n for n, _ in named if n in decayed],
        "weight_decay": weight_decay,
    }
    rest_group = {
        "params": [p for n, p in named if n not in decayed],
        "param_names": [n for n, _ in named if n not in decayed],
        "weight_decay": 0.0,
    }
    if adapt_no_decay is not None:
        rest_group["layer_adaptation"] = adapt_no_decay
    return [group for group in (decay_group, rest_group) if group["params"]]
