"""Which implementation runs an optimizer's step: chosen once, in one place, for every tensor of the step.

Each optimizer lists its implementations (:class:`Implementation`), complete functions behind one interface, best
first. :class:`Dispatch` picks one for the tensors the optimizer was built with and keeps that choice for as long
as the step's tensors look the same: the *signature* of a step is the set of :class:`Kind` of its buckets (device,
dtypes, masters, contiguity and the group settings the implementations care about). A new signature (an engine
swapped the parameters for flat fp32 partitions, the model moved, a param group was added) is checked again, once;
every other step only looks its signature up. One step never mixes implementations across buckets.

An explicit ``impl`` is checked the same way and never falls back: what it cannot take is a
:class:`~legw_hf.SettingError` at construction, or at the first step whose tensors changed.

Under :func:`settings_only` (what :func:`~legw_hf.optim.check_optimizer` uses for its probe over one dummy CPU
parameter) only the ``impl`` value and the settings are checked: no tensor requirement, no kernel build.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..errors import SettingError

_SETTINGS_ONLY = contextvars.ContextVar("legw_hf_settings_only", default=False)
#: Signatures remembered per optimizer before the cache starts afresh (a step only ever sees a few).
CACHE_SIZE = 16


@contextlib.contextmanager
def settings_only() -> Iterator[None]:
    """Optimizers built inside check their ``impl`` value and settings, not their tensors, and build no kernel."""
    token = _SETTINGS_ONLY.set(True)
    try:
        yield
    finally:
        _SETTINGS_ONLY.reset(token)


class Kind(NamedTuple):
    """What the implementations need to know about the tensors of one bucket (or one parameter)."""

    #: per-group settings an implementation depends on (the optimizer's :meth:`dispatch_settings`)
    settings: tuple
    device: str
    param_dtype: torch.dtype
    #: the dtype the update is computed in and written to: fp32 for a parameter with an fp32 master
    weight_dtype: torch.dtype
    grad_dtypes: frozenset[torch.dtype]
    masters: bool
    contiguous: bool
    #: device type of a tensor LR, None for a float LR
    lr_device: str | None

    def describe(self) -> str:
        grads = "/".join(sorted(str(d).removeprefix("torch.") for d in self.grad_dtypes))
        text = f"{self.device} {str(self.param_dtype).removeprefix('torch.')}"
        if grads and self.grad_dtypes != {self.param_dtype}:
            text += f" (gradients {grads})"
        if self.masters:
            text += " with fp32 masters"
        if not self.contiguous:
            text += ", not contiguous"
        if self.lr_device is not None and self.lr_device != self.device:
            text += f", LR tensor on {self.lr_device}"
        return text


Signature = frozenset[Kind]


def describe(signature: Signature) -> str:
    return "; ".join(sorted({kind.describe() for kind in signature}))


def lr_device(group: dict[str, Any]) -> str | None:
    lr = group["lr"]
    return lr.device.type if isinstance(lr, Tensor) else None


@dataclass(frozen=True)
class Implementation:
    """One complete implementation of an optimizer's step.

    ``settings`` says why the optimizer's group settings rule it out (None: they do not); ``tensors`` why a
    signature does; ``available`` why this environment does (a kernel that cannot be built, a missing package, a
    private torch kernel that failed its self-check). ``builds``: checking availability compiles something, so it
    is asked only once the tensors fit, and a settings-only probe never asks it; ``ready`` says whether that build
    has happened. An automatic choice made at a step (the tensors changed) never starts a build: a step must not
    stall for half a minute on a compiler. ``run`` is the step's first pass, whose arguments and result each
    optimizer defines for all its implementations alike.
    """

    name: str
    run: Callable[..., Any]
    settings: Callable[[Any], str | None] = lambda optimizer: None
    tensors: Callable[[Signature], str | None] = lambda signature: None
    available: Callable[[Any], str | None] = lambda optimizer: None
    builds: bool = False
    ready: Callable[[Any], bool] = lambda optimizer: True


class Dispatch:
    """The implementation choice of one optimizer: ``requested`` (an ``impl`` name, or None for automatic among
    ``candidates``), the choice per signature, and :attr:`current`, the implementation of the last step (or of
    the construction before any step)."""

    def __init__(
        self,
        optimizer: Any,
        implementations: Sequence[Implementation],
        requested: str | None,
        candidates: Sequence[str],
    ) -> None:
        self.optimizer = optimizer
        self.implementations = {impl.name: impl for impl in implementations}
        self.requested = requested
        self.candidates = tuple(candidates)
        self._chosen: dict[Signature, Implementation] = {}
        self._first: Signature | None = None
        self.current: Implementation | None = None

    @property
    def values(self) -> str:
        return ", ".join(["None", *map(repr, self.implementations)])

    def start(self, signature: Signature) -> None:
        """The choice for the tensors the optimizer was built with (or, under :func:`settings_only`, a check of
        the requested value and the settings only)."""
        if _SETTINGS_ONLY.get():
            if self.requested is not None:
                impl = self.implementations[self.requested]
                reason = impl.settings(self.optimizer) or (None if impl.builds else impl.available(self.optimizer))
                if reason:
                    raise SettingError("impl", reason, self.requested, detail=f"impl takes {self.values}")
            return
        self._first = signature
        self.choose(signature)

    def choose(self, signature: Signature) -> Implementation:
        """The implementation for a step over ``signature``: looked up, or decided once for a new one."""
        impl = self._chosen.get(signature)
        if impl is None:
            impl = self._decide(signature)
            if len(self._chosen) >= CACHE_SIZE:
                self._chosen.clear()
            self._chosen[signature] = impl
        self.current = impl
        return impl

    def _reason(self, impl: Implementation, signature: Signature) -> str | None:
        """Why ``impl`` cannot run a step over ``signature`` (None: it can). A build is only tried for tensors it
        would run on."""
        if reason := impl.settings(self.optimizer) or (None if impl.builds else impl.available(self.optimizer)):
            return reason
        return impl.tensors(signature) or (impl.available(self.optimizer) if impl.builds else None)

    def _decide(self, signature: Signature) -> Implementation:
        if self.requested is None:
            at_step = self._first is not None and signature != self._first
            for name in self.candidates:
                impl = self.implementations[name]
                if at_step and impl.builds and not impl.ready(self.optimizer):
                    continue
                if self._reason(impl, signature) is None:
                    return impl
            raise AssertionError(f"no implementation among {self.candidates} fits")  # the last one fits anything
        impl = self.implementations[self.requested]
        reason = self._reason(impl, signature)
        if reason is None:
            return impl
        fitting = [
            repr(name)
            for name, other in self.implementations.items()
            if not (other.settings(self.optimizer) or other.tensors(signature))
        ]
        detail = f"found {describe(signature)}; these settings and tensors fit impl=None, {', '.join(fitting)}"
        if self._first is not None and signature != self._first:
            detail = f"the step's tensors changed since the optimizer was built with {describe(self._first)}: " + detail
        raise SettingError("impl", reason, self.requested, detail=detail)


def check_value(value: Any, names: Iterable[str]) -> str | None:
    """An ``impl`` keyword: None or one of ``names``."""
    names = tuple(names)
    if value is not None and (not isinstance(value, str) or value not in names):
        raise SettingError("impl", f"must be one of {', '.join(['None', *map(repr, names)])}", value)
    return value


def refuse_impl_beside(impl: str | None, deprecated: dict[str, Any], names: Iterable[str]) -> None:
    """``impl`` together with any of the keywords it replaced (``deprecated``: those given) is ambiguous: refused."""
    if impl is not None and deprecated:
        raise SettingError(
            "impl",
            f"cannot be combined with the deprecated {', '.join(deprecated)}",
            impl,
            detail=f"impl takes None, {', '.join(map(repr, names))}; pass impl alone",
        )


def parameter_signature(optimizer: Any) -> Signature:
    """The signature of a step over every parameter the optimizer holds, each with a gradient of its own dtype."""
    kinds = set()
    for group in optimizer.param_groups:
        settings = optimizer.dispatch_settings(group)
        for param in group["params"]:
            masters = optimizer._wants_master(param)
            kinds.add(
                Kind(
                    settings,
                    param.device.type,
                    param.dtype,
                    torch.float32 if masters else param.dtype,
                    frozenset({param.dtype}),
                    masters,
                    param.is_contiguous(),
                    lr_device(group),
                )
            )
    return frozenset(kinds)


def step_signature(optimizer: Any, buckets: Sequence[Any]) -> Signature:
    """The signature of a step over ``buckets`` (:class:`~legw_hf.optim._base.Bucket`)."""
    return frozenset(
        Kind(
            optimizer.dispatch_settings(bucket.group),
            bucket.weights[0].device.type,
            bucket.params[0].dtype,
            bucket.weights[0].dtype,
            frozenset(grad.dtype for grad in bucket.grads),
            bucket.has_masters,
            all(t.is_contiguous() for t in bucket.weights) and all(g.is_contiguous() for g in bucket.grads),
            lr_device(bucket.group),
        )
        for bucket in buckets
    )


def triton_refusal(signature: Signature) -> str | None:
    """Why the Triton kernels cannot take a step's tensors (None: they can)."""
    try:
        from . import _triton_kernel
    except ImportError:
        return triton_missing(None)

    devices = ("cuda", "cpu") if _triton_kernel.INTERPRETED else ("cuda",)
    for kind in signature:
        dtypes = {kind.param_dtype, kind.weight_dtype, *kind.grad_dtypes}
        if kind.device not in devices or not kind.contiguous or not dtypes <= set(_triton_kernel.DTYPES):
            break
        if len(kind.grad_dtypes) != 1:
            break
    else:
        return None
    where = "CUDA" + (" or CPU (Triton interprets)" if _triton_kernel.INTERPRETED else "")
    return (
        f"'triton' needs contiguous fp32, bf16 or fp16 tensors on {where}, one gradient dtype per param group and "
        "dtype (TRITON_INTERPRET=1 lets Triton's interpreter take CPU tensors)"
    )


def triton_missing(optimizer: Any) -> str | None:
    """Why legw_hf's Triton kernels cannot be imported here (None: they can)."""
    try:
        from . import _triton_kernel  # noqa: F401
    except ImportError as error:
        return f"'triton' needs the triton package: pip install 'legw_hf[gpu]' ({type(error).__name__}: {error})"
    return None


__all__ = [
    "Dispatch",
    "Implementation",
    "Kind",
    "Signature",
    "check_value",
    "parameter_signature",
    "settings_only",
    "step_signature",
]
