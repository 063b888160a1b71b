"""Choosing an optimizer by name with its keywords: what ``--legw_optimizer`` and its flags select.

Framework-free, so Trainer's flags, an accelerate loop's command line or a DeepSpeed launcher can all say
``optimizer_class_and_keywords("lamb", lr, preset="nvidia")`` and get the same checks. Each name lists the keywords it
takes; a keyword another optimizer takes but this one does not is an error, not silently dropped.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..errors import SettingError
from ..settings import optimizer_keywords
from ._dispatch import settings_only
from ._settings import check_fraction
from .lamb import Lamb
from .lars import Lars

#: Optimizers by name, each with the keywords it takes from a caller (``lr`` and weight decay aside), as
#: :mod:`legw_hf.settings` declares them.
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], tuple[str, ...]]] = {
    name: (cls, optimizer_keywords(name))
    for name, cls in (("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD), ("lamb", Lamb), ("lars", Lars))
}
#: The deprecated ``fused`` keyword (Trainer's ``--legw_fused``): its values per optimizer and the ``impl`` each
#: stands for; ``"off"`` is the optimizer's deprecated ``fused=False`` (torch ops only, chosen automatically).
FUSED_VALUES: dict[str, dict[str, str | None]] = {
    "lamb": {"cpu": "cpu", "triton": "triton", "off": None},
    "lars": {"triton": "triton", "off": None},
}
OPTIMIZER_NAMES = tuple(OPTIMIZERS)
KEYWORDS = tuple(dict.fromkeys(keyword for _, keywords in OPTIMIZERS.values() for keyword in keywords))


def optimizer_class_and_keywords(
    name: str, lr: float, **keywords: Any
) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The class called ``name`` and the keywords to build it with. ``None`` keywords take the optimizer's (or
    preset's) default; sequences become tuples; ``max_grad_norm=0`` switches LAMB's pre-normalisation off; SGD's
    momentum defaults to 0.9.

    ``fused`` is deprecated (a :class:`DeprecationWarning` names the ``impl`` to pass): ``"cpu"`` and ``"triton"``
    become ``impl="cpu"`` / ``impl="triton"``; ``"off"`` becomes the optimizer's ``fused=False`` (torch ops only,
    the best of them chosen automatically), itself deprecated."""
    if name not in OPTIMIZERS:
        raise SettingError("optimizer", f"must be one of {', '.join(map(repr, OPTIMIZERS))}", name)
    cls, taken = OPTIMIZERS[name]
    unknown = sorted(set(keywords) - set(KEYWORDS))
    if unknown:
        raise SettingError(unknown[0], "is not an optimizer keyword", keywords[unknown[0]])
    for keyword in sorted(set(keywords) - set(taken)):
        if keywords[keyword] is not None:
            raise SettingError(keyword, f"is not an option of optimizer {name!r}", keywords[keyword])
    kwargs: dict[str, Any] = {"lr": lr}
    for keyword in taken:
        value = keywords.get(keyword)
        if value is None:
            continue
        if keyword in ("betas", "trust_clamp"):
            value = tuple(value)
        elif keyword == "max_grad_norm" and value == 0:
            value = None  # 0 switches the pre-normalisation off
        elif keyword == "fused":
            keyword, value = _impl_of_fused(name, value, keywords.get("impl"))
        kwargs[keyword] = value
    if name == "sgd":
        kwargs["momentum"] = check_fraction("momentum", kwargs.get("momentum", 0.9))
    return cls, kwargs


def _impl_of_fused(name: str, value: Any, impl: Any) -> tuple[str, Any]:
    """The keyword and value the deprecated ``fused`` keyword stands for."""
    values = FUSED_VALUES[name]
    if value not in values:
        raise SettingError("fused", f"must be one of {', '.join(map(repr, values))} for optimizer {name!r}", value)
    if impl is not None:
        raise SettingError("fused", "cannot be combined with impl (fused is its deprecated spelling)", value)
    if values[value] is None:
        return "fused", False  # the optimizer's own fused=False warns
    warnings.warn(
        f"the optimizer keyword fused={value!r} is deprecated and will be removed in the next release; "
        f"pass impl={values[value]!r}",
        DeprecationWarning,
        stacklevel=3,
    )
    return "impl", values[value]


def check_optimizer(name: str, lr: float, **keywords: Any) -> torch.optim.Optimizer:
    """Build the chosen optimizer over one dummy CPU parameter, so its own checks run before any training work,
    and return it (its settings, e.g. ``max_grad_norm``, can then be read).

    Lamb and Lars are built under :func:`~legw_hf.optim._dispatch.settings_only`: their ``impl`` value and the
    settings it needs are checked, not the dummy parameter (``impl="triton"`` or ``"cpu"`` are meant for the
    run's tensors, not for this one), no kernel is built, and the probe's ``impl`` is None unless one was asked
    for."""
    cls, kwargs = optimizer_class_and_keywords(name, lr, **keywords)
    try:
        with settings_only():
            return cls([torch.nn.Parameter(torch.zeros(1))], **kwargs)
    except SettingError:
        raise
    except ValueError as error:  # torch's own optimizers
        raise SettingError("optimizer", f"settings are refused by {cls.__name__}", name, detail=str(error)) from None


__all__ = ["KEYWORDS", "OPTIMIZERS", "OPTIMIZER_NAMES", "check_optimizer", "optimizer_class_and_keywords"]
