"""``--legw_optimizer`` and its flags: the optimizer class and keywords they select, checked up front."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ...errors import SettingError
from ...optim.choice import check_optimizer, optimizer_class_and_keywords
from .flags import KEYWORD_OF_FLAG, as_flag_error

if TYPE_CHECKING:  # annotations only: the arguments module imports this one
    from .arguments import LegwArguments


def optimizer_keywords(args: LegwArguments) -> dict[str, Any]:
    keywords = {keyword: getattr(args, flag) for flag, keyword in KEYWORD_OF_FLAG.items()}
    if args.legw_optimizer == "adamw":
        for flag in ("legw_betas", "legw_eps"):
            if getattr(args, flag) is not None:
                value = getattr(args, flag)
                raise SettingError(flag, "is not an option of optimizer 'adamw' (it takes --adam_*)", value)
        keywords.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    return keywords


def optimizer_cls_and_kwargs(args: LegwArguments) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The class and keywords ``--legw_optimizer`` and its flags select (weight decay comes from Trainer's
    groups). A flag the chosen optimizer does not take is an error rather than silently ignored."""
    try:
        return optimizer_class_and_keywords(args.legw_optimizer, args.learning_rate, **optimizer_keywords(args))
    except SettingError as error:
        raise as_flag_error(error) from None


def probe_optimizer(args: LegwArguments) -> torch.optim.Optimizer:
    """The chosen optimizer built over one dummy parameter: its own checks validate the flags up front."""
    try:
        return check_optimizer(args.legw_optimizer, args.learning_rate, **optimizer_keywords(args))
    except SettingError as error:
        raise as_flag_error(error) from None


def adam_family(args: LegwArguments) -> bool:
    if args.legw_optimizer is not None:
        return args.legw_optimizer in ("lamb", "adamw")
    return "adam" in str(getattr(args.optim, "value", args.optim)).lower()
