"""The one clipping rule under DeepSpeed: gradients are clipped once.

A LAMB that pre-normalises by the global gradient norm (the ``nvidia`` preset's ``max_grad_norm``) already clips;
DeepSpeed's engine clips by its config's ``"gradient_clipping"`` (1.0 when the config has none). Both would run,
so beside pre-normalisation DeepSpeed's must be 0. :func:`clip_once` decides, wherever the two meet: when
Trainer's arguments are built (the config as written, which Trainer fills in later) and when legw_hf's optimizer
learns the wrapper DeepSpeed built around it (the clipping it resolved), which covers accelerate loops and
``deepspeed.initialize`` too. Trainer's own ``max_grad_norm`` is settled before, in its arguments.
"""

from __future__ import annotations

from typing import Any

from ...errors import SettingError

#: What DeepSpeed clips at when its config has no ``"gradient_clipping"``.
DEFAULT_CLIPPING = 1.0


def clip_once(
    clipping: Any,
    pre_normalisation: float | None,
    *,
    lamb: str = "the LAMB",
    because: str = "",
    lamb_off: str = "build it with max_grad_norm=None",
    engine: str | None = None,
) -> str | None:
    """Settle DeepSpeed's clipping beside a LAMB's pre-normalisation.

    Args:
        clipping: DeepSpeed's ``"gradient_clipping"``: as a config has it (None when absent, ``"auto"`` for Trainer
            to fill from its ``max_grad_norm``, which legw_hf turns off beside pre-normalisation), or the number
            DeepSpeed's optimizer ``engine`` (its class name) resolved.
        pre_normalisation: the LAMB's max norm; None when it does not pre-normalise (then DeepSpeed's clipping is the
            only one and stays).
        lamb: the LAMB as the user chose it (``"--legw_optimizer lamb"``), ``because``: what legw_hf already did to
            clip once, ``lamb_off``: how the user turns the pre-normalisation off instead; for the message.

    Returns:
        None when gradients are clipped once as things are; when the config has no entry (DeepSpeed would clip at
        its default), a note saying that DeepSpeed's clipping is to be turned off, for the caller to set
        ``"gradient_clipping"`` to 0 and log it.

    Raises:
        SettingError: the clipping is a number > 0: it would clip a second time.
    """
    if pre_normalisation is None or clipping == "auto":
        return None
    why = f"{lamb} pre-normalises gradients by their global norm (max norm {pre_normalisation:g}){because}"
    if clipping is None:
        return f"{why}; DeepSpeed's own clipping (default {DEFAULT_CLIPPING}) is turned off too (gradient_clipping=0)."
    if float(clipping) <= 0:  # DeepSpeed clips only at a positive norm
        return None
    accepted = '"auto" or 0' if engine is None else "0"
    detail = (
        ""
        if engine is None
        else f"DeepSpeed {engine}; its default is {DEFAULT_CLIPPING} when the config has no gradient_clipping"
    )
    raise SettingError(
        "gradient_clipping",
        f"must be {accepted} in the DeepSpeed config when {why}: DeepSpeed would clip a second time. Set "
        f"\"gradient_clipping\" to {accepted}, or keep DeepSpeed's clipping and turn the LAMB's off ({lamb_off})",
        clipping,
        detail=detail,
    )
