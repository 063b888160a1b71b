"""Preset resolution and the checks every optimizer keyword goes through.

A preset is a plain dict of keyword values. Resolution is three layers, later ones winning: the optimizer's own
defaults, the preset's dict, the keywords the caller actually passed. A keyword left at :data:`FROM_PRESET` was
not passed; ``None`` is a real value (it turns a feature off).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import SettingError, non_negative, one_of


class _FromPreset:
    """The default of optimizer keywords: take the preset's value, or the optimizer's own without a preset."""

    def __repr__(self) -> str:
        return "FROM_PRESET"


FROM_PRESET: Any = _FromPreset()


def resolve(
    defaults: Mapping[str, Any],
    presets: Mapping[str, Mapping[str, Any]],
    preset: str | None,
    given: Mapping[str, Any],
) -> dict[str, Any]:
    """The keyword values an optimizer runs with: defaults, then the preset's values, then what was passed."""
    settings = dict(defaults)
    if preset is not None:
        if not isinstance(preset, str) or preset not in presets:
            raise SettingError("preset", f"must be one of {', '.join(map(repr, presets))} or None", preset)
        settings.update(presets[preset])
    settings.update({key: value for key, value in given.items() if value is not FROM_PRESET})
    return settings


def check_lr(lr: Any) -> float | torch.Tensor:
    """A finite LR >= 0, as a Python number or a one-element floating tensor (read once, here, not in step)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise SettingError("lr", "must be a float or a one-element floating-point tensor", lr)
        value = lr.detach().float().cpu().item()
        if not math.isfinite(value) or value < 0:
            raise SettingError("lr", "must be a finite number >= 0", lr)
        return lr
    return non_negative("lr", lr)


def check_fraction(field: str, value: Any) -> float:
    """A coefficient in [0, 1), such as an Adam beta or a momentum."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise SettingError(field, "must be a number in [0, 1)", value)
    return float(value)


def check_betas(betas: Any) -> tuple[float, float]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise SettingError("betas", "must be a pair (beta1, beta2), each in [0, 1)", betas)
    return check_fraction("betas[0]", betas[0]), check_fraction("betas[1]", betas[1])


def check_flag(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SettingError(field, "must be True or False", value)
    return value


def check_choice(field: str, value: Any, choices: tuple[str, ...], *, detail: str = "") -> str:
    if detail and value not in choices:
        raise SettingError(field, f"must be one of {', '.join(map(repr, choices))}", value, detail=detail)
    return one_of(field, value, choices)


def check_fused(value: Any, kernels: tuple[str, ...]) -> bool | str | None:
    """An optimizer's ``fused`` keyword: None (the default choice), False (torch ops), or one of ``kernels``;
    ``True`` is the first of them."""
    if value is None or value is False:
        return value
    if value is True and "cpu" in kernels:
        return "cpu"
    if value not in kernels:
        accepted = ", ".join(["None", "False", *(["True"] if "cpu" in kernels else []), *map(repr, kernels)])
        raise SettingError("fused", f"must be one of {accepted}", value)
    return value


def check_optional_positive(field: str, value: Any) -> float | None:
    """``None`` (off) or a finite number > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise SettingError(field, "must be None (off) or a finite number > 0", value)
    return float(value)


def check_clamp(field: str, value: Any) -> tuple[float, float] | None:
    """``None`` (no clamp) or ``(low, high)`` with 0 <= low <= high; ``high`` may be ``math.inf``."""
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise SettingError(field, "must be None or a pair (min, max)", value)
    low, high = value
    for bound in (low, high):
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or math.isnan(bound) or bound < 0:
            raise SettingError(field, "must hold two numbers >= 0", value)
    if not math.isfinite(low):
        raise SettingError(field, "must have a finite min", value)
    if low > high:
        raise SettingError(field, "must have min <= max", value)
    return float(low), float(high)


def check_parameter(param: torch.Tensor) -> None:
    """Only real floating-point tensors can be optimized here."""
    if param.is_complex():
        raise SettingError(
            "params", "must be real floating-point tensors (complex parameters are not supported)", param.dtype
        )
    if not param.is_floating_point():
        raise SettingError("params", "must be floating-point tensors", param.dtype)
    if param.is_sparse:
        raise SettingError("params", "must be dense tensors (sparse parameters are not supported)", param.layout)
