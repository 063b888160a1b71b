"""DeepSpeed's optimizer wrappers as they meet legw_hf's optimizers: found in a chain of wrappers or on the stack
of a ``step()`` call, their state-initialising call, and ZeRO's norm of the applied gradient.

Plain Python: a wrapper is recognised by its class name and module, so nothing here imports DeepSpeed (or torch).
"""

from __future__ import annotations

import sys
from typing import Any

from ...errors import SettingError

#: The wrappers that put flat buffers (or fp32 copies) of their own in the client optimizer's groups.
WRAPPERS = (
    "DeepSpeedZeroOptimizer",
    "DeepSpeedZeroOptimizer_Stage3",
    "BF16_Optimizer",
    "FP16_UnfusedOptimizer",
)


def is_wrapper(obj: Any) -> bool:
    """Whether ``obj`` is one of DeepSpeed's :data:`WRAPPERS`."""
    return type(obj).__name__ in WRAPPERS and type(obj).__module__.startswith("deepspeed.")


def find_wrapper(optimizer: Any) -> tuple[Any, Any] | None:
    """``(wrapper, client)`` for the DeepSpeed wrapper inside an optimizer chain (accelerate's
    ``AcceleratedOptimizer`` → DeepSpeed's → the client), or None."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None)
        if is_wrapper(optimizer):
            return optimizer, inner
        optimizer = inner
    return None


def calling_wrapper(optimizer: Any) -> Any:
    """The DeepSpeed wrapper whose method is calling ``optimizer`` (its ``step()``) right now, or None."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if owner is not None and is_wrapper(owner) and getattr(owner, "optimizer", None) is optimizer:
            return owner
        frame = frame.f_back
    return None


def initialising_state(optimizer: Any) -> bool:
    """Whether DeepSpeed's fp16/bf16 wrappers are calling ``optimizer.step()`` on zero gradients to make the
    state exist (``initialize_optimizer_states``). That call must create state and change nothing else: a real
    LAMB step on zero gradients would still apply the decay term at a trust ratio of 1/λ."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if frame.f_code.co_name == "initialize_optimizer_states" and owner is not None and is_wrapper(owner):
            return getattr(owner, "optimizer", None) is optimizer
        frame = frame.f_back
    return False


def zero_gradient_norm(optimizer: Any) -> tuple[Any, Any]:
    """(a function returning DeepSpeed's norm of the applied gradient, the client optimizer) behind ``optimizer``
    (accelerate's wrapper → DeepSpeed's ZeRO optimizer → the client). The norm is of the averaged gradient, with
    the loss scale removed and before clipping, and is computed in ``step()`` before the client's step runs."""
    chain = [optimizer]
    while getattr(chain[-1], "optimizer", None) is not None:
        chain.append(chain[-1].optimizer)
    zero = next((o for o in chain if hasattr(o, "_global_grad_norm")), None)
    if zero is None:
        raise SettingError(
            "zero_optimization",
            "must select a ZeRO stage (1-3) for AdaScale under DeepSpeed: its optimizer computes the gradient norm",
            None,
        )
    return (lambda: zero._global_grad_norm), chain[-1]
