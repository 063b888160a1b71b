"""Carrying an optimizer into the next training phase (BERT phase 2): keep the moments, restart the step count.

NVIDIA's BERT recipe starts phase 2 from phase 1's Adam/LAMB moments with the step counter back at 0, so the bias
correction ``1 - β^t`` starts over with the phase's re-warmup. The new phase's hyperparameters (its LR, and
anything else in the param groups) are the new optimizer's, not the checkpoint's.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SettingError


def restart_step_counts(optimizer: torch.optim.Optimizer) -> int:
    """Set every parameter's ``step`` state to 0 (in place for tensors); returns how many were reset."""
    reset = 0
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            step.zero_()
        elif step is not None:
            state["step"] = 0
        else:
            continue
        reset += 1
    return reset


def continue_from_phase(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> int:
    """Load the moments of ``saved`` (an optimizer ``state_dict`` of the previous phase over the same parameters)
    into ``optimizer``, keeping ``optimizer``'s param-group settings, and restart the step counts."""
    current = optimizer.state_dict()
    shape_now = [len(group["params"]) for group in current["param_groups"]]
    shape_saved = [len(group["params"]) for group in saved["param_groups"]]
    if shape_now != shape_saved:
        raise SettingError(
            "checkpoint",
            "must hold the optimizer state of the same parameters in the same groups (tensors per group)",
            shape_saved,
            detail=f"this optimizer has {shape_now}",
        )
    optimizer.load_state_dict({"state": saved["state"], "param_groups": current["param_groups"]})
    return restart_step_counts(optimizer)
